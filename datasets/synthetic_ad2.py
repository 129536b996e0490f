"""Deterministic generator of MVTec AD 2-layout image data with exact defect masks.

Two scenarios named after AD 2's: ``can`` (a metal can lying across the image, a printed label
band, pose jitter) and ``fabric`` (a woven texture). Defects are those of :mod:`.synthetic_ad`
(scratch, spot, crack, hole). As in the release: non-square PNGs named ``<nnn>_regular.png``
(``<nnn>_mixed.png`` in test_private_mixed), masks storing 255, a validation set of good images,
a public test set with ground truth and two private test sets without; about half of the
test_private_mixed images are lit differently (brighter or darker, with a gradient), as the
real mixed set varies the lighting. The private sets' truth is not written (it is not public
either). The same seed writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .synthetic_ad import DEFECTS, _defect, _save_png

CATEGORIES = ("can", "fabric")


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return field / field.std()


def _fabric(rng: np.random.Generator, shape: tuple[int, int]):
    """A blue woven texture; every pixel can carry a defect."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    theta = np.deg2rad(rng.normal(0, 2))
    period = rng.uniform(9, 10.5)
    u = cols * np.cos(theta) + rows * np.sin(theta)
    v = -cols * np.sin(theta) + rows * np.cos(theta)
    weave = np.sin(2 * np.pi * u / period + rng.uniform(0, 6.3)) * np.sin(
        2 * np.pi * v / period + rng.uniform(0, 6.3)
    )
    shade = 0.5 + 0.2 * weave + 0.08 * _noise(rng, shape, 1.5)
    image = shade[..., None] * np.array([0.45, 0.55, 0.85])
    return image, np.ones(shape, dtype=bool), None


def _can(rng: np.random.Generator, shape: tuple[int, int]):
    """A can lying across the image: a shaded metal cylinder with a red label band on a dark
    table; the body (without its rims) is the defect support, a hole shows the table."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    cy = h / 2 + rng.normal(0, 1.0)
    t = (rows - cy) / (0.36 * h * rng.uniform(0.98, 1.02))  # -1..1 across the body
    body = np.abs(t) <= 1
    table = (0.1 + 0.015 * _noise(rng, shape, 3))[..., None] * np.ones(3)
    shine = 0.45 + 0.15 * (1 - t**2) + 0.3 * np.exp(-(((t + 0.35) / 0.2) ** 2))
    shine = np.clip(shine + 0.02 * _noise(rng, shape, 0.8), 0, 1)
    band = np.abs(cols - w / 2 - rng.normal(0, 1.0)) < 0.22 * w
    colour = np.where(band[..., None], [0.85, 0.2, 0.15], [0.88, 0.9, 0.93])
    image = np.where(body[..., None], shine[..., None] * colour, table)
    return image, np.abs(t) <= 0.85, table


def _relight(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Another lighting: brighter or darker overall, with a left-right gradient."""
    gain = rng.uniform(1.25, 1.45) if rng.random() < 0.5 else rng.uniform(0.55, 0.75)
    ramp = 1 + rng.uniform(-0.3, 0.3) * (np.linspace(-0.5, 0.5, image.shape[1]))
    return np.clip(image * gain * ramp[None, :, None], 0, 1)


def _pixels(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    noisy = image * 255 + rng.normal(0, 1.0, image.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _plan(n: dict[str, int]) -> list[tuple[str, str, bool]]:
    """(folder below the scenario, image name, defective) of every image."""
    plan = [("train/good", f"{i:03d}_regular", False) for i in range(n["train"])]
    plan += [("validation/good", f"{i:03d}_regular", False) for i in range(n["validation"])]
    plan += [("test_public/good", f"{i:03d}_regular", False) for i in range(n["test_good"])]
    plan += [("test_public/bad", f"{i:03d}_regular", True) for i in range(n["test_bad"])]
    plan += [("test_private", f"{i:03d}_regular", i % 2 == 1) for i in range(n["private"])]
    plan += [("test_private_mixed", f"{i:03d}_mixed", i % 2 == 1) for i in range(n["mixed"])]
    return plan


def generate(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    size: tuple[int, int] = (128, 192),
    n_train: int = 40,
    n_validation: int = 10,
    n_test_good: int = 8,
    n_test_bad: int = 12,
    n_private: int = 10,
    n_private_mixed: int = 10,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<scenario>/{train,validation,test_public,test_private,
    test_private_mixed}`` as MVTec AD 2 lays them out; ``size`` is (height, width)."""
    root, shape = Path(root), (int(size[0]), int(size[1]))
    counts = {"train": n_train, "validation": n_validation, "test_good": n_test_good}
    counts |= {"test_bad": n_test_bad, "private": n_private, "mixed": n_private_mixed}
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in AD 2 scenario {category!r}; choose from {CATEGORIES}"
            )
        render = _can if category == "can" else _fabric
        rng = np.random.default_rng([seed, CATEGORIES.index(category)])
        base = root / category
        for k, (folder, name, defective) in enumerate(_plan(counts)):
            image, support, clean = render(rng, shape)
            if defective:
                kind = DEFECTS[k % len(DEFECTS)]
                mask = _defect(rng, image, support, kind, 1.4 * min(shape), clean)
                if not mask.any():
                    raise RuntimeError(f"{category}: no room for a defect in {folder}/{name}")
                if folder == "test_public/bad":
                    gt = base / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png"
                    _save_png(gt, mask.astype(np.uint8) * 255)
            if folder == "test_private_mixed" and rng.random() < 0.5:
                image = _relight(rng, image)
            _save_png(base / folder / f"{name}.png", _pixels(rng, image))
    return root
