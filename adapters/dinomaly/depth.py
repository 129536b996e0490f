"""Dinomaly2's depth input on MVTec 3D-AD: an organised scan's z channel as a colour image.

The official preparation (``preprocess_mvtec3d_2.py`` and the RGB-D dataset of the Dinomaly2
code) fills the gaps of the z map with three passes of a 3 x 3 mean over the non-empty
neighbours, min-max normalises the filled map over its non-empty pixels, maps depth d to
1 - 0.8 d (near = bright; empty pixels 0), quantises to 8 bits (truncation) and applies
OpenCV's "hot" colour map; RGB pixels that stay empty are set to 0. Here the same steps run
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


def hot_colours(grey: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLORMAP_HOT for 8-bit grey levels [...], as RGB in [0, 1] [..., 3]: red rises
    over the first 40% of the range, green over the next 40%, blue over the last 20%. The ramps'
    ends are fitted to OpenCV's table, which this follows within two of 255 levels (a test
    checks it against cv2): OpenCV is not a dependency of the detector."""
    x = grey / 255
    ramps = [(0.0, 0.401), (0.3985, 0.801), (0.798, 0.999)]
    return torch.stack([((x - a) / (b - a)).clamp(0, 1) for a, b in ramps], -1)


def rgb_and_depth(
    rgb: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, passes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two images Dinomaly2 encodes per scan, [B, 3, H, W] in [0, 1] each: the RGB image
    with its empty pixels (no depth after filling) set to 0, and the colourised depth."""
    grey, filled = depth_grey(z, valid, passes)
    depth = hot_colours(grey).permute(0, 3, 1, 2).to(rgb.dtype)
    return rgb * filled[:, None].to(rgb.dtype), depth
