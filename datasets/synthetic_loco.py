"""Deterministic generator of MVTec LOCO AD-layout data with exact per-defect ground truth.

Two categories named after LOCO's: ``breakfast_box`` (a cream box, two oranges on the left,
granola on the right) and ``pushpins`` (a tray of 2x4 compartments, one yellow pin in each).
Logical anomalies break a rule without damaging anything: an object is missing (the ground truth
marks its place: the fruit's disc, the pin's compartment), there is one too many (the extra
object is marked) or one has the wrong colour (that object is marked); one in four combines a
missing and a recoloured object (two PNGs). Structural anomalies are a scratch, spot or crack
of :mod:`.synthetic_ad` on the container; the first also gets a spot overlapping its defect
(two overlapping PNGs). ``defects_config.json`` mixes absolute and relative saturation
thresholds. Images are non-square RGB PNGs; the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import shapes
from .synthetic_ad import _defect

CATEGORIES = ("breakfast_box", "pushpins")
STRUCTURAL = ("scratch", "spot", "crack")
LOGICAL = ("missing", "extra", "colour", "missing+colour")
#: (defect name, pixel value, saturation threshold, relative) per category, by defect kind
CONFIGS = {
    "breakfast_box": {
        "missing": ("missing_orange", 251, 150, False),
        "extra": ("extra_orange", 252, 1.0, True),
        "colour": ("green_orange", 253, 0.5, True),
        "scratch": ("scratch", 241, 1.0, True),
        "spot": ("contamination", 242, 30, False),
        "crack": ("crack", 243, 1.0, True),
    },
    "pushpins": {
        "missing": ("missing_pushpin", 251, 120, False),
        "extra": ("additional_pushpin", 252, 1.0, True),
        "colour": ("colour", 253, 0.5, True),
        "scratch": ("scratch", 241, 1.0, True),
        "spot": ("contamination", 242, 30, False),
        "crack": ("broken_wall", 243, 1.0, True),
    },
}


@dataclass
class Layout:
    """A container without its objects: the image, where structural defects may go, each
    object's place (centre, radius) and the region marked when it is missing, where an extra
    object goes, and the objects' normal and wrong colours."""

    image: np.ndarray
    support: np.ndarray
    slots: list[tuple[np.ndarray, float]]
    places: list[np.ndarray]
    spare: np.ndarray
    colour: np.ndarray
    odd: np.ndarray


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return field / field.std()


def _breakfast_box(rng: np.random.Generator, shape: tuple[int, int]) -> Layout:
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    image = (0.14 + 0.015 * _noise(rng, shape, 3))[..., None] * np.array([1.0, 0.95, 0.9])
    oy, ox = rng.normal(0, 0.8, 2)
    box = (np.abs(rows - oy - h / 2) < 0.42 * h) & (np.abs(cols - ox - w / 2) < 0.44 * w)
    image[box] = (0.86 + 0.02 * _noise(rng, shape, 1))[box, None] * np.array([1.0, 0.96, 0.86])
    divider = box & (np.abs(cols - ox - w / 2) < 1.5)
    image[divider] *= 0.75
    granola = box & (cols - ox > w / 2 + 3) & (np.abs(rows - oy - h / 2) < 0.38 * h)
    granola &= np.abs(cols - ox - w / 2) < 0.41 * w
    grain = 0.55 + 0.12 * _noise(rng, shape, 0.7)
    image[granola] = grain[granola, None] * np.array([0.78, 0.55, 0.3])
    radius = 0.12 * h
    slots = [
        (np.array([fy * h + oy, 0.28 * w + ox]) + rng.normal(0, 0.7, 2), radius)
        for fy in (0.3, 0.7)
    ]
    places = [shapes.disc(shape, c, r) for c, r in slots]
    spare = np.array([0.5 * h + oy, 0.72 * w + ox]) + rng.normal(0, 1.5, 2)
    orange, green = np.array([0.95, 0.55, 0.12]), np.array([0.45, 0.75, 0.2])
    return Layout(image, box & ~divider, slots, places, spare, orange, green)


def _pushpins(rng: np.random.Generator, shape: tuple[int, int]) -> Layout:
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    image = (0.3 + 0.015 * _noise(rng, shape, 2))[..., None] * np.array([0.9, 0.92, 1.0])
    ch, cw = h / 2, w / 4
    walls = (np.abs((rows + ch / 2) % ch - ch / 2) < 1.2) | (
        np.abs((cols + cw / 2) % cw - cw / 2) < 1.2
    )
    image[walls] = 0.55
    radius = 0.07 * h
    slots, places = [], []
    for r in range(2):
        for c in range(4):
            centre = np.array([(r + 0.5) * ch, c * cw + 0.3 * cw]) + rng.normal(0, 1.2, 2)
            slots.append((centre, radius))
            inside = (rows > r * ch + 1.5) & (rows < (r + 1) * ch - 1.5)
            places.append(inside & (cols > c * cw + 1.5) & (cols < (c + 1) * cw - 1.5))
    k = int(rng.integers(len(slots)))
    spare = slots[k][0] + np.array([rng.normal(0, 1), 0.42 * cw])
    yellow, blue = np.array([0.95, 0.85, 0.15]), np.array([0.2, 0.4, 0.9])
    return Layout(image, ~walls, slots, places, spare, yellow, blue)


