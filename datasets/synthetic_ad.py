"""Deterministic generator of MVTec AD-layout image data with exact defect masks.

Two categories: ``weave`` (a woven texture) and ``washer`` (a metal ring on a dark
background, with pose jitter). Defects: scratch, spot, crack, hole. The same seed writes the
same bytes, so runs on the built-in data are comparable across machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import shapes

CATEGORIES = ("weave", "washer")
DEFECTS = ("scratch", "spot", "crack", "hole")
OBJECTS = {"washer"}


def _texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    theta = np.deg2rad(rng.normal(0, 2))
    period = rng.uniform(11, 12.5)
    u = cols * np.cos(theta) + rows * np.sin(theta)
    v = -cols * np.sin(theta) + rows * np.cos(theta)
    weave = np.sin(2 * np.pi * u / period + rng.uniform(0, 6.3)) * np.sin(
        2 * np.pi * v / period + rng.uniform(0, 6.3)
    )
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
    shade = 0.55 + 0.22 * weave + 0.12 * noise / noise.std()
    colour = np.array([0.62, 0.5, 0.34]) * rng.uniform(0.95, 1.05)
    image = shade[..., None] * colour * 1.3
    return image, np.ones((size, size), dtype=bool)


def _washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    cy, cx = size / 2 + rng.normal(0, 1.5, 2)
    r = np.hypot(rows - cy, cols - cx)
    outer, inner = 0.37 * size, 0.16 * size
    ring = (r <= outer) & (r >= inner)
    angle = np.arctan2(rows - cy, cols - cx)
    mid = (outer + inner) / 2
    bevel = 1 - ((r - mid) / (outer - inner) * 2) ** 2
    shine = 0.5 + 0.25 * bevel + 0.15 * np.cos(angle - rng.uniform(0.4, 0.8))
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 0.8) * 0.03
    background = 0.12 + ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 3) * 0.02
    shade = np.where(ring, shine + grain, background)
    image = shade[..., None] * np.array([0.92, 0.95, 1.0])
    return image, ring


def _defect(rng, image, support, defect, size, clean) -> np.ndarray:
    """Draws one defect on ``image`` in place; returns its exact mask."""
    ys, xs = np.nonzero(ndimage.binary_erosion(support, iterations=int(size * 0.04)))
    for _ in range(100):
        k = rng.integers(len(ys))
        centre = np.array([ys[k], xs[k]], dtype=float)
        if defect == "scratch":
            mask = shapes.stroke(
                image.shape[:2],
                shapes.curve(rng, centre, rng.uniform(0.15, 0.3) * size),
                rng.uniform(1.5, 2.5),
            )
        elif defect == "crack":
            mask = shapes.stroke(
                image.shape[:2],
                shapes.zigzag(rng, centre, rng.uniform(0.12, 0.22) * size),
                rng.uniform(1.2, 2.0),
            )
        elif defect == "spot":
            mask = shapes.blob(image.shape[:2], rng, centre, rng.uniform(0.025, 0.05) * size)
        else:
            mask = shapes.disc(image.shape[:2], centre, rng.uniform(0.025, 0.045) * size)
        mask &= support
        if mask.sum() >= 20:
            break
    if defect == "scratch":
        image[mask] = np.clip(image[mask] * 0.4 + 0.6 * rng.uniform(0.85, 1.0), 0, 1)
    elif defect == "crack":
        image[mask] *= rng.uniform(0.15, 0.3)
    elif defect == "spot":
        image[mask] = image[mask] * 0.35 + np.array([0.45, 0.25, 0.1]) * rng.uniform(0.8, 1.2)
    else:  # hole: material missing; the texture shows a dark void, the object its background
        image[mask] = clean[mask] if clean is not None else 0.04
    return mask


def _render(category: str, rng: np.random.Generator, size: int):
    if category == "weave":
        return _texture(rng, size) + (None,)
    image, ring = _washer(rng, size)
    background = np.full_like(image, 0.12)
    return image, ring, background


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=1)


def generate(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    size: int = 256,
    n_train: int = 40,
    n_test_good: int = 12,
    n_per_defect: int = 6,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train,test,ground_truth}`` exactly as MVTec AD lays it out."""
    root = Path(root)
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(f"unknown built-in 2D category {category!r}; choose from {CATEGORIES}")
        rng = np.random.default_rng([seed, ci])
        base = root / category
        plan = [("train", "good", i) for i in range(n_train)]
        plan += [("test", "good", i) for i in range(n_test_good)]
        plan += [("test", d, i) for d in DEFECTS for i in range(n_per_defect)]
        for split, defect, i in plan:
            image, support, clean = _render(category, rng, size)
            name = f"{i:03d}"
            if defect != "good":
                mask = _defect(rng, image, support, defect, size, clean)
                _save_png(
                    base / "ground_truth" / defect / f"{name}_mask.png", mask.astype(np.uint8) * 255
                )
            pixels = (
                np.clip(image * 255 + rng.normal(0, 1.0, image.shape), 0, 255)
                .round()
                .astype(np.uint8)
            )
            _save_png(base / split / defect / f"{name}.png", pixels)
    return root
