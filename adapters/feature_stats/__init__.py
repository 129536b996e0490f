"""``feature_stats``: per-location Gaussian of pretrained CNN features (a diagonal PaDiM)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench.backbones import create_backbone, normalize
from bench.detector import FIT_SCOPES, Detector
from bench.params import NonEmpty, Range
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import check_timm_backbone, gaussian_blur, image_score, patch_features


@register_detector("feature_stats")
class FeatureStats(Detector):
    """Per-location diagonal Gaussian of pretrained CNN features (simplified PaDiM).

    Features of the chosen backbone stages are upsampled to the finest stage and concatenated;
    ``fit`` keeps each location's mean and variance over the training images; the anomaly map
    is the mean squared z-score over channels (a diagonal Mahalanobis distance), upsampled to
    the input and smoothed; the image score is the map's maximum.
    """

    modality = "image"
    #: its fit uses whatever images it is given: every scope applies
    fit_scopes = FIT_SCOPES
    #: the pretrained backbone, rebuilt from the parameters (older fitted states saved it)
    frozen = ("extractor",)
    dropped_state = ("extractor_",)
    #: a variance needs two images: the plan refuses a 1-shot fit
    min_train_images = 2

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "pretrained",
        layers: Annotated[tuple[int, ...], NonEmpty] = (2, 3),  # timm out_indices (<0: from end)
        variance_floor: Annotated[float, Range(ge=0)] = 0.01,
        sigma: Annotated[float, Range(ge=0)] = 4.0,
        score: Literal["max", "topk"] = "max",
    ) -> None:
        self.backbone, self.weights, self.layers = backbone, weights, tuple(layers)
        self.variance_floor, self.sigma, self.score = variance_floor, sigma, score
        self.extractor = create_backbone(backbone, weights, self.layers)

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """The backbone, its weights and its feature stages known to timm (offline)."""
        check_timm_backbone(params, "efficientnet_lite0")

    @torch.no_grad()
    def features(self, image: torch.Tensor) -> torch.Tensor:
        return patch_features(self.extractor, normalize(image))

    @torch.no_grad()
    def fit(self, train: Iterable[Batch]) -> None:
        total = total_sq = None
        count = 0
        for batch in train:
            f = self.features(batch.image.to(self.device)).double()
            total = f.sum(0) if total is None else total + f.sum(0)
            total_sq = (f**2).sum(0) if total_sq is None else total_sq + (f**2).sum(0)
            count += f.shape[0]
        if count < self.min_train_images:
            raise ValueError(f"feature_stats.fit needs 2 training images (a variance), got {count}")
        mean = total / count
        var = (total_sq / count - mean**2).clamp_min(0)
        self.mean_ = mean.float()
        self.var_ = (var + self.variance_floor * var.mean()).float()

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        image = batch.image.to(self.device)
        f = self.features(image)
        dist = ((f - self.mean_) ** 2 / self.var_).mean(1)
        maps = F.interpolate(
            dist[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        maps = gaussian_blur(maps, self.sigma)
        return Prediction(score=image_score(maps, self.score), anomaly_map=maps)
