"""Exported maps in the official layout re-score to the same numbers; bad inputs are named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.rescore import evaluate_maps

BIN = Path(sys.executable).parent


def bench(*args):
    return subprocess.run(
        [str(BIN / "bench"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ADBENCH_PROGRESS": "0"},
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ad3d_root):
    out = tmp_path_factory.mktemp("export")
    run = bench(
        "run",
        "--detectors",
        "grid_curvature",
        "--datasets",
        "mvtec_3d",
        "--root",
        f"mvtec_3d={ad3d_root}",
        "--categories",
        "puck",
        "--image-size",
        "64",
        "--no-tracking",
        "--output",
        str(out / "results"),
        "--name",
        "exp",
        "--export-maps",
        str(out / "maps"),
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(
        (
            out / "results" / "exp" / "jobs" / "grid_curvature__mvtec_3d__puck__seed0.json"
        ).read_text()
    )
    return out / "maps" / "grid_curvature" / "mvtec_3d" / "seed0", record


def test_maps_are_written_in_the_official_layout_at_native_size(exported, ad3d_root):
    maps, _ = exported
    files = sorted(maps.glob("puck/test/*/*.tiff"))
    assert len(files) == 4 + 3 * 4
    amap = tifffile.imread(maps / "puck" / "test" / "dent" / "000.tiff")
    assert (
        amap.dtype == np.float32
        and amap.shape
        == tifffile.imread(ad3d_root / "puck" / "test" / "dent" / "xyz" / "000.tiff").shape[:2]
    )


def test_rescoring_exported_maps_reproduces_the_run(exported, ad3d_root):
    maps, record = exported
    (rescored,) = evaluate_maps(maps, ad3d_root, score_files=[maps / "puck" / "scores.csv"])
    assert (
        rescored["protocol"] == "official"
        and rescored["metric_version"] == record["metric_version"]
    )
    for group, values in record["metrics"].items():
        for key, value in values.items():
            assert rescored["metrics"][group][key] == pytest.approx(value, abs=1e-9), (group, key)


def test_cli_evaluate_prints_and_saves_the_table(exported, ad3d_root, tmp_path):
    maps, record = exported
    out = bench(
        "evaluate", "--maps", str(maps), "--data", str(ad3d_root), "--output", str(tmp_path / "m")
    )
    assert out.returncode == 0, out.stderr
    assert "puck" in out.stdout and "protocol official" in out.stdout
    saved = json.loads((tmp_path / "m.json").read_text())
    # default image scores = maximum of each (native-size) map; pixel metrics do not depend on them
    assert saved[0]["metrics"]["all"]["au_pro"] == pytest.approx(
        record["metrics"]["all"]["au_pro"], abs=1e-9
    )
    assert "mean" in (tmp_path / "m.csv").read_text()


def test_missing_extra_and_broken_maps_are_named(exported, ad3d_root, tmp_path):
    maps, _ = exported
    broken = tmp_path / "maps"
    shutil.copytree(maps, broken)
    (broken / "puck" / "test" / "hole" / "001.tiff").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"category puck: 1 of 16 test images have no anomaly map.*hole/001.tiff",
    ):
        evaluate_maps(broken, ad3d_root)
    tifffile.imwrite(broken / "puck" / "test" / "hole" / "001.tiff", np.zeros((4, 4), np.float32))
    tifffile.imwrite(broken / "puck" / "test" / "hole" / "999.tiff", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"1 anomaly map\(s\) match no test image.*999.tiff"):
        evaluate_maps(broken, ad3d_root)
    (broken / "puck" / "test" / "hole" / "999.tiff").unlink()
    bad = np.zeros((4, 4), np.float32)
    bad[1, 1] = np.nan
    tifffile.imwrite(broken / "puck" / "test" / "hole" / "001.tiff", bad)
    with pytest.raises(ValueError, match=r"NaN or infinite values for .*hole/xyz/001.tiff"):
        evaluate_maps(broken, ad3d_root)
