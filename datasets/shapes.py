"""Rasterised defect shapes shared by the 2D and 3D generators (exact boolean masks)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def stroke(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of a polyline given by dense (row, col) points."""
    seeds = np.zeros(shape, dtype=bool)
    rc = np.round(points).astype(int)
    keep = (rc[:, 0] >= 0) & (rc[:, 0] < shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < shape[1])
    seeds[rc[keep, 0], rc[keep, 1]] = True
    if not seeds.any():
        return seeds
    return ndimage.distance_transform_edt(~seeds) <= width / 2


def densify(vertices: np.ndarray, step: float = 0.5) -> np.ndarray:
    out = [vertices[:1]]
    for a, b in zip(vertices[:-1], vertices[1:]):
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / step)) + 1)
        out.append(np.linspace(a, b, n)[1:])
    return np.concatenate(out)


def curve(rng: np.random.Generator, centre: np.ndarray, length: float) -> np.ndarray:
    """A gently bent quadratic Bezier curve through ``centre``."""
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, int(length * 3) + 2)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def zigzag(rng: np.random.Generator, centre: np.ndarray, length: float) -> np.ndarray:
    """A crack: a random walk with a drifting heading and one branch."""
    heading = rng.uniform(0, 2 * np.pi)
    pts = [centre - np.array([np.sin(heading), np.cos(heading)]) * length / 2]
    n = 12
    for _ in range(n):
        heading += rng.normal(0, 0.45)
        pts.append(pts[-1] + np.array([np.sin(heading), np.cos(heading)]) * length / n)
    main = densify(np.array(pts))
    start = pts[n // 2]
    heading += rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
    branch = [start]
    for _ in range(n // 3):
        heading += rng.normal(0, 0.4)
        branch.append(branch[-1] + np.array([np.sin(heading), np.cos(heading)]) * length / n)
    return np.concatenate([main, densify(np.array(branch))])


def blob(
    shape: tuple[int, int], rng: np.random.Generator, centre: np.ndarray, radius: float
) -> np.ndarray:
    """An irregular spot: an ellipse whose radius wobbles smoothly with the angle."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    dy, dx = rows - centre[0], cols - centre[1]
    angle = np.arctan2(dy, dx)
    wobble = sum(
        rng.uniform(0, 0.18) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    stretch = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / stretch
    return np.hypot(u, v) <= radius * (1 + wobble)


def disc(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    return np.hypot(rows - centre[0], cols - centre[1]) <= radius
