"""PatchCore's patch embedding: locally aware patch features pooled to a fixed width.

For each backbone stage, every position's 3x3 neighbourhood (zero padding, stride 1) is flattened
channel-major (channel, row, column) and adaptive-average-pooled to ``pretrain_dim`` values; the
coarser stages are upsampled bilinearly to the finest grid; the stages are concatenated and the
result adaptive-average-pooled to ``target_dim``. This is what the official PatchCore computes with
``pretrain_embed_dimension`` and ``target_embed_dimension`` (1024 and 1024 in the paper). With a
wide_resnet50_2 it comes down to, per position: each layer-2 channel's 3x3 neighbourhood with the
centre counted twice (sum / 10), then each pair of layer-3 channels averaged over 3x3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: side of the neighbourhood each patch feature aggregates (the paper's p = 3)
PATCH_SIZE = 3


def _pool_channels(f: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, dim, h, w]: adaptive average pooling along the channel axis."""
    b, c, h, w = f.shape
    pooled = F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, c), dim)
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


def _neighbourhoods(f: torch.Tensor, dim: int, patch: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, dim, h, w]: each position's ``patch x patch`` neighbourhood, flattened
    channel-major, pooled to ``dim`` values (one image at a time, to bound the unfolded size)."""
    out = []
    for image in f.float().split(1):
        _, c, h, w = image.shape
        unfolded = F.unfold(image, patch, padding=(patch - 1) // 2)  # [1, C*p*p, h*w]
        out.append(_pool_channels(unfolded.view(1, c * patch * patch, h, w), dim))
    return torch.cat(out)


def patch_embedding(
    maps: Sequence[torch.Tensor],
    pretrain_dim: int,
    target_dim: int | None,
    patch: int = PATCH_SIZE,
) -> torch.Tensor:
    """PatchCore features [B, target_dim, h, w] on the grid of ``maps[0]`` (the finest stage)
    from backbone stages [B, C_l, h_l, w_l]; ``target_dim=None`` keeps the concatenation."""
    size = maps[0].shape[-2:]
    stages = []
    for m in maps:
        f = _neighbourhoods(m, pretrain_dim, patch)
        if f.shape[-2:] != size:  # pooling and bilinear resizing are linear: they commute
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        stages.append(f)
    f = torch.cat(stages, 1)
    return f if target_dim is None else _pool_channels(f, target_dim)
