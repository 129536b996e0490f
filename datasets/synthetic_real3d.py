"""Generator of Real3D-AD-layout data: unorganised .pcd clouds of a closed shape with bulge and
sink defects, per-point ground truth as 'x y z label' text files. Names follow the release:
``train/<i>_template.pcd``, ``test/<k>_good.pcd``, ``test/<k>_<defect>[_cut].pcd`` (every other
defective cloud carries the ``_cut`` suffix of Real3D-AD's partial views), ``gt/<stem>.txt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFECTS = ("bulge", "sink")
# Opt-in wide, smooth deformations (``generate(defects=...)``): ~2.5x the radius of the compact
# kinds, displaced along the ellipsoid's true normal, so the local surface variation barely
# changes while the shape does. Their files are named without the underscore (``7_widebulge``),
# since the Real3D-AD loader takes a stem's last word as the defect type.
WIDE_DEFECTS = ("wide_bulge", "wide_sink")
AXES = np.array([0.04, 0.03, 0.02])  # the ellipsoid's semi-axes, metres
MASK_FRACTION = 0.05  # a wide defect's mask: displacement above this fraction of its amplitude


def _write_pcd(path: Path, points: np.ndarray) -> None:
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n"
        f"TYPE F F F\nCOUNT 1 1 1\nWIDTH {len(points)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {len(points)}\nDATA ascii\n"
    )
    np.savetxt(path, points, fmt="%.6f", header=header.rstrip("\n"), comments="")


def _ellipsoid(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on an ellipsoid (a smooth closed part), randomly rotated, metres, and the
    rotation ``q`` (points = axis-aligned points @ q.T)."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pts = d * AXES
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return pts @ q.T, q


def _shape(rng: np.random.Generator, n: int) -> np.ndarray:
    """Points on an ellipsoid (a smooth closed part), randomly rotated, metres."""
    return _ellipsoid(rng, n)[0]


def _normals(points: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Unit outward normals of the ellipsoid rotated by ``q``: the gradient of
    sum((x / AXES)^2) in the part's own frame, rotated back."""
    n = ((points @ q) / AXES**2) @ q.T
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _defect(
    rng, points: np.ndarray, kind: str, q: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Displaced points (float32) and their mask. Wide kinds need the ellipsoid's rotation
    ``q``; the compact kinds keep their original (radial-direction) displacement."""
    if kind in WIDE_DEFECTS:
        return _wide_defect(rng, points, kind, q)
    if kind not in DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS + WIDE_DEFECTS}")
    centre = points[rng.integers(len(points))]
    dist = np.linalg.norm(points - centre, axis=1)
    radius = rng.uniform(0.006, 0.01)
    mask = dist < radius
    normal = points / np.linalg.norm(points, axis=1, keepdims=True)
    amp = rng.uniform(0.002, 0.004) * (1 if kind == "bulge" else -1)
    moved = points + normal * (amp * np.clip(1 - (dist / radius) ** 2, 0, None) ** 2)[:, None]
    return moved.astype(np.float32), mask


def _wide_defect(rng, points: np.ndarray, kind: str, q: np.ndarray | None):
    """A wide, smooth bulge/sink: radius 15-25 mm, amplitude 2-4 mm along the ellipsoid's
    normal, profile (1 - (d/r)^2)^2; the mask is where the displacement exceeds
    ``MASK_FRACTION`` of the amplitude (the visibly moved region, not the flat rim)."""
    if q is None:
        raise ValueError(f"a {kind} defect needs the ellipsoid's rotation q")
    centre = points[rng.integers(len(points))]
    dist = np.linalg.norm(points - centre, axis=1)
    radius = rng.uniform(0.015, 0.025)
    amp = rng.uniform(0.002, 0.004) * (1 if kind == "wide_bulge" else -1)
    disp = amp * np.clip(1 - (dist / radius) ** 2, 0, None) ** 2
    mask = np.abs(disp) > MASK_FRACTION * abs(amp)
    moved = points + _normals(points, q) * disp[:, None]
    return moved.astype(np.float32), mask


def generate(
    root: str | Path,
    categories: tuple[str, ...] = ("ellipsoid",),
    n_train: int = 4,
    n_test_good: int = 4,
    n_per_defect: int = 4,
    n_points: int = 4000,
    seed: int = 0,
    defects: tuple[str, ...] = DEFECTS,
) -> Path:
    """Writes ``<root>/<category>/{train,test,gt}``; returns ``root``. ``defects``: the kinds
    of test defects, from ``DEFECTS`` and ``WIDE_DEFECTS`` (the defaults are unchanged)."""
    unknown = [d for d in defects if d not in DEFECTS + WIDE_DEFECTS]
    if unknown:
        raise ValueError(
            f"unknown defect kind {unknown[0]!r}; choose from {DEFECTS + WIDE_DEFECTS}"
        )
    root = Path(root)
    rng = np.random.default_rng(seed)
    for category in categories:
        for sub in ("train", "test", "gt"):
            (root / category / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _write_pcd(root / category / "train" / f"{i}_template.pcd", _shape(rng, n_points))
        k = 0
        for _ in range(n_test_good):
            _write_pcd(root / category / "test" / f"{k}_good.pcd", _shape(rng, n_points))
            k += 1
        for kind in defects:
            for j in range(n_per_defect):
                points, q = _ellipsoid(rng, n_points)
                points, mask = _defect(rng, points, kind, q)
                stem = f"{k}_{kind.replace('_', '')}" + ("_cut" if j % 2 else "")
                _write_pcd(root / category / "test" / f"{stem}.pcd", points)
                table = np.c_[points.astype(np.float64).round(6), mask.astype(int)]
                np.savetxt(root / category / "gt" / f"{stem}.txt", table, fmt="%.6f %.6f %.6f %d")
                k += 1
    return root
