"""Dinomaly2's depth input on MVTec 3D-AD: an organised scan's z channel as a colour image.

The official preparation (``preprocess_mvtec3d_2.py`` and the RGB-D dataset of the Dinomaly2
code) fills the gaps of the z map with three passes of a 3 x 3 mean over the non-empty
neighbours, min-max normalises the filled map over its non-empty pixels, maps depth d to
1 - 0.8 d (near = bright; empty pixels 0), quantises to 8 bits (truncation) and applies
OpenCV's "hot" colour map (rebuilt here exactly, :func:`hot_table`); RGB pixels that stay empty are set to 0. Here the same steps run
batched in torch on the loader's grid, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums over each pixel's 3 x 3 window (zero padding) of [B, H, W] maps, as nine shifted
    additions in the input's dtype: a convolution would run in bf16 under autocast and in TF32
    on CUDA, far too coarse for millimetres at half a metre."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3))


def fill_gaps(z: torch.Tensor, filled: torch.Tensor, passes: int = 3):
    """``passes`` rounds of gap filling on [B, H, W] maps: each empty pixel with a non-empty
    3 x 3 neighbour takes the mean of its non-empty neighbours (values of the previous round).
    Returns the filled map and its non-empty mask (each pass grows regions by one pixel)."""
    z = torch.where(filled, z, 0)
    for _ in range(passes):
        total, count = box_sum(z), box_sum(filled.to(z.dtype))
        grow = ~filled & (count > 0)
        z = torch.where(grow, total / count.clamp_min(1), z)
        filled = filled | grow
    return z, filled


def depth_grey(z: torch.Tensor, valid: torch.Tensor, passes: int = 3):
    """8-bit grey levels [B, H, W] (as float) of the filled depth, and the filled mask: per
    image d = (z - min) / (max - min) over the filled pixels, level = trunc(255 (1 - 0.8 d)),
    empty pixels 0. An image without any valid pixel is all 0. Runs in float32, also under
    autocast."""
    with torch.autocast(z.device.type, enabled=False):
        return _depth_grey(z.float(), valid.bool(), passes)


def _depth_grey(z: torch.Tensor, valid: torch.Tensor, passes: int):
    z, filled = fill_gaps(z, valid, passes)
    big = torch.finfo(z.dtype).max
    low = torch.where(filled, z, big).flatten(1).amin(1)[:, None, None]
    high = torch.where(filled, z, -big).flatten(1).amax(1)[:, None, None]
    d = (z - low) / (high - low).clamp_min(torch.finfo(z.dtype).tiny)
    grey = torch.where(filled, (1 - 0.8 * d.clamp(0, 1)) * 255, 0).floor()
    return grey, filled


def hot_table() -> torch.Tensor:
    """OpenCV's COLORMAP_HOT as RGB in [0, 1], [256, 3], built as OpenCV builds it: a 64-entry
    table (red x / 0.4, green (x - 0.4) / 0.4, blue (x - 0.8) / 0.2, each clipped to [0, 1],
    at x = k / 63) linearly interpolated in float32 at 256 levels (both grids ``x0 + i *
    step``), times 255 rounded half to even. Equal to ``cv2.applyColorMap`` level for level
    (a test checks it): OpenCV is not a dependency of the detector."""
    f32 = torch.float32

    def grid(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=f32) * torch.tensor(1 / (n - 1), dtype=f32)

    k = torch.arange(64, dtype=torch.float64) / 63
    ramps = ((0.0, 0.4), (0.4, 0.4), (0.8, 0.2))
    table = torch.stack([((k - a) / w).clamp(0, 1) for a, w in ramps], 1).to(f32)
    x, xi = grid(64), grid(256)
    low = (torch.searchsorted(x, xi) - 1).clamp(0, 62)
    high = low + 1
    step = (xi - x[low])[:, None] * (table[high] - table[low]) / (x[high] - x[low])[:, None]
    return torch.round((table[low] + step) * 255) / 255


_HOT = hot_table()


def hot_colours(grey: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLORMAP_HOT of 8-bit grey levels [...] (integer-valued floats), as RGB in
    [0, 1] [..., 3] (:func:`hot_table`)."""
    table = _HOT.to(grey.device)
    return table[grey.clamp(0, 255).long()]


def rgb_and_depth(
    rgb: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, passes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two images Dinomaly2 encodes per scan, [B, 3, H, W] in [0, 1] each: the RGB image
    with its empty pixels (no depth after filling) set to 0, and the colourised depth."""
    grey, filled = depth_grey(z, valid, passes)
    depth = hot_colours(grey).permute(0, 3, 1, 2).to(rgb.dtype)
    return rgb * filled[:, None].to(rgb.dtype), depth
