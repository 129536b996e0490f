"""Exported maps in the official layout re-score to the same numbers; bad inputs are named."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench.rescore import evaluate_maps

BIN = Path(sys.executable).parent


def bench(*args):
    return subprocess.run(
        [str(BIN / "bench"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ADBENCH_PROGRESS": "0"},
    )


def run_export(out: Path, detector: str, dataset: str, root: Path, category: str, *extra: str):
    """``bench run`` of one detector on one category at 64 px with ``--export-maps``:
    (the exported maps of seed 0, the job's record)."""
    run = bench(
        *("run", "--detectors", detector, "--datasets", dataset, "--root", f"{dataset}={root}"),
        *("--categories", category, "--image-size", "64", *extra, "--no-tracking"),
        *("--output", str(out / "results"), "--name", "exp", "--export-maps", str(out / "maps")),
    )
    assert run.returncode == 0, run.stderr
    job = out / "results" / "exp" / "jobs" / f"{detector}__{dataset}__{category}__seed0.json"
    return out / "maps" / detector / dataset / "seed0", json.loads(job.read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ad3d_root):
    return run_export(
        tmp_path_factory.mktemp("export"), "grid_curvature", "mvtec_3d", ad3d_root, "puck"
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_rescoring_exported_maps_reproduces_the_run(exported, ad3d_root):
    maps, record = exported
    (rescored,) = evaluate_maps(maps, ad3d_root, score_files=[maps / "puck" / "scores.csv"])
    assert (
        rescored["protocol"] == "official"
        and rescored["metric_version"] == record["metric_version"]
    )
    for group, values in record["metrics"].items():
        for key, value in values.items():
            found = rescored["metrics"][group][key]
            assert found == pytest.approx(value, abs=1e-9, nan_ok=True), (group, key)


@pytest.mark.slow
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


@pytest.mark.slow
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
    nan_map = broken / "puck" / "test" / "hole" / "001.tiff"
    tifffile.imwrite(nan_map, bad)
    with pytest.raises(
        ValueError, match=rf"anomaly map {re.escape(str(nan_map))} has NaN or infinite values"
    ):
        evaluate_maps(broken, ad3d_root)


# --- 2D (PNG) data: the export in the native frame, with and without a centre crop -------------


def run_2d(out: Path, ad_root: Path, *extra: str) -> tuple[Path, dict]:
    """feature_stats on washer at 64 px with ``--export-maps``: (maps, record)."""
    return run_export(out, "feature_stats", "mvtec_ad", ad_root, "washer", *extra)


@pytest.fixture(scope="module")
def exported_2d(tmp_path_factory, ad_root):
    return run_2d(tmp_path_factory.mktemp("export2d"), ad_root)


@pytest.fixture(scope="module")
def exported_cropped(tmp_path_factory, ad_root):
    return run_2d(tmp_path_factory.mktemp("export2d_crop"), ad_root, "--crop-size", "48")


def assert_same_metrics(rescored: dict, record: dict) -> None:
    assert rescored["protocol"] == record["protocol"]
    for group, values in record["metrics"].items():
        for key, value in values.items():
            found = rescored["metrics"][group][key]
            assert found == pytest.approx(value, abs=1e-9, nan_ok=True), (group, key)


def pixels(maps: Path, ad_root: Path, roi: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """All exported map values and mask labels of washer, inside ``roi`` when given."""
    scores, labels = [], []
    for path in sorted((ad_root / "washer" / "test").glob("*/*.png")):
        amap = tifffile.imread(maps / "washer" / "test" / path.parent.name / f"{path.stem}.tiff")
        gt = ad_root / "washer" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = np.asarray(Image.open(gt)) > 0 if gt.is_file() else np.zeros(amap.shape, bool)
        y0, x0, y1, x1 = roi or (0, 0, *amap.shape)
        scores.append(amap[y0:y1, x0:x1].ravel())
        labels.append(mask[y0:y1, x0:x1].ravel())
    return np.concatenate(scores), np.concatenate(labels)


@pytest.mark.slow
def test_2d_export_without_crop_rescoring_reproduces_the_run(exported_2d, ad_root):
    maps, record = exported_2d
    amap = tifffile.imread(maps / "washer" / "test" / "hole" / "000.tiff")
    assert amap.dtype == np.float32 and amap.shape == (128, 128)
    assert not (maps / "washer" / "crop.json").exists() and record["protocol"] == "official"
    (rescored,) = evaluate_maps(
        maps, ad_root, score_files=[maps / "washer" / "scores.csv"], bootstrap=1000
    )
    assert_same_metrics(rescored, record)
    assert rescored["warnings"] == []
    # the run's intervals too: the same maps, resamples and metrics on each resample
    assert rescored["ci"]["resamples"] == record["ci"]["resamples"] == 1000
    for metric, (low, high) in record["ci"]["metrics"].items():
        found = rescored["ci"]["metrics"][metric]
        assert found == pytest.approx([low, high], abs=1e-9, nan_ok=True), metric
    scores, labels = pixels(maps, ad_root, None)
    assert record["metrics"]["all"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-9
    )


@pytest.mark.slow
def test_cropped_export_is_in_the_native_frame_and_rescores_to_the_run(exported_cropped, ad_root):
    maps, record = exported_cropped
    assert record["protocol"] == "official-cropped"
    roi = json.loads((maps / "washer" / "crop.json").read_text())["roi"]
    assert roi == [16, 16, 112, 112]  # 64 px -> centre 48 px, in the 128 px native frame
    amap = tifffile.imread(maps / "washer" / "test" / "hole" / "000.tiff")
    assert amap.dtype == np.float32 and amap.shape == (128, 128)
    outside = np.ones(amap.shape, bool)
    outside[16:112, 16:112] = False
    assert (amap[outside] == amap.min()).all() and amap[16:112, 16:112].min() == amap.min()
    # the run scored only the crop region: sklearn on those pixels of the export agrees
    scores, labels = pixels(maps, ad_root, roi)
    assert record["metrics"]["all"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-9
    )
    (rescored,) = evaluate_maps(maps, ad_root, score_files=[maps / "washer" / "scores.csv"])
    assert_same_metrics(rescored, record)


@pytest.mark.slow
def test_per_image_crop_record_and_cli_label(exported_cropped, ad_root, tmp_path):
    maps, record = exported_cropped
    copy = tmp_path / "maps"
    shutil.copytree(maps, copy)
    ids = [f"{p.parent.name}/{p.stem}" for p in (copy / "washer" / "test").glob("*/*.tiff")]
    rois = {i: [16, 16, 112, 112] for i in ids}
    (copy / "washer" / "crop.json").write_text(json.dumps({"rois": rois}))
    (rescored,) = evaluate_maps(copy, ad_root, score_files=[copy / "washer" / "scores.csv"])
    assert_same_metrics(rescored, record)
    del rois[ids[0]]
    (copy / "washer" / "crop.json").write_text(json.dumps({"rois": rois}))
    with pytest.raises(ValueError, match=rf"crop\.json has no ROI for {ids[0]}"):
        evaluate_maps(copy, ad_root)
    out = bench(
        "evaluate", "--maps", str(maps), "--data", str(ad_root), "--output", str(tmp_path / "m")
    )
    assert out.returncode == 0, out.stderr
    assert "protocol official-cropped" in out.stdout


@pytest.fixture
def copied_2d(exported_2d, tmp_path):
    maps, _ = exported_2d
    shutil.copytree(maps, tmp_path / "maps")
    return tmp_path / "maps"


@pytest.mark.slow
def test_map_of_another_aspect_ratio_is_an_error_naming_it(copied_2d, ad_root):
    path = copied_2d / "washer" / "test" / "good" / "000.tiff"
    tifffile.imwrite(path, np.zeros((128, 64), np.float32))
    with pytest.raises(
        ValueError,
        match=rf"anomaly map {re.escape(str(path))} is 128x64 \(HxW\) but its ground truth is "
        r"128x128: another aspect ratio",
    ):
        evaluate_maps(copied_2d, ad_root)
    tifffile.imwrite(path, np.zeros((64, 63), np.float32))  # 1 px of rounding is tolerated
    (rescored,) = evaluate_maps(copied_2d, ad_root)
    assert len(rescored["warnings"]) == 1


@pytest.mark.slow
def test_maps_of_another_size_are_resized_with_one_warning_per_category(copied_2d, ad_root):
    files = sorted((copied_2d / "washer" / "test").glob("*/*.tiff"))
    for path in files:
        half = F.interpolate(
            torch.from_numpy(tifffile.imread(path))[None, None], size=(64, 64), mode="area"
        )[0, 0]
        tifffile.imwrite(path, half.numpy())
    (rescored,) = evaluate_maps(copied_2d, ad_root)
    (warning,) = rescored["warnings"]
    assert f"category washer: {len(files)} of {len(files)} anomaly maps are not at" in warning
    assert f"e.g. {files[0]} is 64x64, not 128x128" in warning
    # resized bilinearly to the ground truth, as sklearn sees it
    scores, labels = [], []
    for path in files:
        small = torch.from_numpy(tifffile.imread(path))[None, None]
        up = F.interpolate(small, size=(128, 128), mode="bilinear", align_corners=False)
        scores.append(up[0, 0].numpy().ravel())
        gt = ad_root / "washer" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = np.asarray(Image.open(gt)) > 0 if gt.is_file() else np.zeros((128, 128), bool)
        labels.append(mask.ravel())
    expected = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert rescored["metrics"]["all"]["pixel_auroc"] == pytest.approx(expected, abs=1e-9)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(["category,defect,id,score", *lines]) + "\n")
    return path


@pytest.fixture
def score_rows(copied_2d) -> tuple[Path, list[str]]:
    csv = copied_2d / "washer" / "scores.csv"
    return csv, csv.read_text().splitlines()[1:]


@pytest.mark.slow
def test_a_duplicated_score_row_is_an_error_naming_it(copied_2d, ad_root, score_rows):
    csv, lines = score_rows
    where = re.escape(str(csv))
    write_csv(csv, [*lines, "washer,hole,000,99"])
    with pytest.raises(
        ValueError,
        match=rf"scores file {where}, line {len(lines) + 2}: row \(washer, hole, 000\) repeats "
        rf"the one at {where}, line \d+; expected one row per test image",
    ):
        evaluate_maps(copied_2d, ad_root, score_files=[csv])


@pytest.mark.slow
def test_an_unknown_score_row_is_an_error_naming_it(copied_2d, ad_root, score_rows):
    csv, lines = score_rows
    write_csv(csv, [*lines, "washer,hole,999,0.5"])
    with pytest.raises(
        ValueError,
        match=rf"scores file {re.escape(str(csv))}, line {len(lines) + 2}: row \(washer, hole, "
        r"999\) matches no test image of the evaluated categories \['washer'\]",
    ):
        evaluate_maps(copied_2d, ad_root, score_files=[csv])


@pytest.mark.parametrize("bad", ["high", "nan", "inf", ""])
@pytest.mark.slow
def test_a_score_that_is_not_a_finite_number_names_file_and_line(
    copied_2d, ad_root, score_rows, bad
):
    csv, lines = score_rows
    write_csv(csv, [*lines[:2], lines[2].rsplit(",", 1)[0] + "," + bad, *lines[3:]])
    with pytest.raises(
        ValueError,
        match=rf"scores file {re.escape(str(csv))}, line 4: score '{bad}' is not a finite number",
    ):
        evaluate_maps(copied_2d, ad_root, score_files=[csv])


@pytest.mark.slow
def test_cli_names_a_duplicated_score_row(copied_2d, ad_root, tmp_path):
    csv = copied_2d / "washer" / "scores.csv"
    lines = csv.read_text().splitlines()[1:]
    write_csv(csv, [*lines, lines[0]])
    out = bench("evaluate", "--maps", str(copied_2d), "--data", str(ad_root), "--scores", str(csv))
    assert out.returncode == 2
    assert f"bench: error: scores file {csv}, line {len(lines) + 2}: row (" in out.stderr
