"""``knn``: nearest-neighbour patch distance to a coreset memory bank (PatchCore lineage)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from bench.backbones import create_backbone, normalize
from bench.detector import FIT_SCOPES, Detector
from bench.params import Range
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, image_score, patch_features
from .coreset import greedy_coreset, random_projection
from .neighbours import nearest

#: PatchCore's backbone (ImageNet weights from the hub)
PAPER_BACKBONE = "wide_resnet50_2"


@register_detector("knn")
class KNNPatchDistance(Detector):
    """PatchCore-style kNN scoring: the anomaly of a patch is its distance to the nearest patch
    of a greedy-coreset memory bank built from the training images.

    Features: the backbone stages ``layers``, each averaged over 3x3 neighbourhoods, the coarser
    upsampled to the finer and concatenated, then channel-pooled to ``embed_dim`` (only when
    wider) and optionally randomly projected to ``projection_dim``. ``coreset_ratio`` of the
    training patches are kept by greedy k-center on a ``coreset_projection``-dimensional random
    projection. The map is upsampled to the input and smoothed (Gaussian ``sigma``); the image
    score is the map's maximum, or PatchCore's neighbourhood-reweighted maximum patch distance
    (``reweight=True``, ``num_neighbors`` bank entries).

    ``discover_types``: after scoring, cluster the defective test images into anomaly types
    (``bench.discovery``): ``n_types`` clusters, None = as many as defect folders, 0 = estimated.
    """

    modality = "image"
    #: its fit uses whatever images it is given: every scope applies
    scopes = FIT_SCOPES

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        weights: str = "pretrained",
        layers: tuple[int, ...] = (2, 3),  # timm out_indices (negative: from the end)
        embed_dim: Annotated[int, Range(ge=1)] | None = 1024,
        projection_dim: Annotated[int, Range(ge=1)] | None = None,
        coreset_ratio: Annotated[float, Range(gt=0, le=1)] = 0.1,
        coreset_projection: Annotated[int, Range(ge=1)] | None = 128,
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
        self.embed_dim, self.projection_dim = embed_dim, projection_dim
        self.coreset_ratio, self.coreset_projection = coreset_ratio, coreset_projection
        self.sigma, self.score, self.reweight = sigma, score, reweight
        self.num_neighbors, self.max_pairs, self.seed = num_neighbors, max_pairs, seed
        self.discover_types, self.n_types = discover_types, n_types
        self.extractor_ = create_backbone(backbone, weights, self.layers)

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
        f = patch_features(self.extractor_, normalize(image))
        b, c, h, w = f.shape
        if self.embed_dim is not None and c > self.embed_dim:
            f = F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, c), self.embed_dim)
            f = f.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
        if self.projection_dim is not None:
            flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            flat = random_projection(flat, self.projection_dim, self.seed + 1)
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
            points = random_projection(patches, self.coreset_projection, self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            start = int(torch.randint(patches.shape[0], (1,), generator=gen))
            patches = patches[greedy_coreset(points, n, start, seed=self.seed).to(self.device)]
        self.bank_ = patches.contiguous()
        self.n_train_patches_ = torch.tensor(sum(len(b) for b in bank))

    # -- predict -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        image = batch.image.to(self.device)
        f = self.embed(image)
        b, _, h, w = f.shape
        queries = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float()
        with torch.autocast(self.device.type, enabled=False):  # |q|^2 - 2 q.b + |b|^2 in fp32
            dist, nn_idx = nearest(queries, self.bank_.float(), self.max_pairs)
        patch = dist.view(b, h, w)
        maps = F.interpolate(
            patch[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        maps = gaussian_blur(maps, self.sigma)
        if self.reweight:
            score = self._reweighted(
                queries.view(b, h * w, -1), dist.view(b, -1), nn_idx.view(b, -1)
            )
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

    def _reweighted(self, queries, dist, nn_idx) -> torch.Tensor:
        """PatchCore's image score: the largest patch distance s*, scaled by
        1 - softmax weight of its nearest bank entry m* among m*'s ``num_neighbors`` nearest
        bank entries (a patch far from a sparse part of the bank counts less)."""
        top = dist.argmax(1)
        rows = torch.arange(dist.shape[0], device=dist.device)
        s_star, m_star = dist[rows, top], self.bank_[nn_idx[rows, top]]
        q_star = queries[rows, top]
        k = min(self.num_neighbors, self.bank_.shape[0])
        neighbours = torch.cdist(m_star, self.bank_).topk(k, largest=False).indices
        d = torch.linalg.vector_norm(q_star[:, None] - self.bank_[neighbours], dim=-1)
        weight = 1 - torch.softmax(d, dim=1)[:, 0]
        return weight * s_star
