"""Small pieces several adapters share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.backbones import feature_stages, timm_problem, weights_problem
from bench.params import ParamError


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [B,H,W] maps as ``scipy.ndimage.gaussian_filter(map, sigma)``
    does it (the official PatchCore, PaDiM and DictAS smoothing): kernel radius
    ``int(truncate * sigma + 0.5)``, mode ``reflect`` (half-sample symmetric: the edge pixel is
    repeated, and the reflection continues when the radius exceeds the map)."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps[:, None]
    out = F.conv2d(_symmetric_pad(out, radius, -1), kernel.view(1, 1, 1, -1))
    out = F.conv2d(_symmetric_pad(out, radius, -2), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """``x`` padded by ``radius`` on both ends of ``dim`` with scipy's ``reflect`` rule
    (torch's own ``reflect`` leaves the edge pixel out, ``replicate`` repeats it only)."""
    n = x.shape[dim]
    index = torch.arange(-radius, n + radius, device=x.device) % (2 * n)
    index = torch.where(index >= n, 2 * n - 1 - index, index)
    return x.index_select(dim, index)


def point_clouds(batch, device: torch.device) -> list[torch.Tensor]:
    """The [N,3] points of each sample on ``device``: an unorganised batch's clouds, or an
    organised batch's valid grid points (row-major order)."""
    if batch.points is not None:
        return [p.to(device) for p in batch.points]
    xyz, valid = batch.xyz.to(device), batch.valid.to(device)
    return [cloud.permute(1, 2, 0)[ok] for cloud, ok in zip(xyz, valid)]


def grid_maps(scores: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Per-point scores back on the organised grid [B,H,W]; invalid points get the image's
    lowest score (zero when an image has no valid point)."""
    maps = torch.zeros(valid.shape, device=valid.device)
    for i, point in enumerate(scores):
        if point.numel():
            maps[i] = point.min()
            maps[i][valid[i]] = point
    return maps


def image_score(
    maps: torch.Tensor, reduction: str = "max", top_fraction: float = 0.01
) -> torch.Tensor:
    """Image score from [B,H,W] maps: the maximum, or the mean of the top ``top_fraction``."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(1).values
    if reduction == "topk":
        k = max(1, int(round(flat.shape[1] * top_fraction)))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"score reduction must be 'max' or 'topk', got {reduction!r}")


def patch_features(extractor: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Backbone stages averaged over 3x3 neighbourhoods (stride 1), the coarser upsampled
    bilinearly to the finest and concatenated: [B, sum of channels, h, w] float32."""
    maps = [F.avg_pool2d(m, 3, 1, 1) for m in extractor(image)]
    size = maps[0].shape[-2:]
    maps = [
        m
        if m.shape[-2:] == size
        else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.cat(maps, 1).float()


def check_timm_backbone(params: dict[str, Any], default: str) -> None:
    """Plan-time check of a CNN feature extractor's ``backbone`` (a timm name, offline),
    ``weights`` and ``layers`` (timm ``out_indices``: its feature stages, negative from the
    end), raising ParamError for the first that cannot work."""
    name, weights, layers = params["backbone"], params["weights"], params["layers"]
    problem = timm_problem(name, weights, default)
    if problem:
        raise ParamError.bad("backbone", name, problem)
    problem = weights_problem(weights)
    if problem:
        raise ParamError.bad("weights", weights, problem)
    stages = feature_stages(name)
    if stages is not None and any(not -stages <= i < stages for i in layers):
        raise ParamError.bad(
            "layers",
            layers,
            f"are not feature stages of {name} (0..{stages - 1}, or -{stages}..-1)",
        )
