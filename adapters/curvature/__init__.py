"""``curvature``: multi-scale kNN surface variation per point (the CASL paper's baseline)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bench.detector import Detector
from bench.pointcloud import multiscale_surface_variation
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, image_score


@register_detector("curvature")
class Curvature(Detector):
    """Multi-scale kNN surface variation per point (the CASL paper's curvature baseline).

    Per valid point: its ``ks`` nearest neighbours (itself included), their covariance's
    eigenvalues l0 <= l1 <= l2 and the surface variation l0 / (l0 + l1 + l2) at each scale.

    ``normalize="scale"`` z-scores each scale by the mean and spread of the training clouds'
    points (so scales are comparable and typical structure of good parts scores low);
    ``"none"`` keeps the raw values. Scales are combined by their mean. Point scores go back to
    the organised grid (invalid points get the image's lowest score), are smoothed (Gaussian
    ``sigma``) and reduced to an image score (``score``: max or top-1% mean).
    """

    modality = "point_cloud"
    inference_amp = False  # covariance eigenvalues need full precision

    def __init__(
        self,
        ks: tuple[int, ...] = (16, 32, 64),
        normalize: str = "scale",
        sigma: float = 4.0,
        score: str = "max",
        knn: str = "auto",
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

    def point_scores(self, xyz: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        """Surface variation [len(ks), N_valid] of each cloud in xyz [B,3,H,W]."""
        out = []
        for cloud, ok in zip(xyz, valid):
            points = cloud.permute(1, 2, 0)[ok]
            if points.shape[0] < 2:
                out.append(torch.zeros(len(self.ks), points.shape[0], device=xyz.device))
                continue
            out.append(multiscale_surface_variation(points, self.ks, self.knn))
        return out

    @torch.no_grad()
    def fit(self, train: Iterable[Batch]) -> None:
        total = total_sq = None
        count = 0
        for batch in train:
            for sv in self.point_scores(batch.xyz.to(self.device), batch.valid.to(self.device)):
                s = sv.double()
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
        xyz, valid = batch.xyz.to(self.device), batch.valid.to(self.device)
        maps = torch.zeros(valid.shape, device=self.device)
        for i, sv in enumerate(self.point_scores(xyz, valid)):
            if self.normalize == "scale":
                sv = (sv - self.mean_[:, None]) / self.std_[:, None]
            point = sv.mean(0)
            if point.numel():
                maps[i] = point.min()  # invalid points: the lowest score of the image
                maps[i][valid[i]] = point
        maps = gaussian_blur(maps, self.sigma)
        return Prediction(score=image_score(maps, self.score), anomaly_map=maps)
