"""Deterministic generator of MPDD-layout image data (MVTec AD's layout) with exact masks.

Two categories named as MPDD's, with its defect folder names: ``bracket_black`` (a dark metal
ring on a dark background; ``hole``, ``scratches``) and ``metal_plate`` (a grey brushed texture;
``major_rust``, ``scratch``), drawn as the defects of :mod:`.synthetic_ad` (hole, scratch,
spot). Masks are ``ground_truth/<defect>/<id>_mask.png`` storing 255. The same seed writes the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .synthetic_ad import _defect, _texture, _washer
from .synthetic_folder import save_image, save_mask

#: category -> {MPDD defect folder: the synthetic_ad defect drawn}
CATEGORIES = {
    "bracket_black": {"hole": "hole", "scratches": "scratch"},
    "metal_plate": {"major_rust": "spot", "scratch": "scratch"},
}


def _render(category: str, rng: np.random.Generator, size: int):
    """(image, defect support, what a hole shows) of one part."""
    if category == "bracket_black":
        image, ring = _washer(rng, size)
        return image * 0.55, ring, np.full_like(image, 0.12 * 0.55)
    image, support = _texture(rng, size)
    grey = image.mean(axis=2, keepdims=True) * np.array([0.85, 0.87, 0.9])
    return grey, support, None


def generate(
    root: str | Path,
    categories: tuple[str, ...] = tuple(CATEGORIES),
    size: int = 128,
    n_train: int = 30,
    n_test_good: int = 8,
    n_per_defect: int = 5,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train,test,ground_truth}`` as MPDD (and MVTec AD) does."""
    root = Path(root)
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in MPDD category {category!r}; choose from {CATEGORIES}"
            )
        rng = np.random.default_rng([seed, ci])
        base = root / category
        plan = [("train", "good", i) for i in range(n_train)]
        plan += [("test", "good", i) for i in range(n_test_good)]
        plan += [("test", d, i) for d in CATEGORIES[category] for i in range(n_per_defect)]
        for split, defect, i in plan:
            image, support, clean = _render(category, rng, size)
            if defect != "good":
                kind = CATEGORIES[category][defect]
                mask = _defect(rng, image, support, kind, size, clean)
                save_mask(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
            save_image(base / split / defect / f"{i:03d}.png", image, rng)
    return root
