"""Dinomaly's loose reconstruction: groups of layers, global cosine, hard-point mining."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mining_fraction(step: int, final: float = 0.9, ramp: int = 1000) -> float:
    """The share p of easy points whose gradient is damped: linear 0 -> ``final`` over ``ramp``
    steps, then ``final``."""
    return min(final * step / ramp, final) if ramp > 0 else final


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is: the loss and maps never run in bf16 / fp16."""
    return x if x.dtype == torch.float64 else x.float()


def global_cosine_hard_mining(
    encoder: list[torch.Tensor], decoder: list[torch.Tensor], p: float, factor: float
) -> torch.Tensor:
    """Mean over groups of (1 - cosine between each image's whole flattened encoder and decoder
    maps), averaged over the batch. The points whose distance 1 - cos (over channels) is below
    the k-th largest of the whole batch, k = int(n (1 - p)), get their decoder gradient scaled
    by ``factor`` (the official ``global_cosine_hm_percent``). Maps are [B, C, h, w]."""
    total = torch.zeros((), device=decoder[0].device)
    for target, output in zip(encoder, decoder):
        target, output = at_least_float32(target.detach()), at_least_float32(output)
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(target, output, dim=1)  # [B, h, w]
            k = int(distance.numel() * (1 - p))
            easy = (
                distance < distance.flatten().topk(k).values[-1]
                if 0 < k
                else torch.ones_like(distance, dtype=torch.bool)
            )
        total = total + (1 - F.cosine_similarity(target.flatten(1), output.flatten(1))).mean()
        if output.requires_grad:
            weight = torch.where(easy, factor, 1.0)[:, None].to(output.dtype)
            output.register_hook(lambda grad, weight=weight: grad * weight)
    return total / len(encoder)


def anomaly_maps(
    encoder: list[torch.Tensor],
    decoder: list[torch.Tensor],
    input_size: tuple[int, int],
    map_size: tuple[int, int] | None,
    kernel: int = 5,
    sigma: float = 4.0,
) -> torch.Tensor:
    """Per group 1 - cosine per token, upsampled to the input (bilinear, align_corners=True),
    averaged over groups, resized to ``map_size`` (bilinear) and smoothed by a ``kernel`` x
    ``kernel`` Gaussian with zero padding (the official evaluation). Returns [B, H, W]."""
    maps = [
        F.interpolate(
            (1 - F.cosine_similarity(at_least_float32(a), at_least_float32(b), dim=1))[:, None],
            size=input_size,
            mode="bilinear",
            align_corners=True,
        )
        for a, b in zip(encoder, decoder)
    ]
    out = torch.cat(maps, 1).mean(1, keepdim=True)
    if map_size is not None and tuple(map_size) != tuple(input_size):
        out = F.interpolate(out, size=map_size, mode="bilinear", align_corners=False)
    if kernel > 1 and sigma > 0:
        weights = gaussian_kernel(kernel, sigma, out.device).to(out.dtype)
        out = F.conv2d(out, weights, padding=kernel // 2)
    return out[:, 0]


def gaussian_kernel(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """A normalised size x size Gaussian [1, 1, size, size] centred at (size - 1) / 2."""
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum())[None, None]


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Image score: the mean of the int(n * ``fraction``) highest pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(1)
