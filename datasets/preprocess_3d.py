"""MVTec 3D-AD preprocessing as in the 3D literature (3D-ADS, M3DM), cached on disk.

1. Background plane: RANSAC (open3d ``segment_plane``) on the valid points within ``border``
   pixels of the grid's edge, then every point closer than ``plane_distance`` to that plane is
   dropped.
2. Largest cluster: DBSCAN (``eps``, ``min_points``, the settings of open3d's
   ``cluster_dbscan`` that the literature calls) on what is left; only the largest cluster
   stays. :func:`largest_dbscan_cluster` finds the same clusters without listing every
   point's neighbours: at MVTec 3D-AD's 800x800 a 6 mm ball holds thousands of points, which
   costs open3d about a minute and gigabytes per scan.
Only the valid-point mask changes (dropped points become (0,0,0), as missing ones are), so the
grid stays aligned with rgb and ground truth. Results are cached keyed by the raw file (path,
size, modification time) and the settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.errors import ConfigError

from . import builtin

#: changes when the cached masks of the same settings could change
ALGORITHM = "grid-dbscan-1"


def _union_find(n: int):
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    return parent, find


def largest_dbscan_cluster(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """Bool mask of the largest DBSCAN cluster of ``points`` [N,3] (all False if none).

    DBSCAN: a point is core when at least ``min_points`` points (itself included) lie within
    ``eps``; clusters are core points chained by ``eps`` steps, plus the non-core points within
    ``eps`` of one. As in open3d's ``cluster_dbscan``, clusters are numbered by their first
    point and a point near two clusters joins the first; the largest is kept (ties: the first).
    The same result without neighbour lists: in a grid of cells of side eps/sqrt(3) every two
    points of a cell are neighbours, so a cell with ``min_points`` points is all core and its
    core points are one cluster; only cells with fewer points count neighbours, and two cells join when a
    nearest-neighbour search finds a pair of their core points within ``eps``.
    """
    from scipy.spatial import cKDTree

    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    points = np.asarray(points, dtype=np.float64)
    side = eps / np.sqrt(3)
    coords = np.floor((points - points.min(0)) / side).astype(np.int64)
    cells, cell_of, counts = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
    cell_of = cell_of.reshape(-1)
    core = counts[cell_of] >= min_points
    sparse = np.flatnonzero(~core)
    if len(sparse):
        counted = cKDTree(points).query_ball_point(
            points[sparse], eps, return_length=True, workers=-1
        )
        core[sparse] = counted >= min_points
    if not core.any():
        return np.zeros(n, dtype=bool)

    core_idx = np.flatnonzero(core)
    order = core_idx[np.argsort(cell_of[core_idx], kind="stable")]
    cell_ids, starts = np.unique(cell_of[order], return_index=True)
    members = dict(zip(cell_ids.tolist(), np.split(order, starts[1:])))
    lookup = {tuple(c): i for i, c in enumerate(cells.tolist())}
    steps = np.array([(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)])
    steps = steps[[tuple(s) > (0, 0, 0) for s in steps.tolist()]]  # each pair of cells once
    parent, find = _union_find(len(cells))
    trees: dict[int, cKDTree] = {}
    for a in cell_ids.tolist():
        for b in (lookup.get(tuple(c)) for c in (cells[a] + steps).tolist()):
            if b is None or b not in members or find(a) == find(b):
                continue
            small, large = sorted((a, b), key=lambda c: len(members[c]))
            if large not in trees:
                trees[large] = cKDTree(points[members[large]])
            distance, _ = trees[large].query(points[members[small]], k=1, distance_upper_bound=eps)
            if np.isfinite(distance).any():
                parent[find(a)] = find(b)

    roots = np.array([find(c) for c in range(len(cells))])
    _, core_label = np.unique(roots[cell_of[core_idx]], return_inverse=True)
    first = np.full(core_label.max() + 1, n)
    np.minimum.at(first, core_label, core_idx)  # clusters in the order open3d finds them
    label = np.full(n, -1)
    label[core_idx] = np.argsort(np.argsort(first))[core_label]
    border = np.flatnonzero(~core)
    if len(border):  # each joins the first-numbered cluster among its core neighbours
        near = cKDTree(points[core_idx]).query_ball_point(points[border], eps, workers=-1)
        counts = np.fromiter(map(len, near), np.int64, len(near))
        found = np.fromiter(itertools.chain.from_iterable(near), np.int64, int(counts.sum()))
        first_label = np.full(n, n)
        np.minimum.at(first_label, np.repeat(border, counts), label[core_idx[found]])
        reached = border[counts > 0]
        label[reached] = first_label[reached]
    sizes = np.bincount(label[label >= 0])
    return label == sizes.argmax()


@dataclass(frozen=True)
class Preprocess3D:
    plane: bool = True
    border: int = 10
    plane_distance: float = 0.005
    ransac_iterations: int = 1000
    cluster: bool = True
    eps: float = 0.006
    min_points: int = 30
    seed: int = 0

    @classmethod
    def from_option(cls, option) -> Preprocess3D | None:
        """None/False: off; True: the defaults; a dict: the defaults overridden."""
        if not option:
            return None
        if option is True:
            return cls()
        if not isinstance(option, dict):
            raise ConfigError(
                f"preprocess must be true, false or a table of settings, got {option!r}"
            )
        unknown = set(option) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"preprocess: unknown setting(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**option)

    def key(self) -> str:
        settings = {**asdict(self), "algorithm": ALGORITHM}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def valid_mask(self, xyz: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The valid-point mask [H,W] after plane removal and largest-cluster selection."""
        import open3d as o3d

        keep = valid.copy()
        if self.plane:
            edge = np.zeros_like(valid)
            b = self.border
            edge[:b], edge[-b:], edge[:, :b], edge[:, -b:] = True, True, True, True
            support = xyz[edge & valid].astype(np.float64)
            if len(support) >= 3:
                o3d.utility.random.seed(self.seed)
                cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(support))
                (a, bb, c, d), _ = cloud.segment_plane(
                    self.plane_distance, 3, self.ransac_iterations
                )
                dist = np.abs(xyz.astype(np.float64) @ np.array([a, bb, c]) + d)
                keep &= dist >= self.plane_distance * np.sqrt(a * a + bb * bb + c * c)
        if self.cluster and keep.sum() >= self.min_points:
            largest = largest_dbscan_cluster(xyz[keep], self.eps, self.min_points)
            if largest.any():
                rows, cols = np.nonzero(keep)
                keep[:] = False
                keep[rows[largest], cols[largest]] = True
        return keep


def cache_dir() -> Path:
    return builtin.cache_dir() / "preprocessed_3d"


def cache_file(path: Path, settings: Preprocess3D) -> Path:
    """Where the mask of the raw file ``path`` (by path, size, mtime) under ``settings`` is kept."""
    stat = Path(path).stat()
    ident = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings.key()}"
    return cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npy"


def cached_valid_mask(
    path: Path, xyz: np.ndarray, valid: np.ndarray, settings: Preprocess3D
) -> np.ndarray:
    """``settings.valid_mask`` for the cloud read from ``path``, computed once and cached."""
    file = cache_file(path, settings)
    if file.is_file():
        mask = np.load(file)
        if mask.shape == valid.shape:
            return mask
    mask = settings.valid_mask(xyz, valid)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, mask)
    os.replace(tmp, file)
    return mask
