"""DictAS's training data (Qu et al., ICCV 2025) on image batches already on a device.

Queries get DRAEM-style synthetic anomalies (a thresholded, rotated Perlin-noise mask filled with
an augmented texture, imgaug 0.4.0 semantics); references are augmented copies of the clean images
(the official albumentations 1.3.1 pipeline). Images are float [B, 3, H, W] in [0, 1]; every
random number is drawn on the CPU from the ``torch.Generator`` passed in, so results are
reproducible and independent of the global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

BATCH_TEXTURES = "batch"
"""Texture source without a texture folder: square crops of OTHER images of the same batch,
resized to the full image, standing in for the paper's DTD textures."""
TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _uniform_vector(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], both included."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def rotate(images: Tensor, degrees: Tensor | float, padding: str = "reflection") -> Tensor:
    """Rotate [B, C, H, W] about the image centre by ``degrees`` (a number or one per image);
    positive is counter-clockwise, as OpenCV/albumentations: +90 equals torch.rot90(k=1,
    dims=(-2, -1)) on a square image. Bilinear; the geometry is OpenCV's (pixel centres,
    align_corners=True), so ``padding="reflection"`` is cv2.BORDER_REFLECT_101 and ``"zeros"``
    a constant 0 border."""
    b, _, h, w = images.shape
    angle = torch.as_tensor(degrees, dtype=torch.float64).detach().cpu().flatten().expand(b)
    c, s = torch.deg2rad(angle).cos(), torch.deg2rad(angle).sin()
    sx, sy = max(w - 1, 1), max(h - 1, 1)  # pixel units per normalised unit, times 2
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = c, -s * sy / sx
    theta[:, 1, 0], theta[:, 1, 1] = s * sx / sy, c
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, "bilinear", padding_mode=padding, align_corners=True)


