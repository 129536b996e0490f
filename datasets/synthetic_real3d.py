"""Generator of Real3D-AD-layout data: unorganised .pcd clouds of a closed shape with bulge and
sink defects, per-point ground truth as 'x y z label' text files. Names follow the release:
``train/<i>_template.pcd``, ``test/<k>_good.pcd``, ``test/<k>_<defect>[_cut].pcd`` (every other
defective cloud carries the ``_cut`` suffix of Real3D-AD's partial views), ``gt/<stem>.txt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFECTS = ("bulge", "sink")


def _write_pcd(path: Path, points: np.ndarray) -> None:
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n"
        f"TYPE F F F\nCOUNT 1 1 1\nWIDTH {len(points)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {len(points)}\nDATA ascii\n"
    )
    np.savetxt(path, points, fmt="%.6f", header=header.rstrip("\n"), comments="")


def _shape(rng: np.random.Generator, n: int) -> np.ndarray:
    """Points on an ellipsoid (a smooth closed part), randomly rotated, metres."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pts = d * np.array([0.04, 0.03, 0.02])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return pts @ q.T


def _defect(rng, points: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    centre = points[rng.integers(len(points))]
    dist = np.linalg.norm(points - centre, axis=1)
    radius = rng.uniform(0.006, 0.01)
    mask = dist < radius
    normal = points / np.linalg.norm(points, axis=1, keepdims=True)
    amp = rng.uniform(0.002, 0.004) * (1 if kind == "bulge" else -1)
    moved = points + normal * (amp * np.clip(1 - (dist / radius) ** 2, 0, None) ** 2)[:, None]
    return moved.astype(np.float32), mask


def generate(
    root: str | Path,
    categories: tuple[str, ...] = ("ellipsoid",),
    n_train: int = 4,
    n_test_good: int = 4,
    n_per_defect: int = 4,
    n_points: int = 4000,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train,test,gt}``; returns ``root``."""
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
        for kind in DEFECTS:
            for j in range(n_per_defect):
                points, mask = _defect(rng, _shape(rng, n_points), kind)
                stem = f"{k}_{kind}" + ("_cut" if j % 2 else "")
                _write_pcd(root / category / "test" / f"{stem}.pcd", points)
                table = np.c_[points.astype(np.float64).round(6), mask.astype(int)]
                np.savetxt(root / category / "gt" / f"{stem}.txt", table, fmt="%.6f %.6f %.6f %d")
                k += 1
    return root
