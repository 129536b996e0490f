"""MVTec 3D-AD preprocessing as in the 3D literature (3D-ADS, M3DM), cached on disk.

1. Background plane: RANSAC (open3d ``segment_plane``) on the valid points within ``border``
   pixels of the grid's edge, then every point closer than ``plane_distance`` to that plane is
   dropped.
2. Largest cluster: DBSCAN (open3d ``cluster_dbscan``, ``eps``, ``min_points``) on what is
   left; only the largest cluster stays.
Only the valid-point mask changes (dropped points become (0,0,0), as missing ones are), so the
grid stays aligned with rgb and ground truth. Results are cached keyed by the raw file (path,
size, modification time) and the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


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
            raise ValueError(
                f"preprocess must be true, false or a table of settings, got {option!r}"
            )
        unknown = set(option) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"preprocess: unknown setting(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**option)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

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
            cloud = o3d.geometry.PointCloud(
                o3d.utility.Vector3dVector(xyz[keep].astype(np.float64))
            )
            labels = np.asarray(cloud.cluster_dbscan(self.eps, self.min_points))
            if (labels >= 0).any():
                largest = np.bincount(labels[labels >= 0]).argmax()
                rows, cols = np.nonzero(keep)
                keep[:] = False
                keep[rows[labels == largest], cols[labels == largest]] = True
        return keep


def cache_dir() -> Path:
    base = os.environ.get("ADBENCH_CACHE") or Path.home() / ".cache" / "adbench"
    return Path(base) / "preprocessed_3d"


def cached_valid_mask(
    path: Path, xyz: np.ndarray, valid: np.ndarray, settings: Preprocess3D
) -> np.ndarray:
    """``settings.valid_mask`` for the cloud read from ``path``, computed once and cached."""
    stat = Path(path).stat()
    ident = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings.key()}"
    file = cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npy"
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