def _draw(image: np.ndarray, centre: np.ndarray, radius: float, colour: np.ndarray) -> np.ndarray:
    """A shaded disc (a fruit or a pin head) on ``image`` in place; returns its mask."""
    mask = shapes.disc(image.shape[:2], centre, radius)
    rows, cols = np.nonzero(mask)
    r2 = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / radius**2
    image[rows, cols] = colour * (1.0 - 0.3 * r2)[:, None]
    return mask


def _logical(rng, layout: Layout, kind: str) -> list[tuple[str, np.ndarray]]:
    """Draws the objects with one logical anomaly (or none: kind "good"); its channels."""
    n = len(layout.slots)
    missing = int(rng.integers(n)) if "missing" in kind else -1
    odd = -1
    if "colour" in kind:  # another object than the missing one
        odd = int((missing + 1 + rng.integers(n - 1)) % n) if missing >= 0 else int(rng.integers(n))
    channels = []
    for i, (centre, radius) in enumerate(layout.slots):
        if i == missing:
            channels.append(("missing", layout.places[i]))
            continue
        mask = _draw(layout.image, centre, radius, layout.odd if i == odd else layout.colour)
        layout.support &= ~mask
        if i == odd:
            channels.append(("colour", mask))
    if kind == "extra":
        channels.append(
            ("extra", _draw(layout.image, layout.spare, layout.slots[0][1], layout.colour))
        )
    return channels


def _structural(rng, layout: Layout, defect: str, overlap: bool) -> list[tuple[str, np.ndarray]]:
    """One structural defect on the container (plus an overlapping spot if ``overlap``)."""
    scale = 1.4 * min(layout.image.shape[:2])  # as the VisA generator scales its defects
    mask = _defect(rng, layout.image, layout.support, defect, scale, None)
    if not mask.any():
        raise RuntimeError(f"no room for a {defect} on the container")
    channels = [(defect, mask)]
    if overlap:  # a spot centred on a pixel of the first defect: the two PNGs overlap
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))
        spot = shapes.blob(mask.shape, rng, np.array([ys[k], xs[k]], float), 0.05 * scale)
        spot &= layout.support
        image = layout.image
        image[spot] = image[spot] * 0.35 + np.array([0.45, 0.25, 0.1]) * rng.uniform(0.8, 1.2)
        channels.append(("spot", spot))
    return channels


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=1)


def _write_config(path: Path, category: str) -> None:
    entries = [
        {"defect_name": n, "pixel_value": v, "saturation_threshold": t, "relative_saturation": r}
        for n, v, t, r in CONFIGS[category].values()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=4) + "\n")


def generate(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    size: tuple[int, int] = (100, 160),
    n_train: int = 40,
    n_validation: int = 8,
    n_test_good: int = 12,
    n_logical: int = 12,
    n_structural: int = 12,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train,validation,test,ground_truth}`` and
    ``defects_config.json`` as MVTec LOCO AD lays them out; ``size`` is (height, width)."""
    root = Path(root)
    shape = (int(size[0]), int(size[1]))
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in LOCO category {category!r}; choose from {CATEGORIES}"
            )
        rng = np.random.default_rng([seed, ci])
        base = root / category
        _write_config(base / "defects_config.json", category)
        plan = [("train", "good", i) for i in range(n_train)]
        plan += [("validation", "good", i) for i in range(n_validation)]
        plan += [("test", "good", i) for i in range(n_test_good)]
        plan += [("test", "logical_anomalies", i) for i in range(n_logical)]
        plan += [("test", "structural_anomalies", i) for i in range(n_structural)]
        for split, kind, i in plan:
            layout = (_breakfast_box if category == "breakfast_box" else _pushpins)(rng, shape)
            logical = LOGICAL[i % len(LOGICAL)] if kind == "logical_anomalies" else "good"
            channels = _logical(rng, layout, logical)
            if kind == "structural_anomalies":
                defect = STRUCTURAL[i % len(STRUCTURAL)]
                channels = _structural(rng, layout, defect, overlap=i == 0)
            for j, (name, mask) in enumerate(channels):
                value = CONFIGS[category][name][1]
                png = base / "ground_truth" / kind / f"{i:03d}" / f"{j:03d}.png"
                _save_png(png, mask.astype(np.uint8) * np.uint8(value))
            noise = rng.normal(0, 1.0, layout.image.shape)
            pixels = np.clip(layout.image * 255 + noise, 0, 255).round().astype(np.uint8)
            _save_png(base / split / kind / f"{i:03d}.png", pixels)
    return root
