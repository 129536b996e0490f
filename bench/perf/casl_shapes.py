"""A held-out shape for CASL's learning curve (``bench.perf casl-curve``): a vase-like surface of
revolution with a flat bottom and an open rim, unevenly sampled, with sensor noise and a random
rotation about its axis, in metres (Real3D-AD's clouds are millimetres; both are normalised).
Defects: wide smooth bulges and sinks, narrow scratches and small nicks. No test uses this
module, so it stays a check of data the detector was never tuned on."""

from __future__ import annotations

import numpy as np

HEIGHT = 0.06
DEFECTS = ("widebulge", "widesink", "scratch", "nick")
SMOOTH = ("widebulge", "widesink")


def _radius(z: np.ndarray) -> np.ndarray:
    t = z / HEIGHT
    return 0.018 + 0.006 * np.sin(2.2 * np.pi * t + 0.4) + 0.004 * t


def _radius_slope(z: np.ndarray) -> np.ndarray:
    t = z / HEIGHT
    return (0.006 * 2.2 * np.pi * np.cos(2.2 * np.pi * t + 0.4) + 0.004) / HEIGHT


def _sample(rng: np.random.Generator, n: int):
    """n points (side and bottom), their unit normals and a bottom flag. Uneven: the side's
    density follows 1 + 0.6 cos(theta) (a scanner that sees one side better) and grows with z."""
    n_bottom = n // 8
    n_side = n - n_bottom
    theta = np.empty(0)
    while len(theta) < n_side:
        c = rng.uniform(-np.pi, np.pi, 2 * n_side)
        theta = np.r_[theta, c[rng.uniform(0, 1.6, len(c)) < 1 + 0.6 * np.cos(c)]]
    theta = theta[:n_side]
    z = HEIGHT * rng.beta(1.3, 1.0, n_side)
    r = _radius(z)
    side = np.c_[r * np.cos(theta), r * np.sin(theta), z]
    side_normal = np.c_[np.cos(theta), np.sin(theta), -_radius_slope(z)]
    side_normal /= np.linalg.norm(side_normal, axis=1, keepdims=True)
    rb = _radius(np.zeros(1)) * np.sqrt(rng.uniform(0, 1, n_bottom))
    tb = rng.uniform(-np.pi, np.pi, n_bottom)
    bottom = np.c_[rb * np.cos(tb), rb * np.sin(tb), np.zeros(n_bottom)]
    normals = np.r_[side_normal, np.tile([0.0, 0.0, -1.0], (n_bottom, 1))]
    is_bottom = np.r_[np.zeros(n_side, bool), np.ones(n_bottom, bool)]
    return np.r_[side, bottom], normals, is_bottom


def _defect(rng, points, normals, is_bottom, kind: str):
    """Displaced points and the defect's mask, on the side wall away from rim and bottom."""
    side = np.flatnonzero(~is_bottom & (points[:, 2] > 0.008) & (points[:, 2] < HEIGHT - 0.008))
    centre = points[rng.choice(side)]
    d = np.linalg.norm(points - centre, axis=1)
    if kind in SMOOTH:  # radius 10-16 mm, 1.5-3 mm high: local curvature barely changes
        r = rng.uniform(0.010, 0.016)
        amp = rng.uniform(0.0015, 0.003) * (1 if kind == "widebulge" else -1)
        disp = amp * np.clip(1 - (d / r) ** 2, 0, None) ** 2
        mask = np.abs(disp) > 0.05 * abs(amp)
    elif kind == "nick":  # radius 1.5-3 mm, 0.8-1.5 mm deep
        r = rng.uniform(0.0015, 0.003)
        disp = -rng.uniform(0.0008, 0.0015) * np.clip(1 - (d / r) ** 2, 0, None)
        mask = d < r
    elif kind == "scratch":  # a groove 8-16 mm long, 0.6-1 mm wide and deep
        n0 = normals[np.argmin(d)]
        t = np.cross(n0, rng.normal(size=3))
        t /= np.linalg.norm(t)
        half = rng.uniform(0.004, 0.008)
        rel = points - centre
        along = np.clip(rel @ t, -half, half)
        across = np.linalg.norm(rel - along[:, None] * t, axis=1)
        width = rng.uniform(0.0006, 0.001)
        disp = -rng.uniform(0.0006, 0.001) * np.clip(1 - (across / width) ** 2, 0, None)
        mask = across < width
    else:
        raise ValueError(f"unknown defect {kind!r}; choose from {DEFECTS}")
    disp = np.where(is_bottom, 0.0, disp)
    return points + normals * disp[:, None], mask & ~is_bottom


def cloud(rng: np.random.Generator, n: int, kind: str | None = None, noise: float = 5e-5):
    """One vase of ``n`` points (float32, metres), optionally with a defect, and its mask."""
    points, normals, is_bottom = _sample(rng, n)
    mask = np.zeros(len(points), bool)
    if kind is not None:
        points, mask = _defect(rng, points, normals, is_bottom, kind)
    points = points + rng.normal(0, noise, points.shape)
    a = rng.uniform(-np.pi, np.pi)
    q = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    return (points @ q.T).astype(np.float32), mask


def dataset(
    seed: int = 1,
    n_train: int = 4,
    n_good: int = 10,
    n_per_defect: int = 10,
    points: tuple[int, int] = (6000, 9000),
):
    """Training clouds and test triples (defect or "good", points, mask); point counts vary."""
    rng = np.random.default_rng(seed)
    train = [cloud(rng, int(rng.integers(*points)))[0] for _ in range(n_train)]
    test = [("good", *cloud(rng, int(rng.integers(*points)))) for _ in range(n_good)]
    for kind in DEFECTS:
        test += [(kind, *cloud(rng, int(rng.integers(*points)), kind)) for _ in range(n_per_defect)]
    return train, test
