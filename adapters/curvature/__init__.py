"""``curvature``: multi-scale kNN surface variation per point (the CASL paper's baseline)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import torch

from bench.detector import FIT_SCOPES, Detector
from bench.params import NonEmpty, Range
from bench.pointcloud import knn_indices, multiscale_surface_variation
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, grid_maps, image_score, point_clouds


@register_detector("curvature")
class Curvature(Detector):
    """Multi-scale kNN surface variation per point (the CASL paper's curvature baseline).

    Per valid point: its ``ks`` nearest neighbours (itself included), their covariance's
    eigenvalues l0 <= l1 <= l2 and the surface variation l0 / (l0 + l1 + l2) at each scale.

    ``normalize="scale"`` z-scores each scale by the mean and spread of the training clouds'
    points (so scales are comparable and typical structure of good parts scores low);
    ``"none"`` keeps the raw values. Scales are combined by their mean. Organised clouds: point
    scores go back to the grid (invalid points get the image's lowest score), are smoothed
    (Gaussian ``sigma`` pixels) and reduced to an image score (``score``: max or top-1% mean).
    Unorganised clouds ("points"): every point is scored; ``point_smoothing`` > 1 averages each
    score over that many nearest neighbours; the object score reduces the point scores alike.
    """

    modality = "point_cloud"
    also_accepts = ("points",)
    #: its fit uses whatever images it is given: every scope applies
    fit_scopes = FIT_SCOPES
    inference_amp = False  # covariance eigenvalues need full precision

    def __init__(
        self,
        ks: Annotated[tuple[Annotated[int, Range(ge=3)], ...], NonEmpty] = (16, 32, 64),
        normalize: Literal["scale", "none"] = "scale",
        sigma: Annotated[float, Range(ge=0)] = 4.0,
        score: Literal["max", "topk"] = "max",
        knn: Literal["auto", "kdtree", "torch"] = "auto",
        point_smoothing: Annotated[int, Range(ge=0)] = 0,
    ) -> None:
        if normalize not in ("scale", "none"):
            raise ValueError(f"normalize must be 'scale' or 'none', got {normalize!r}")
        self.ks, self.normalize, self.sigma, self.score, self.knn = (
            tuple(ks),
            normalize,
            sigma,
            score,
            knn,
        )
        self.point_smoothing = point_smoothing

    def _clouds(self, batch: Batch) -> list[torch.Tensor]:
        return point_clouds(batch, self.device)

    def surface_variation(
        self, points: torch.Tensor, neighbours: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Surface variation [len(ks), N] of one cloud [N,3]."""
        if points.shape[0] < 2:
            return torch.zeros(len(self.ks), points.shape[0], device=points.device)
        return multiscale_surface_variation(points, self.ks, self.knn, neighbours)

    def _point_score(self, sv: torch.Tensor) -> torch.Tensor:
        if self.normalize == "scale":
            sv = (sv - self.mean_[:, None]) / self.std_[:, None]
        return sv.mean(0)

    @torch.no_grad()
    def fit(self, train: Iterable[Batch]) -> None:
        total = total_sq = None
        count = 0
        for batch in train:
            for points in self._clouds(batch):
                s = self.surface_variation(points).double()
                total = s.sum(1) if total is None else total + s.sum(1)
                total_sq = (s * s).sum(1) if total_sq is None else total_sq + (s * s).sum(1)
                count += s.shape[1]
        if not count:
            raise ValueError("curvature.fit got no valid training points")
        mean = total / count
        self.mean_ = mean.float()
        self.std_ = (total_sq / count - mean**2).clamp_min(1e-12).sqrt().float()

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if batch.points is not None:
            return self._predict_points(batch)
        scores = [self._point_score(self.surface_variation(p)) for p in self._clouds(batch)]
        maps = gaussian_blur(grid_maps(scores, batch.valid.to(self.device)), self.sigma)
        return Prediction(score=image_score(maps, self.score), anomaly_map=maps)

    def _predict_points(self, batch: Batch) -> Prediction:
        scores = []
        for points in self._clouds(batch):
            if self.point_smoothing > 1 and len(points) > 1:  # one kNN search for both
                k = min(max(*self.ks, self.point_smoothing), len(points))
                neighbours = knn_indices(points, k, self.knn)
                point = self._point_score(self.surface_variation(points, neighbours))
                point = point[neighbours[:, : self.point_smoothing]].mean(1)
            else:
                point = self._point_score(self.surface_variation(points))
            scores.append(point)
        object_scores = torch.stack([image_score(s[None], self.score)[0] for s in scores])
        return Prediction(score=object_scores, point_scores=scores)
