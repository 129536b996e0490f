"""``grid_curvature``: surface variation on the organised grid, z-scored against normal scans."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from bench.detector import FIT_SCOPES, Detector
from bench.params import Range
from bench.registry import register_detector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, image_score


def surface_variation(
    xyz: torch.Tensor, valid: torch.Tensor, window: int = 5, min_points: int = 6
) -> torch.Tensor:
    """l0 / (l0 + l1 + l2) of the covariance of each point's ``window`` x ``window`` grid
    neighbourhood (valid points only); 0 where the point is invalid or has too few neighbours.

    xyz [B,3,H,W], valid [B,H,W] -> [B,H,W] in [0, 1/3].
    """
    b, _, h, w = xyz.shape
    pad = window // 2
    x = (xyz * valid[:, None]).double()
    m = valid[:, None].double()
    n = F.unfold(m, window, padding=pad).view(b, 1, -1, h * w)  # [B,1,K,HW]
    pts = F.unfold(x, window, padding=pad).view(b, 3, -1, h * w)
    count = n.sum(2).clamp_min(1)  # [B,1,HW]
    mean = (pts * n).sum(2) / count  # [B,3,HW]
    centred = (pts - mean[:, :, None]) * n
    cov = torch.einsum("bikn,bjkn->bnij", centred, centred) / count[:, 0, :, None, None]
    eig = torch.linalg.eigvalsh(cov).clamp_min(0)  # ascending
    variation = eig[..., 0] / eig.sum(-1).clamp_min(1e-30)
    ok = (count[:, 0] >= min_points) & valid.reshape(b, -1)
    return torch.where(ok, variation, 0.0).view(b, h, w).float()


@register_detector("grid_curvature")
class GridCurvature(Detector):
    """Surface variation over the organised grid's k x k neighbourhood (a simple 3D baseline).

    ``fit`` records the per-pixel mean and spread of the curvature of the normal training scans
    (after a max filter of ``tolerance`` pixels, so small pose changes do not count); the anomaly
    map is the positive excess over that envelope, smoothed; invalid points score 0 (lowest).
    """

    modality = "point_cloud"
    #: its fit uses whatever images it is given: every scope applies
    fit_scopes = FIT_SCOPES
    inference_amp = False  # covariance eigenvalues need full precision

    def __init__(
        self,
        window: Annotated[int, Range(ge=3)] = 5,
        tolerance: Annotated[int, Range(ge=0)] = 3,
        sigma: Annotated[float, Range(ge=0)] = 2.0,
        score: Literal["max", "topk"] = "max",
    ) -> None:
        self.window, self.tolerance, self.sigma, self.score = window, tolerance, sigma, score

    def _curvature(self, batch: Batch) -> torch.Tensor:
        return surface_variation(
            batch.xyz.to(self.device), batch.valid.to(self.device), self.window
        )

    @torch.no_grad()
    def fit(self, train: Iterable[Batch]) -> None:
        maps = []
        for batch in train:
            c = self._curvature(batch)
            k = 2 * self.tolerance + 1
            maps.append(F.max_pool2d(c[:, None], k, 1, self.tolerance)[:, 0].cpu())
        stack = torch.cat(maps)
        self.mean_ = stack.mean(0).to(self.device)
        self.std_ = (stack.std(0) + stack.std(0).mean() + 1e-6).to(self.device)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        c = self._curvature(batch)
        if c.shape[-2:] != self.mean_.shape:
            raise ValueError(
                f"grid size {tuple(c.shape[-2:])} differs from the training size {tuple(self.mean_.shape)}"
            )
        excess = ((c - self.mean_) / self.std_).clamp_min(0)
        excess = torch.where(batch.valid.to(self.device), excess, 0.0)
        maps = gaussian_blur(excess, self.sigma)
        return Prediction(score=image_score(maps, self.score), anomaly_map=maps)