def _lattice(n: int, res: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """Cell index and position in the cell of the first ``n`` pixels of a side padded to a
    multiple of ``res`` cells."""
    padded = -(-n // res) * res
    pos = torch.arange(n, device=device) * res
    return pos // padded, (pos % padded).float() / padded


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """DRAEM's rand_perlin_2d [H, W]: random unit gradients on a (res_y + 1, res_x + 1) lattice,
    fade 6t^5 - 15t^4 + 10t^3, times sqrt(2) (so within [-1, 1]); sizes not divisible by ``res``
    are computed on the next multiple and cropped."""
    angles = 2 * math.pi * torch.rand(res[0] + 1, res[1] + 1, generator=generator)
    grads = torch.stack((angles.cos(), angles.sin()), -1).to(device)
    (iy, fy), (ix, fx) = _lattice(shape[0], res[0], device), _lattice(shape[1], res[1], device)

    def dot(dy: int, dx: int) -> Tensor:
        g = grads[iy + dy][:, ix + dx]
        return g[..., 0] * (fy - dy)[:, None] + g[..., 1] * (fx - dx)[None, :]

    fade = lambda t: t**3 * (t * (6 * t - 15) + 10)  # noqa: E731
    ty, tx = fade(fy)[:, None], fade(fx)[None, :]
    bottom, top = torch.lerp(dot(0, 0), dot(1, 0), ty), torch.lerp(dot(0, 1), dot(1, 1), ty)
    return math.sqrt(2) * torch.lerp(bottom, top, tx)


def _perlin_mask(images: Tensor, g: torch.Generator, threshold: float) -> Tensor:
    """The official mask [1, H, W]: Perlin noise at resolution (2^a, 2^b), a, b in {1, 2},
    rotated by U[-90, 90] degrees with zero fill, > ``threshold``."""
    res = (2 ** _randint(g, 1, 2), 2 ** _randint(g, 1, 2))
    noise = perlin_noise(images.shape[-2:], res, g, images.device).to(images.dtype)
    noise = rotate(noise[None, None], _uniform(g, -90, 90), padding="zeros")[0]
    return (noise > threshold).to(images.dtype)


# -- texture augmentations: imgaug's 10 of the official code on [3, H, W] floats in [0, 1] -------
def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _gamma(x: Tensor, g: torch.Generator) -> Tensor:
    """GammaContrast((0.5, 2.0), per_channel=True)."""
    return x.clamp(0, 1) ** (0.5 + 1.5 * torch.rand(3, 1, 1, generator=g)).to(x)


def _brightness(x: Tensor, g: torch.Generator) -> Tensor:
    """MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): on YCrCb's luma, in random
    order; shifting R, G and B by the luma change keeps Cr and Cb."""
    mul, add = _uniform(g, 0.8, 1.2), _randint(g, -30, 30) / 255
    luma = (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    new = luma * mul + add if _uniform(g, 0, 1) < 0.5 else (luma + add) * mul
    return x + (new - luma)


def _hue_saturation(x: Tensor, g: torch.Generator) -> Tensor:
    """AddToHueAndSaturation((-50, 50), per_channel=True): hue + h/255 of a turn, HSV saturation
    + s/255 (h, s independent integers); value (max channel) and hue stay."""
    hue, sat = _randint(g, -50, 50) / 255, _randint(g, -50, 50) / 255
    x = x.clamp(0, 1)
    v = x.amax(0)
    s = (v - x.amin(0)) / v.clamp_min(1e-8)
    scale = torch.where(s > 0, (s + sat).clamp(0, 1) / s.clamp_min(1e-8), 1.0)
    return TF.adjust_hue(v - (v - x) * scale, hue)


def _solarize(x: Tensor, g: torch.Generator) -> Tensor:
    """Solarize(0.5, threshold=(32, 128))."""
    threshold = _uniform(g, 32, 128) / 255
    return TF.solarize(x.clamp(0, 1), threshold) if _uniform(g, 0, 1) < 0.5 else x


def _autocontrast(x: Tensor, g: torch.Generator) -> Tensor:
    """pillike.Autocontrast(cutoff=(0, 20)): per channel, c% of the darkest and of the lightest
    pixels are cut off before stretching to [0, 1]."""
    cut = _randint(g, 0, 20) / 100
    flat = x.flatten(1).float()
    lo, hi = torch.quantile(flat, flat.new_tensor([cut, 1 - cut]), dim=1)[:, :, None, None]
    span = (hi - lo).to(x)
    return torch.where(span > 0, (x - lo.to(x)) / span.clamp_min(1e-8), x)


_TEXTURE_OPS: tuple[Callable[[Tensor, torch.Generator], Tensor], ...] = (
    _gamma,
    _brightness,
    lambda x, g: TF.adjust_sharpness(x.clamp(0, 1), _uniform(g, 0, 2)),  # EnhanceSharpness()
    _hue_saturation,
    _solarize,
    lambda x, g: TF.posterize(_to_uint8(x), _randint(g, 1, 8)).to(x) / 255,  # Posterize()
    lambda x, g: 1 - x,  # Invert()
    _autocontrast,
    lambda x, g: TF.equalize(_to_uint8(x)).to(x) / 255,  # pillike.Equalize()
    lambda x, g: rotate(x[None], _uniform(g, -45, 45), padding="zeros")[0],  # Affine(rotate)
)


def augment_texture(texture: Tensor, generator: torch.Generator) -> Tensor:
    """3 distinct augmentations of the 10, applied in the drawn order; result in [0, 1]."""
    for op in torch.randperm(len(_TEXTURE_OPS), generator=generator)[:3].tolist():
        texture = _TEXTURE_OPS[op](texture, generator).clamp(0, 1)
    return texture


class TextureFolder:
    """Texture images for the anomalies (the paper: DTD, ``<folder>/*/*.jpg``): every *.jpg,
    *.jpeg and *.png in ``path`` or its subfolders, sorted."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = (f for f in self.path.rglob("*") if f.suffix.lower() in TEXTURE_SUFFIXES)
        self.files = sorted(f for f in files if f.is_file())
        if not self.files:
            raise FileNotFoundError(f"no texture images (*.jpg, *.jpeg, *.png) in {self.path}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, size: tuple[int, int]) -> Tensor:
        """Image ``index`` as RGB [3, H, W] floats in [0, 1], resized (bilinear, antialiased)."""
        with Image.open(self.files[index]) as image:
            rgb = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


def _batch_texture(images: Tensor, i: int, g: torch.Generator) -> Tensor:
    """A random square crop (side U[min(H, W)/4, min(H, W)/2]) of another image of the batch
    (image i flipped both ways when B == 1), resized to H x W."""
    b, _, h, w = images.shape
    source = images[(i + 1 + _randint(g, 0, b - 2)) % b] if b > 1 else images[i].flip(-2, -1)
    side = _randint(g, max(1, min(h, w) // 4), max(1, min(h, w) // 2))
    top, left = _randint(g, 0, h - side), _randint(g, 0, w - side)
    crop = source[None, :, top : top + side, left : left + side]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]


def synthesize_anomalies(
    images: Tensor,
    generator: torch.Generator,
    p: float = 0.3,
    textures: TextureFolder | None = None,
    threshold: float = 0.5,
    max_beta: float = 0.8,
) -> tuple[Tensor, Tensor, Tensor]:
    """DRAEM-style anomalies on each query with probability ``p``: with the Perlin mask m, the
    augmented texture t and beta ~ U[0, max_beta), out = x (1 - m) + (1 - beta) t m + beta x m.
    Textures come from ``textures`` or, when None, from the batch itself (BATCH_TEXTURES).
    Returns (images [B, 3, H, W], masks [B, 1, H, W] 0/1, labels [B] long: 1 iff the mask is
    non-empty); the input is not modified."""
    b, _, h, w = images.shape
    out, masks = images.clone(), images.new_zeros(b, 1, h, w)
    chosen = torch.rand(b, generator=generator) < p
    for i in chosen.nonzero().flatten().tolist():
        mask = _perlin_mask(images, generator, threshold)
        if textures is None:
            texture = _batch_texture(images, i, generator)
        else:
            index = _randint(generator, 0, len(textures) - 1)
            texture = textures.load(index, (h, w)).to(images.device, images.dtype)
        texture = augment_texture(texture, generator)
        beta = _uniform(generator, 0, max_beta)
        out[i] = torch.where(mask > 0, (1 - beta) * texture + beta * images[i], images[i])
        masks[i] = mask
    return out, masks, (masks.flatten(1).amax(1) > 0).long()


def _dropout_keep(images: Tensor, grid: Tensor, coarse: Tensor, g: torch.Generator) -> Tensor:
    """Keep mask [B, 1, H, W] of albumentations 1.3.1's GridDropout(ratio=0.3) (cells of
    max(2, W // 10) px, holes of 0.3 of a cell at offset 0) and CoarseDropout(max_holes=8,
    max_height=32, max_width=32) (8 holes of 32 px at 1024 px, scaled to H and W)."""
    b, _, h, w = images.shape
    keep = torch.ones(b, 1, h, w, dtype=torch.bool)
    unit_w = max(2, w // 10)
    unit_h = max(min(unit_w, h), 2)
    hole_w, hole_h = (min(max(int(u * 0.3), 1), u - 1) for u in (unit_w, unit_h))
    cells = (torch.arange(h) % unit_h < hole_h)[:, None] & (torch.arange(w) % unit_w < hole_w)
    keep[grid] &= ~cells
    size_h, size_w = max(1, h * 32 // 1024), max(1, w * 32 // 1024)
    for i in coarse.nonzero().flatten().tolist():
        for _ in range(8):
            y, x = _randint(g, 0, h - size_h), _randint(g, 0, w - size_w)
            keep[i, :, y : y + size_h, x : x + size_w] = False
    return keep.to(images.device)


def augment_references(images: Tensor, generator: torch.Generator, p: float = 0.9) -> Tensor:
    """The official reference augmentation, applied to each image with probability ``p``:
    RandomRotate90, Rotate(U[30, 270] degrees, reflect-101 border), horizontal and vertical flips
    (p 0.5 each), GridDropout(ratio=0.3, p=0.5), CoarseDropout(8 holes, p=0.5). The 90-degree
    rotation and the rotation are applied as one rotation by 90 k + angle (the same on square
    images; non-square images keep their shape). The input is not modified."""
    b, g = images.shape[0], generator
    apply = torch.rand(b, generator=g) < p
    angle = 90 * torch.randint(4, (b,), generator=g) + _uniform_vector(g, b, 30, 270)
    hflip, vflip, grid, coarse = (torch.rand(4, b, generator=g) < 0.5) & apply
    out = rotate(images, angle)
    out = torch.where(hflip.to(images.device)[:, None, None, None], out.flip(-1), out)
    out = torch.where(vflip.to(images.device)[:, None, None, None], out.flip(-2), out)
    out = out * _dropout_keep(images, grid, coarse, g)
    return torch.where(apply.to(images.device)[:, None, None, None], out, images)
