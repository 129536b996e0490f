"""Deterministic generator of VisA-layout image data with exact defect masks.

Two categories named after VisA's: ``candle`` (four tea lights on a dark table, pose jitter)
and ``pcb1`` (a green board with copper traces, pads and a chip). Anomalies carry one of the
defects of :mod:`.synthetic_ad` (scratch, spot, crack, hole). As in the official release the
images are JPEG files listed in ``split_csv/1cls.csv``, non-square, and the masks store 1 (not
255) on anomalous pixels. The same seed writes the same bytes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .synthetic_ad import DEFECTS, _defect

CATEGORIES = ("candle", "pcb1")
COLUMNS = ("object", "split", "label", "image", "mask")


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return field / field.std()


def _candle(rng: np.random.Generator, shape: tuple[int, int]):
    """Four tea lights (metal cup, wax, wick) in a 2x2 grid; the wax is the defect support."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    table = 0.16 + 0.02 * _noise(rng, shape, 4)
    image = table[..., None] * np.array([1.0, 0.9, 0.8])
    background = image.copy()
    support = np.zeros(shape, dtype=bool)
    radius = 0.2 * min(h, w)
    for fy in (0.28, 0.72):
        for fx in (0.3, 0.7):
            cy, cx = np.array([fy * h, fx * w]) + rng.normal(0, 0.7, 2)
            r = np.hypot(rows - cy, cols - cx) / (radius * rng.uniform(0.98, 1.02))
            cup, wax, wick = r <= 1, r <= 0.86, r <= 0.1
            image[cup] = 0.62 + 0.1 * (r[cup, None] - 0.9)
            shade = 0.78 + 0.12 * (1 - r**2) + 0.02 * _noise(rng, shape, 1)
            image[wax] = shade[wax, None] * np.array([0.96, 0.92, 0.82])
            image[wick] = 0.12
            support |= wax & ~(r <= 0.2)
    return image, support, background


def _pcb(rng: np.random.Generator, shape: tuple[int, int]):
    """A board with a trace grid, pads and a central chip; the board inside a margin is the
    defect support."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    oy, ox = rng.normal(0, 0.25, 2)
    board = 0.5 + 0.03 * _noise(rng, shape, 2)
    image = board[..., None] * np.array([0.2, 0.75, 0.35])
    period = 0.1 * min(h, w)
    dy = np.abs((rows - oy) % period - period / 2)
    dx = np.abs((cols - ox) % (1.5 * period) - 0.75 * period)
    copper = np.array([0.8, 0.62, 0.3])
    image[dy < 1.0] = copper * 0.9
    image[(dx < 1.0) & (rows > 0.5 * h)] = copper * 0.85
    pads = (np.hypot(dy, dx) < 0.22 * period) & (rows < 0.5 * h)
    image[pads] = copper
    chip = (np.abs(rows - oy - h / 2) < 0.16 * h) & (np.abs(cols - ox - w / 2) < 0.18 * w)
    image[chip] = 0.08
    margin = int(0.06 * min(h, w))
    support = np.zeros(shape, dtype=bool)
    support[margin:-margin, margin:-margin] = True
    return image, support, None


def _save_jpg(path: Path, image: np.ndarray, rng: np.random.Generator) -> None:
    pixels = np.clip(image * 255 + rng.normal(0, 1.0, image.shape), 0, 255).round()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95, subsampling=0)


def generate(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    size: tuple[int, int] = (120, 160),
    n_train: int = 40,
    n_test_good: int = 12,
    n_anomaly: int = 24,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/Data/{Images/{Normal,Anomaly},Masks/Anomaly}`` and
    ``<root>/split_csv/1cls.csv`` as VisA lays them out; ``size`` is (height, width)."""
    root = Path(root)
    shape = (int(size[0]), int(size[1]))
    rows = []
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in VisA category {category!r}; choose from {CATEGORIES}"
            )
        render = _candle if category == "candle" else _pcb
        rng = np.random.default_rng([seed, ci])
        images = Path(category) / "Data" / "Images"
        for i in range(n_train + n_test_good):
            image, _, _ = render(rng, shape)
            rel = images / "Normal" / f"{i:04d}.JPG"
            _save_jpg(root / rel, image, rng)
            split = "train" if i < n_train else "test"
            rows.append((category, split, "normal", rel.as_posix(), ""))
        for i in range(n_anomaly):
            image, support, clean = render(rng, shape)
            scale = 1.4 * min(shape)  # defects a little larger than on the 256 px MVTec data
            mask = _defect(rng, image, support, DEFECTS[i % len(DEFECTS)], scale, clean)
            if not mask.any():
                raise RuntimeError(f"{category}: no room for a defect in anomaly {i}")
            rel = images / "Anomaly" / f"{i:03d}.JPG"
            mask_rel = Path(category) / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png"
            _save_jpg(root / rel, image, rng)
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8)).save(root / mask_rel)  # values 0 and 1
            rows.append((category, "test", "anomaly", rel.as_posix(), mask_rel.as_posix()))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return root
