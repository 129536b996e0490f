"""Point clouds that are not what their header (or their image) says: a truncated or inconsistent
.pcd, a NaN coordinate, a truncated or mis-sized MVTec 3D-AD tiff are errors naming the file,
never points made up as (0, 0, 0) and scored (issue 29, item 0)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import tifffile
from PIL import Image

from bench.cli import main
from bench.datasets import synthetic_3d, synthetic_real3d
from bench.datasets.mvtec_3d import MVTec3D
from bench.datasets.pcd import read_pcd
from bench.datasets.real3d import PointCloudSet
from bench.errors import DataError

N = 400  # points per generated cloud


@pytest.fixture(scope="module")
def clouds(tmp_path_factory) -> Path:
    """A small Real3D-AD-layout folder: 2 templates, 2 good and 2 defective test clouds."""
    return synthetic_real3d.generate(
        tmp_path_factory.mktemp("clouds"), n_train=2, n_test_good=2, n_per_defect=1, n_points=N
    )


@pytest.fixture
def root(clouds, tmp_path) -> Path:
    return shutil.copytree(clouds, tmp_path / "copy")


def _load_all(root: Path, split: str) -> None:
    data = PointCloudSet(root, "ellipsoid", split)
    for i in range(len(data)):
        data[i]


def _write_o3d(path: Path, points: np.ndarray, kind: str) -> None:
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    ascii_, compressed = kind == "ascii", kind == "binary_compressed"
    assert o3d.io.write_point_cloud(str(path), cloud, write_ascii=ascii_, compressed=compressed)


def _write_binary(path: Path, records: np.ndarray, fields: str, size: str, type_: str) -> None:
    n = len(records)
    header = (
        f"VERSION 0.7\nFIELDS {fields}\nSIZE {size}\nTYPE {type_}\nCOUNT {' '.join('1' * len(fields.split()))}\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
    )
    path.write_bytes(header.encode() + records.tobytes())


@pytest.mark.parametrize("kind", ["ascii", "binary", "binary_compressed"])
def test_an_intact_cloud_of_each_data_kind_loads_with_exactly_its_points(tmp_path, kind):
    points = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
    path = tmp_path / f"{kind}.pcd"
    _write_o3d(path, points, kind)
    assert np.array_equal(read_pcd(path), points)
    as_open3d = np.asarray(o3d.io.read_point_cloud(str(path)).points, np.float32)
    assert np.array_equal(read_pcd(path), as_open3d)  # what the loader read before


def test_binary_records_with_other_fields_and_types_are_read_by_name(tmp_path):
    """x y z as F8 among other fields (open3d's reader gives F8 as zeros)."""
    rng = np.random.default_rng(1)
    dtype = np.dtype([("i", "<u1"), ("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("n", "<f4")])
    records = np.zeros(50, dtype)
    for name in ("x", "y", "z", "n"):
        records[name] = rng.normal(size=50)
    _write_binary(
        tmp_path / "f8.pcd", records, "intensity x y z normal_x", "1 8 8 8 4", "U F F F F"
    )
    xyz = np.stack([records[a] for a in "xyz"], 1).astype(np.float32)
    assert np.array_equal(read_pcd(tmp_path / "f8.pcd"), xyz)


def test_a_cut_test_cloud_and_a_cut_template_name_the_file(root):
    """Before: open3d filled the missing points with (0, 0, 0) and they were scored."""
    good = root / "ellipsoid" / "test" / "0_good.pcd"
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) * 2 // 5])
    with pytest.raises(
        DataError,
        match=rf"{re.escape(str(good))} is truncated: its header says {N} points \({N} lines of ascii data\), the file holds \d+ lines",
    ):
        _load_all(root, "test")
    template = root / "ellipsoid" / "train" / "1_template.pcd"
    template.write_bytes(template.read_bytes()[:300])
    with pytest.raises(
        DataError, match=rf"{re.escape(str(template))} is truncated: .* holds [1-9] lines"
    ):
        _load_all(root, "train")


def test_a_line_missing_from_an_ascii_cloud_is_an_error(root):
    template = root / "ellipsoid" / "train" / "0_template.pcd"
    lines = template.read_text().splitlines(keepends=True)
    template.write_text("".join(lines[:100] + lines[101:]))
    with pytest.raises(DataError, match=f"0_template.pcd is truncated: .* holds {N - 1} lines"):
        _load_all(root, "train")


def test_a_header_whose_points_exceed_width_times_height_is_an_error(root):
    good = root / "ellipsoid" / "test" / "1_good.pcd"
    good.write_text(good.read_text().replace(f"POINTS {N}", f"POINTS {N + 100}"))
    with pytest.raises(
        DataError,
        match=f"1_good.pcd has a malformed .pcd header: POINTS {N + 100} is not WIDTH x HEIGHT = {N} x 1",
    ):
        _load_all(root, "test")


@pytest.mark.parametrize("kind", ["binary", "binary_compressed"])
def test_a_cut_binary_cloud_is_an_error_with_the_bytes_it_lacks(tmp_path, kind):
    path = tmp_path / "cut.pcd"
    _write_o3d(path, np.random.default_rng(2).normal(size=(N, 3)), kind)
    path.write_bytes(path.read_bytes()[:-100])
    unit = "bytes of binary data" if kind == "binary" else "bytes of compressed data"
    expected = rf"({N * 12}|\d+) {unit}\), the file holds \d+ {unit}"
    with pytest.raises(
        DataError, match=rf"cut.pcd is truncated: its header says {N} points \({expected}"
    ):
        read_pcd(path)


def test_a_cut_defective_cloud_is_an_error_though_its_ground_truth_is_scored(root):
    cloud = next((root / "ellipsoid" / "test").glob("*_bulge*.pcd"))
    cloud.write_bytes(cloud.read_bytes()[:2000])
    with pytest.raises(DataError, match=f"{cloud.name} is truncated"):
        _load_all(root, "test")


def test_nan_coordinates_name_the_file_and_count_the_points(root):
    """Before: scipy's 'data must be finite, check for nan or inf values' without the file."""
    rng = np.random.default_rng(3)
    records = np.zeros(N, [(a, "<f4") for a in "xyz"])
    for a in "xyz":
        records[a] = rng.normal(size=N)
    records["y"][[7, 30]] = np.nan
    records["z"][9] = np.inf
    template = root / "ellipsoid" / "train" / "0_template.pcd"
    _write_binary(template, records, "x y z", "4 4 4", "F F F")
    with pytest.raises(
        DataError,
        match=rf"0_template.pcd has 3 of {N} points with NaN or infinite coordinates \(the first is point 8:",
    ):
        _load_all(root, "train")
    gt = next((root / "ellipsoid" / "gt").glob("*.txt"))
    lines = gt.read_text().splitlines()
    lines[5] = "nan 0.0 0.0 1"
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"ground truth .*{gt.name} has 1 of"):
        _load_all(root, "test")


@pytest.mark.slow
def test_a_run_on_a_cut_template_fails_naming_it_and_records_no_job(root, tmp_path, capsys):
    """End to end: the job fails with the one-line message, rc 1, no record on fake points."""
    template = root / "ellipsoid" / "train" / "1_template.pcd"
    template.write_bytes(template.read_bytes()[:300])
    out = tmp_path / "out"
    args = ["run", "--detectors", "curvature", "--datasets", "real3d_ad", "--root", str(root)]
    code = main([*args, "--output", str(out), "--no-tracking", "--num-workers", "0"])
    assert code == 1
    text = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "failed: DataError: point cloud" in text and "1_template.pcd is truncated" in text
    assert not list(out.glob("*/jobs/*.json"))
    (failure,) = out.glob("*/failed/*.txt")
    assert f"{template} is truncated: its header says {N} points" in failure.read_text()


@pytest.fixture
def scans(tmp_path) -> Path:
    return synthetic_3d.generate(
        tmp_path / "scans",
        categories=("dome",),
        n_train=1,
        n_validation=0,
        n_test_good=1,
        n_per_defect=1,
        grid=(48, 48),
        defects=("dent",),
    )


def test_organised_scans_are_checked_against_their_image_and_readable(scans):
    test = MVTec3D(scans, "dome", "test", image_size=None)
    (index,) = [i for i, it in enumerate(test.items) if it["defect"] == "dent"]
    item = test.items[index]
    Image.open(item["rgb_path"]).resize((40, 48)).save(item["rgb_path"])
    with pytest.raises(
        DataError,
        match=r"rgb image .*000.png is \(48, 40\) \(HxW\) but its point cloud .*dent/xyz/000.tiff is \(48, 48\)",
    ):
        test[index]
    xyz = item["path"]
    xyz.write_bytes(xyz.read_bytes()[: xyz.stat().st_size // 2])
    with pytest.raises(
        DataError, match=f"cannot read point-cloud tiff {re.escape(str(xyz))} \\(truncated"
    ):
        test[index]


def test_nan_in_an_organised_scan_is_a_missing_point_as_zeros_are(scans):
    """MVTec 3D-AD marks missing points (0, 0, 0); NaN or infinite ones are missing too."""
    train = MVTec3D(scans, "dome", "train", image_size=None)
    path = train.items[0]["path"]
    xyz = tifffile.imread(path)
    xyz[3, 4], xyz[5, 6, 2] = np.nan, np.inf
    tifffile.imwrite(path, xyz, photometric="minisblack", planarconfig="contig")
    item = train[0]
    assert not item["valid"][3, 4] and not item["valid"][5, 6]
    assert item["valid"].sum() == ((xyz != 0).any(-1) & np.isfinite(xyz).all(-1)).sum()
