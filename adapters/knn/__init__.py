"""``knn``: nearest-neighbour patch distance to a coreset memory bank (PatchCore lineage)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench.backbones import create_backbone, normalize
from bench.capabilities import TypeDiscovery
from bench.detector import FIT_SCOPES, Detector
from bench.params import NonEmpty, Range
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import check_timm_backbone, gaussian_blur, image_score
from .aggregation import patch_embedding
from .coreset import coreset_projection, greedy_coreset, random_projection, start_distances
from .neighbours import nearest

#: PatchCore's backbone (ImageNet weights from the hub)
PAPER_BACKBONE = "wide_resnet50_2"


@register_detector("knn")
class KNNPatchDistance(Detector, TypeDiscovery):
    """PatchCore's kNN scoring, as the official code computes it: the anomaly of a patch is its
    squared distance to the nearest patch of a greedy-coreset memory bank of training patches.

    Features (``aggregation.patch_embedding``): for each backbone stage of ``layers``, every
    position's 3x3 neighbourhood pooled to ``pretrain_embed_dim`` values, the coarser stage
    upsampled to the finer, both pooled together to ``embed_dim``; optionally randomly projected
    to ``projection_dim`` (not in PatchCore). ``coreset_ratio`` of the training patches are kept
    by greedy k-center on a ``coreset_projection``-dimensional linear projection, every point
    starting at its mean distance to ``coreset_starts`` random points. Patch score: the squared
    L2 distance to the nearest bank entry (``squared=False``: the L2 distance, as the paper's text
    and anomalib). The map is the patch scores upsampled bilinearly to the input and smoothed
    (Gaussian ``sigma``); the image score is the largest patch score (``score="max"``), the mean
    of the top 1% of the map (``"topk"``), or with ``reweight=True`` the largest patch score
    times the paper's neighbourhood weight over ``num_neighbors`` bank entries (eq. 7, as
    anomalib computes it; not in the official code).

    ``discover_types``: after scoring, cluster the defective test images into anomaly types
    (``bench.discovery``): ``n_types`` clusters, None = as many as defect folders, 0 = estimated.
    """

    modality = "image"
    resampling = "pil-bilinear"  # PatchCore's loader: torchvision Resize on PIL images
    #: its fit uses whatever images it is given: every scope applies
    fit_scopes = FIT_SCOPES
    #: the pretrained backbone, rebuilt from the parameters (older fitted states saved it)
    frozen = ("extractor",)
    dropped_state = ("extractor_",)

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        weights: str = "pretrained",
        layers: Annotated[tuple[int, ...], NonEmpty] = (2, 3),  # timm out_indices (<0: from end)
        pretrain_embed_dim: Annotated[int, Range(ge=1)] = 1024,
        embed_dim: Annotated[int, Range(ge=1)] | None = 1024,
        projection_dim: Annotated[int, Range(ge=1)] | None = None,
        coreset_ratio: Annotated[float, Range(gt=0, le=1)] = 0.1,
        coreset_projection: Annotated[int, Range(ge=1)] | None = 128,
        coreset_starts: Annotated[int, Range(ge=1)] = 10,
        squared: bool = True,
        sigma: Annotated[float, Range(ge=0)] = 4.0,
        score: Literal["max", "topk"] = "max",
        reweight: bool = False,
        num_neighbors: Annotated[int, Range(ge=1)] = 9,
        max_pairs: Annotated[int, Range(ge=1)] = 1 << 24,
        discover_types: bool = True,
        n_types: Annotated[int, Range(ge=0)] | None = None,  # 0: estimated
        seed: int = 0,
    ) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.backbone, self.weights, self.layers = backbone, weights, tuple(layers)
        self.pretrain_embed_dim, self.embed_dim = pretrain_embed_dim, embed_dim
        self.projection_dim = projection_dim
        self.coreset_ratio, self.coreset_projection = coreset_ratio, coreset_projection
        self.coreset_starts, self.squared = coreset_starts, squared
        self.sigma, self.score, self.reweight = sigma, score, reweight
        self.num_neighbors, self.max_pairs, self.seed = num_neighbors, max_pairs, seed
        self.discover_types, self.n_types = discover_types, n_types
        self.extractor = create_backbone(backbone, weights, self.layers)

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """The backbone, its weights and its feature stages known to timm (offline)."""
        check_timm_backbone(params, PAPER_BACKBONE)

    @classmethod
    def substitutes(cls, params: dict) -> list[str]:
        backbone, weights = params.get("backbone", PAPER_BACKBONE), params.get("weights")
        if weights == "random":
            return [
                f"backbone {backbone} with random weights, not the paper's pretrained {PAPER_BACKBONE}"
            ]
        if backbone != PAPER_BACKBONE:
            return [f"backbone {backbone} (ImageNet), not the paper's {PAPER_BACKBONE}"]
        return []

    # -- features ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch features [B, C, h, w] of images [B, 3, H, W] in [0, 1]."""
        maps = self.extractor(normalize(image))
        f = patch_embedding(maps, self.pretrain_embed_dim, self.embed_dim)
        if self.projection_dim is not None:
            b, c, h, w = f.shape
            flat = random_projection(
                f.permute(0, 2, 3, 1).reshape(-1, c), self.projection_dim, self.seed + 1
            )
            f = flat.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return f.contiguous()

    # -- fit -----------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, train: Iterable[Batch]) -> None:
        bank = [
            self.embed(batch.image.to(self.device)).permute(0, 2, 3, 1).flatten(0, 2)
            for batch in train
        ]
        if not bank:
            raise ValueError("knn.fit got no training images")
        patches = torch.cat(bank)
        n = max(1, int(self.coreset_ratio * patches.shape[0]))  # as PatchCore and anomalib
        if n < patches.shape[0]:
            gen = torch.Generator().manual_seed(self.seed)
            starts = torch.randperm(patches.shape[0], generator=gen)[: self.coreset_starts]
            patches = patches[self.coreset(patches, n, starts).to(patches.device)]
        self.bank_ = patches.contiguous()
        self.n_train_patches_ = torch.tensor(sum(len(b) for b in bank))

    def coreset(self, patches: torch.Tensor, n: int, starts: torch.Tensor) -> torch.Tensor:
        """Indices of the ``n`` patches PatchCore's sampler keeps: greedy k-center on the
        coreset projection, every point starting at its mean distance to the ``starts``."""
        points = coreset_projection(patches, self.coreset_projection, self.seed)
        initial = start_distances(points, starts.to(points.device)).cpu()
        return greedy_coreset(points, n, seed=self.seed, initial=initial)

    # -- predict -------------------------------------------------------------------------------
    @torch.no_grad()
    def patch_scores(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(patch scores [B, h, w], nearest bank entries [B, h*w], patch features [B, h*w, C])
        of images [B, 3, H, W] in [0, 1]."""
        f = self.embed(image)
        b, c, h, w = f.shape
        queries = f.permute(0, 2, 3, 1).reshape(-1, c).float()
        with torch.autocast(self.device.type, enabled=False):  # |q|^2 - 2 q.b + |b|^2 in fp32
            dist, nn_idx = nearest(queries, self.bank_.float(), self.max_pairs, self.squared)
        return dist.view(b, h, w), nn_idx.view(b, -1), queries.view(b, h * w, c)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        image = batch.image.to(self.device)
        patch, nn_idx, queries = self.patch_scores(image)
        maps = F.interpolate(
            patch[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        maps = gaussian_blur(maps, self.sigma)
        if self.reweight:
            score = self._reweighted(queries, patch.flatten(1), nn_idx)
        elif self.score == "max":  # the official image score: before upsampling and blur
            score = patch.flatten(1).amax(1)
        else:
            score = image_score(maps, self.score)
        return Prediction(score=score, anomaly_map=maps)

    # -- anomaly-type discovery (bench.discovery) ------------------------------------------------
    @torch.no_grad()
    def describe_regions(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One embedding per image: its patch features averaged with the anomalous region
        (resized to the feature grid) as weights; an empty region gives the image average."""
        out = []
        for i in range(0, len(images), 8):
            f = self.embed(images[i : i + 8].to(self.device))
            region = masks[i : i + 8, None].float().to(self.device)
            weight = F.interpolate(region, size=f.shape[-2:], mode="area") + 1e-6
            out.append((f * weight).sum((2, 3)) / weight.sum((2, 3)))
        return torch.cat(out)

    def _reweighted(self, queries, scores, nn_idx) -> torch.Tensor:
        """PatchCore's reweighted image score (paper eq. 7, as anomalib computes it): the
        largest patch score s*, scaled by 1 - the softmax weight of its nearest bank entry m*
        among m*'s ``num_neighbors`` nearest bank entries, over L2 distances to the patch (a
        patch far from a sparse part of the bank counts less)."""
        top = scores.argmax(1)
        rows = torch.arange(scores.shape[0], device=scores.device)
        s_star, m_star = scores[rows, top], self.bank_[nn_idx[rows, top]]
        q_star = queries[rows, top]
        k = min(self.num_neighbors, self.bank_.shape[0])
        neighbours = torch.cdist(m_star, self.bank_).topk(k, largest=False).indices
        d = torch.linalg.vector_norm(q_star[:, None] - self.bank_[neighbours], dim=-1)
        weight = 1 - torch.softmax(d, dim=1)[:, 0]
        return weight * s_star
