"""Deterministic generator of MVTec 3D-AD-layout data: organised xyz tiffs, rgb, gt masks.

A structured-light-like scan looking down at an object on a slightly tilted table: ``dome`` (a
smooth cap) and ``puck`` (a cylinder with a rounded top edge and vertical walls, whose silhouette
is sharp as on real parts). Units are metres, as in MVTec 3D-AD. Defects are geometric: dent and
bump (smooth compact displacements), hole (a deep well) and crack (a narrow groove); each mask is
exactly the set of displaced pixels. Missing points are (0,0,0): dropouts on steep walls and
sparse random ones, as a real sensor leaves them. Categories have different grid sizes on purpose.
Opt-in ``WIDE_DEFECTS`` (``generate(defects=...)``): wide_bump and wide_dent, the dent/bump
profile at ~3x the radius, which changes the shape but barely the local surface variation;
their masks are the visibly moved pixels (displacement above 5% of the amplitude), not the rim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from . import shapes

CATEGORIES = {"dome": (192, 192), "puck": (176, 208)}
DEFECTS = ("dent", "bump", "hole", "crack")
WIDE_DEFECTS = ("wide_bump", "wide_dent")
MASK_FRACTION = 0.05  # a wide defect's mask: |displacement| above this fraction of |amplitude|
FIELD = 0.1  # metres covered by the grid width
DISTANCE = 0.45  # camera to table, metres


def _height(category: str, rng, rows, cols, pitch, scale: float = 1.0):
    """Object height above the table (metres) and its support mask."""
    cy = rows.shape[0] / 2 + rng.normal(0, 2) * scale
    cx = rows.shape[1] / 2 + rng.normal(0, 2) * scale
    r = np.hypot(rows - cy, cols - cx) * pitch
    if category == "dome":
        radius, top = 0.032 * rng.uniform(0.98, 1.02), 0.012
        h = np.clip(top * (1 - (r / radius) ** 2), 0, None)
    else:
        radius, top, edge = 0.03 * rng.uniform(0.98, 1.02), 0.01, 0.002
        inner = radius - edge
        rounded = top - edge + np.sqrt(np.clip(edge**2 - (r - inner) ** 2, 0, None))
        h = np.where(r <= inner, top, np.where(r <= radius, rounded, 0.0))
    support = h > 0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, rows.shape), 2 * scale) * 4e-5
    return h + texture * support, support


def _defect(rng, shape, support, defect, pitch, scale: float = 1.0):
    """Displacement (metres, positive = towards the camera) and its exact mask; pixel sizes
    are multiplied by ``scale`` (grids finer than the category's default)."""
    if defect in WIDE_DEFECTS:
        return _wide_defect(rng, shape, support, defect, scale)
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect kind {defect!r}; choose from {DEFECTS + WIDE_DEFECTS}")
    ys, xs = np.nonzero(ndimage.binary_erosion(support, iterations=round(12 * scale)))
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    for _ in range(100):
        k = rng.integers(len(ys))
        centre = np.array([ys[k], xs[k]], dtype=float)
        if defect in ("dent", "bump"):
            radius = rng.uniform(5, 10) * scale
            rr = np.hypot(rows - centre[0], cols - centre[1]) / radius
            amp = rng.uniform(0.8e-3, 1.6e-3) * (1 if defect == "bump" else -1)
            mask = rr < 1
            disp = np.where(mask, amp * (1 - rr**2) ** 2, 0.0)
        elif defect == "hole":
            mask = shapes.disc(shape, centre, rng.uniform(2.5, 5) * scale)
            disp = np.where(mask, -rng.uniform(3e-3, 5e-3), 0.0)
        else:
            mask = shapes.stroke(
                shape,
                shapes.zigzag(rng, centre, rng.uniform(25, 45) * scale),
                rng.uniform(1.5, 2.5) * scale,
            )
            disp = np.where(mask, -rng.uniform(0.6e-3, 1.0e-3), 0.0)
        mask &= support
        disp = np.where(mask, disp, 0.0)
        if mask.sum() >= 12 * scale**2:
            return disp, mask
    raise RuntimeError(f"could not place a {defect} defect")


def _wide_defect(rng, shape, support, defect, scale: float = 1.0):
    """A wide, smooth bump/dent: radius 18-28 px (times ``scale``), amplitude 0.8-1.6 mm,
    profile (1 - rr^2)^2, centred at least one radius inside the support so the whole
    displacement lies on the part (no step at the silhouette); the mask is where
    |displacement| exceeds ``MASK_FRACTION`` of |amplitude|."""
    inside = ndimage.distance_transform_edt(support)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    for _ in range(100):
        radius = rng.uniform(18, 28) * scale
        ys, xs = np.nonzero(inside > radius)
        if len(ys) == 0:
            continue
        k = rng.integers(len(ys))
        rr = np.hypot(rows - ys[k], cols - xs[k]) / radius
        amp = rng.uniform(0.8e-3, 1.6e-3) * (1 if defect == "wide_bump" else -1)
        disp = np.where(rr < 1, amp * np.clip(1 - rr**2, 0, None) ** 2, 0.0)
        mask = (np.abs(disp) > MASK_FRACTION * abs(amp)) & support
        disp = np.where(support, disp, 0.0)
        if mask.sum() >= 12 * scale**2:
            return disp, mask
    raise RuntimeError(f"could not place a {defect} defect")


def _scan(category: str, rng, shape, defect):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    pitch = FIELD / shape[1]
    scale = shape[1] / CATEGORIES[category][1]
    h, support = _height(category, rng, rows, cols, pitch, scale)
    mask = np.zeros(shape, dtype=bool)
    if defect != "good":
        disp, mask = _defect(rng, shape, support, defect, pitch, scale)
        h = h + disp
    x = (cols - shape[1] / 2) * pitch
    y = (rows - shape[0] / 2) * pitch
    tilt = rng.normal(0, 0.01, 2)
    z = DISTANCE + tilt[0] * x + tilt[1] * y - h + rng.normal(0, 3e-5, shape)
    xyz = np.stack([x * z / DISTANCE, y * z / DISTANCE, z], -1).astype(np.float32)
    gy, gx = np.gradient(h, pitch)
    slope = np.hypot(gx, gy)
    dropout = ((slope > 2.5) & (rng.random(shape) < 0.6)) | (rng.random(shape) < 0.002)
    xyz[dropout] = 0.0
    rgb = _shade(category, rng, h, support, mask, defect, pitch)
    return xyz, rgb, mask


def _shade(category, rng, h, support, mask, defect, pitch):
    gy, gx = np.gradient(h, pitch)
    normal = np.stack([-gx, -gy, np.ones_like(h)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([0.3, -0.35, 0.89])
    light /= np.linalg.norm(light)
    intensity = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
    albedo = np.where(
        support[..., None],
        [0.82, 0.6, 0.36] if category == "dome" else [0.32, 0.33, 0.36],
        [0.72, 0.72, 0.7],
    )
    rgb = albedo * intensity[..., None]
    if defect in ("crack", "hole"):
        rgb[mask] *= 0.55
    rgb += rng.normal(0, 0.01, rgb.shape)
    return np.clip(rgb * 255, 0, 255).round().astype(np.uint8)


def generate(
    root: str | Path,
    categories: tuple[str, ...] = tuple(CATEGORIES),
    n_train: int = 24,
    n_validation: int = 6,
    n_test_good: int = 8,
    n_per_defect: int = 5,
    seed: int = 0,
    grid: tuple[int, int] | None = None,
    defects: tuple[str, ...] = DEFECTS,
) -> Path:
    """Writes ``<root>/<category>/{train,validation,test}/<defect>/{rgb,xyz,gt}/<id>``.
    ``grid`` (rows, cols) replaces every category's own size (e.g. MVTec 3D-AD's 800x800),
    with the defects' pixel sizes scaled to match. ``defects``: the kinds of test defects,
    from ``DEFECTS`` and ``WIDE_DEFECTS`` (the defaults are unchanged)."""
    unknown = [d for d in defects if d not in DEFECTS + WIDE_DEFECTS]
    if unknown:
        raise ValueError(
            f"unknown defect kind {unknown[0]!r}; choose from {DEFECTS + WIDE_DEFECTS}"
        )
    root = Path(root)
    for ci, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(
                f"unknown built-in 3D category {category!r}; choose from {tuple(CATEGORIES)}"
            )
        rng = np.random.default_rng([seed, 100 + ci])
        shape = grid or CATEGORIES[category]
        plan = [("train", "good", i) for i in range(n_train)]
        plan += [("validation", "good", i) for i in range(n_validation)]
        plan += [("test", "good", i) for i in range(n_test_good)]
        plan += [("test", d, i) for d in defects for i in range(n_per_defect)]
        for split, defect, i in plan:
            xyz, rgb, mask = _scan(category, rng, shape, defect)
            folder = root / category / split / defect
            for sub in ("xyz", "rgb", "gt"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            name = f"{i:03d}"
            tifffile.imwrite(
                folder / "xyz" / f"{name}.tiff",
                xyz,
                photometric="minisblack",
                planarconfig="contig",
            )
            Image.fromarray(rgb).save(folder / "rgb" / f"{name}.png", compress_level=1)
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                folder / "gt" / f"{name}.png", compress_level=1
            )
    return root
