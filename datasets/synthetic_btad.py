"""Deterministic generator of BTAD-layout image data with exact defect masks.

Three products named as BTAD's, each stored with the release's file types: ``01`` (a woven
texture; bmp images, png masks), ``02`` (a metal ring; png images and masks) and ``03`` (a
circuit board, not square; bmp images and masks). Normal images are ``ok``, anomalous ones
``ko`` with one of the defects of :mod:`.synthetic_ad`; masks store 255. The same seed writes
the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .synthetic_ad import DEFECTS, _defect, _texture, _washer
from .synthetic_folder import save_image, save_mask
from .synthetic_visa import _pcb

#: category -> (image suffix, mask suffix, (height, width))
CATEGORIES = {
    "01": (".bmp", ".png", (128, 128)),
    "02": (".png", ".png", (96, 96)),
    "03": (".bmp", ".bmp", (96, 128)),
}


def _render(category: str, rng: np.random.Generator, shape: tuple[int, int]):
    """(image, defect support, what a hole shows) of one product."""
    if category == "01":
        image, support = _texture(rng, shape[0])
        return image, support, None
    if category == "02":
        image, ring = _washer(rng, shape[0])
        return image, ring, np.full_like(image, 0.12)
    return _pcb(rng, shape)


def generate(
    root: str | Path,
    categories: tuple[str, ...] = tuple(CATEGORIES),
    n_train: int = 30,
    n_test_good: int = 10,
    n_anomaly: int = 12,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train/ok,test/ok,test/ko,ground_truth/ko}`` as BTAD does."""
    root = Path(root)
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in BTAD category {category!r}; choose from {CATEGORIES}"
            )
        suffix, mask_suffix, shape = CATEGORIES[category]
        rng = np.random.default_rng([seed, ci])
        base = root / category
        plan = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test_good)]
        for split, i in plan:
            image, _, _ = _render(category, rng, shape)
            save_image(base / split / "ok" / f"{i:04d}{suffix}", image, rng)
        for i in range(n_anomaly):
            image, support, clean = _render(category, rng, shape)
            mask = _defect(rng, image, support, DEFECTS[i % len(DEFECTS)], min(shape), clean)
            if not mask.any():
                raise RuntimeError(f"{category}: no room for a defect in anomaly {i}")
            save_image(base / "test" / "ko" / f"{i:04d}{suffix}", image, rng)
            save_mask(base / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}", mask)
    return root
