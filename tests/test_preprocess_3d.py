"""MVTec 3D-AD preprocessing on generated scans: background plane, largest cluster, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.datasets.mvtec_3d import MVTec3D, read_xyz
from bench.datasets.preprocess_3d import Preprocess3D, cache_dir, largest_dbscan_cluster


def _plane_distance(xyz: np.ndarray, valid: np.ndarray, border: int = 10) -> np.ndarray:
    """Distance of every grid point to the least-squares plane of the border points."""
    edge = np.zeros_like(valid)
    edge[:border], edge[-border:], edge[:, :border], edge[:, -border:] = True, True, True, True
    p = xyz[edge & valid].astype(np.float64)
    centre = p.mean(0)
    normal = np.linalg.svd(p - centre)[2][-1]
    return np.abs((xyz - centre) @ normal)


@pytest.mark.slow
def test_plane_removal_keeps_the_object_and_drops_the_table(ad3d_root):
    path = sorted((ad3d_root / "dome" / "train" / "good" / "xyz").glob("*.tiff"))[0]
    xyz = read_xyz(path)
    valid = (xyz != 0).any(-1)
    settings = Preprocess3D(plane_distance=0.001, cluster=False)
    keep = settings.valid_mask(xyz, valid)
    height = _plane_distance(xyz, valid)
    assert not keep[valid & (height < 0.0008)].any()  # the table is gone
    assert keep[valid & (height > 0.0015)].mean() > 0.99  # the part stays
    assert not (keep & ~valid).any()


def test_largest_cluster_drops_a_separate_blob(ad3d_root):
    path = sorted((ad3d_root / "puck" / "train" / "good" / "xyz").glob("*.tiff"))[0]
    xyz = read_xyz(path).copy()
    valid = (xyz != 0).any(-1)
    xyz[2:6, 2:6] = xyz[2:6, 2:6] + np.array([0, 0, -0.02], dtype=np.float32)  # 2 cm above
    settings = Preprocess3D(plane_distance=0.001)
    keep = settings.valid_mask(xyz, valid)
    assert not keep[2:6, 2:6].any()
    only_plane = Preprocess3D(plane_distance=0.001, cluster=False).valid_mask(xyz, valid)
    assert only_plane[2:6, 2:6].all() and keep.sum() > 0.9 * (only_plane.sum() - 16)


def _open3d_largest_cluster(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    labels = np.asarray(cloud.cluster_dbscan(eps, min_points))
    if not (labels >= 0).any():
        return np.zeros(len(points), dtype=bool)
    return labels == np.bincount(labels[labels >= 0]).argmax()


@pytest.mark.parametrize("eps,min_points", [(0.006, 30), (0.004, 10), (0.01, 50), (0.002, 5)])
def test_grid_dbscan_keeps_exactly_open3ds_largest_cluster(eps, min_points):
    """Blobs of different density, uniform noise and points near two clusters: the same
    largest cluster as open3d's cluster_dbscan, point for point."""
    rng = np.random.default_rng(int(eps * 1e4) + min_points)
    points = np.concatenate(
        [
            rng.normal(0, 0.01, (3000, 3)),
            rng.normal(0.05, 0.004, (1500, 3)),
            rng.normal([0.02, -0.03, 0], 0.002, (400, 3)),
            rng.uniform(-0.1, 0.1, (600, 3)),
        ]
    )
    ours = largest_dbscan_cluster(points, eps, min_points)
    assert ours.any()
    assert np.array_equal(ours, _open3d_largest_cluster(points, eps, min_points))


def test_grid_dbscan_matches_open3d_on_a_scan(ad3d_root):
    path = sorted((ad3d_root / "puck" / "test" / "hole" / "xyz").glob("*.tiff"))[0]
    xyz = read_xyz(path)
    valid = (xyz != 0).any(-1)
    points = xyz[Preprocess3D(plane_distance=0.001, cluster=False).valid_mask(xyz, valid)]
    for eps, min_points in ((0.006, 30), (0.0015, 12)):
        expected = _open3d_largest_cluster(points, eps, min_points)
        assert np.array_equal(largest_dbscan_cluster(points, eps, min_points), expected)
    assert not largest_dbscan_cluster(points[:5], 0.006, 30).any()  # too few points: none


def test_loader_applies_and_caches_the_preprocessing(ad3d_root):
    options = {"plane_distance": 0.001}
    ds = MVTec3D(ad3d_root, "dome", "train", image_size=None, preprocess=options)
    first = ds[0]
    files = list(cache_dir().glob("*.npy"))
    assert files, "the preprocessed mask was not cached"
    raw = MVTec3D(ad3d_root, "dome", "train", image_size=None)[0]
    assert first["valid"].sum() < raw["valid"].sum()
    assert torch.equal(
        first["xyz"][:, ~first["valid"]], torch.zeros(3, int((~first["valid"]).sum()))
    )
    # the next read comes from the cache: a doctored cache file shows through
    target = max(files, key=lambda f: f.stat().st_mtime)
    doctored = np.zeros_like(np.load(target))
    doctored[:5, :5] = True
    np.save(target, doctored)
    again = MVTec3D(ad3d_root, "dome", "train", image_size=None, preprocess=options)[0]
    assert int(again["valid"].sum()) <= 25


def test_bad_preprocess_settings_are_named():
    with pytest.raises(ValueError, match="unknown setting"):
        Preprocess3D.from_option({"eps": 0.01, "radius": 3})
