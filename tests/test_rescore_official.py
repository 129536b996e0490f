"""``bench evaluate`` re-scores exported maps of MVTec LOCO AD and MVTec AD 2 with their own
official metrics, as the run scored them: AU-sPRO for LOCO; for AD 2 the validation maps the
export now holds set SegF1's threshold again. Checked against the run's record and against
independent computations on the exported files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from reference_metrics import au_spro as reference_au_spro
from sklearn.metrics import f1_score

from bench.cli import main
from bench.datasets import synthetic_ad2, synthetic_loco
from bench.datasets.mvtec_ad2 import MVTecAD2
from bench.errors import ConfigError, DataError
from bench.evaluation_ad2 import AD2Evaluator
from bench.rescore import dataset_kind, evaluate_maps
from bench.types import Prediction, collate

AD2_SHAPE = (64, 96)  # the generated AD 2 images' (height, width)
N_VALIDATION = 3


@pytest.fixture(scope="module")
def loco_root(tmp_path_factory) -> Path:
    return synthetic_loco.generate(
        tmp_path_factory.mktemp("loco"),
        categories=("pushpins",),
        n_train=4,
        n_validation=1,
        n_test_good=3,
        n_logical=4,
        n_structural=3,
    )


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory) -> Path:
    return synthetic_ad2.generate(
        tmp_path_factory.mktemp("ad2"),
        categories=("can",),
        size=AD2_SHAPE,
        n_train=4,
        n_validation=N_VALIDATION,
        n_test_good=3,
        n_test_bad=4,
        n_private=1,
        n_private_mixed=1,
    )


def run_export(out: Path, dataset: str, root: Path, category: str) -> tuple[Path, dict]:
    """``bench run`` of feature_stats on one category at 32 px with ``--export-maps``:
    (the exported maps, the job's record)."""
    args = ["run", "--detectors", "feature_stats", "--datasets", dataset]
    args += ["--root", f"{dataset}={root}", "--categories", category, "--image-size", "32"]
    args += ["--no-tracking", "--output", str(out / "results"), "--name", "exp"]
    assert main([*args, "--export-maps", str(out / "maps")]) == 0
    job = out / "results" / "exp" / "jobs" / f"feature_stats__{dataset}__{category}__seed0.json"
    return out / "maps" / "feature_stats" / dataset / "seed0", json.loads(job.read_text())


def assert_same_metrics(rescored: dict, record: dict) -> None:
    assert rescored["protocol"] == record["protocol"]
    assert set(rescored["metrics"]) == set(record["metrics"])
    for group, values in record["metrics"].items():
        assert set(rescored["metrics"][group]) == set(values), group
        for key, value in values.items():
            found = rescored["metrics"][group][key]
            assert found == pytest.approx(value, abs=1e-12, nan_ok=True), (group, key)


def test_roots_are_recognised(loco_root, ad2_root, ad_root):
    assert dataset_kind(loco_root) == "loco"
    assert dataset_kind(ad2_root) == "mvtec_ad2"
    assert dataset_kind(ad_root) == "mvtec_ad"


def test_loco_is_rescored_with_the_official_protocol_only(loco_root, tmp_path):
    (tmp_path / "pushpins").mkdir()
    with pytest.raises(ConfigError, match=r"MVTec LOCO AD root.*official protocol only.*fast"):
        evaluate_maps(tmp_path, loco_root, protocol="fast")


# --- MVTec LOCO AD: a run, then bench evaluate --------------------------------------------------


def _channels(root: Path, gt_dir: Path) -> list[tuple[np.ndarray, int]]:
    """Each ground-truth PNG as (bool mask, saturation area), read here from the files."""
    config = {e["pixel_value"]: e for e in json.loads((root / "defects_config.json").read_text())}
    out = []
    for png in sorted(gt_dir.glob("*.png")):
        raw = np.asarray(Image.open(png))
        entry, area = config[int(raw.max())], int((raw > 0).sum())
        t = entry["saturation_threshold"]
        out.append((raw > 0, max(1, int(t * area)) if entry["relative_saturation"] else t))
    return out


@pytest.mark.slow
def test_loco_rescoring_reproduces_the_run(loco_root, tmp_path):
    maps, record = run_export(tmp_path, "mvtec_loco", loco_root, "pushpins")
    assert record["protocol"] == "official-loco"
    (rescored,) = evaluate_maps(maps, loco_root, score_files=[maps / "pushpins" / "scores.csv"])
    assert_same_metrics(rescored, record)
    assert rescored["dataset"] == "loco" and rescored["warnings"] == []
    # AU-sPRO of the exported maps, by its definition on the ground-truth PNGs
    base = loco_root / "pushpins"
    amaps, channels = [], []
    for image in sorted((base / "test").glob("*/*.png")):
        kind = image.parent.name
        amaps.append(tifffile.imread(maps / "pushpins" / "test" / kind / f"{image.stem}.tiff"))
        gt = base / "ground_truth" / kind / image.stem
        channels.append(_channels(base, gt) if kind != "good" else [])
    assert rescored["metrics"]["all"]["au_spro_05"] == pytest.approx(
        reference_au_spro(amaps, channels, 0.05), abs=1e-9
    )


# --- MVTec AD 2: validation maps in the export, a run, then bench evaluate ----------------------


def _maps(dataset: MVTecAD2, seed: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """A map per item at ``size``: noise, higher on the defects."""
    rng = np.random.default_rng(seed)
    out = []
    for item in dataset.items:
        mask = dataset.target(item, AD2_SHAPE, torch.tensor([0, 0, *AD2_SHAPE]))["mask"]
        amap = rng.normal(0, 0.3, AD2_SHAPE) + mask.numpy() * rng.uniform(0.4, 1.6)
        small = torch.nn.functional.interpolate(
            torch.from_numpy(amap.astype(np.float32))[None, None], size=size, mode="area"
        )
        out.append(small[0, 0])
    return out


def _export(root: Path, out: Path, **geometry) -> tuple[Path, AD2Evaluator, dict]:
    """AD2Evaluator fed maps of can at the loader's size, exporting to ``out``."""
    dataset = MVTecAD2(root, "can", "test", **geometry)
    size = tuple(dataset[0]["image"].shape[1:])
    maps = _maps(dataset, 0, size)
    evaluator = AD2Evaluator(export_dir=out)
    for start in range(0, len(dataset), 4):
        idx = range(start, min(start + 4, len(dataset)))
        amap = torch.stack([maps[i] for i in idx])
        evaluator.update(
            Prediction(amap.flatten(1).amax(1), amap), collate([dataset[i] for i in idx])
        )
    return out, evaluator, {"metrics": evaluator.compute(), "protocol": evaluator.protocol_label}


@pytest.fixture(scope="module")
def ad2_export(ad2_root, tmp_path_factory) -> tuple[Path, AD2Evaluator, dict]:
    return _export(ad2_root, tmp_path_factory.mktemp("ad2_export"), image_size=(16, 24))


def _threshold(folder: Path) -> float:
    """MVTec's baseline threshold (mean + 3 std of every validation pixel) from the files."""
    pixels = np.concatenate([tifffile.imread(p).ravel() for p in sorted(folder.glob("*.tiff"))])
    return float(pixels.astype(np.float64).mean() + 3 * pixels.astype(np.float64).std())


def test_ad2_validation_maps_are_exported_at_native_size(ad2_root, ad2_export):
    maps, evaluator, record = ad2_export
    folder = maps / "can" / "validation" / "good"
    files = sorted(folder.glob("*"))
    assert [p.name for p in files] == [
        f"{p.stem}.tiff" for p in sorted((ad2_root / "can" / "validation" / "good").glob("*"))
    ]
    amap = tifffile.imread(files[0])
    assert amap.dtype == np.float32 and amap.shape == AD2_SHAPE
    assert len(evaluator.maps) == 7  # no validation map is kept: only the test_public ones
    assert record["metrics"]["all"]["seg_threshold"] == pytest.approx(_threshold(folder), rel=1e-12)
    assert not (maps / "can" / "crop.json").exists()


def test_ad2_rescoring_reproduces_the_evaluator(ad2_root, ad2_export):
    maps, evaluator, record = ad2_export
    (rescored,) = evaluate_maps(maps, ad2_root, score_files=[maps / "can" / "scores.csv"])
    assert_same_metrics(rescored, record)
    assert rescored["n_validation"] == N_VALIDATION and rescored["warnings"] == []


def test_cropped_ad2_export_records_the_validation_rois(ad2_root, tmp_path):
    maps, _, record = _export(ad2_root, tmp_path / "maps", image_size=(32, 48), crop_size=(24, 36))
    assert record["protocol"] == "official-ad2-cropped"
    crop = maps / "can" / "crop.json"
    roi = json.loads(crop.read_text())["roi"]
    assert roi == [8, 12, 56, 84]
    (rescored,) = evaluate_maps(maps, ad2_root, score_files=[maps / "can" / "scores.csv"])
    assert_same_metrics(rescored, record)
    # per-image ROIs: the validation maps' keys are validation/good/<id>
    ids = [f"{p.parent.name}/{p.stem}" for p in (maps / "can" / "test").glob("*/*.tiff")]
    ids += [f"validation/good/{p.stem}" for p in (maps / "can" / "validation" / "good").glob("*")]
    rois = {key: roi for key in sorted(ids)}
    crop.write_text(json.dumps({"rois": rois}))
    (rescored,) = evaluate_maps(maps, ad2_root, score_files=[maps / "can" / "scores.csv"])
    assert_same_metrics(rescored, record)
    del rois["validation/good/000_regular"]
    crop.write_text(json.dumps({"rois": rois}))
    with pytest.raises(DataError, match="has no ROI for validation/good/000_regular"):
        evaluate_maps(maps, ad2_root)


def test_missing_or_extra_validation_maps_are_named(ad2_root, ad2_export, tmp_path):
    maps = Path(shutil.copytree(ad2_export[0], tmp_path / "maps"))
    folder = maps / "can" / "validation" / "good"
    (folder / "001_regular.tiff").unlink()
    with pytest.raises(
        DataError,
        match=rf"category can: 1 of 3 validation images have no anomaly map in "
        rf"{re.escape(str(folder))} .*001_regular.tiff.*SegF1 threshold",
    ):
        evaluate_maps(maps, ad2_root)
    shutil.rmtree(maps / "can" / "validation")
    with pytest.raises(DataError, match=rf"3 of 3 validation images .* {re.escape(str(folder))}"):
        evaluate_maps(maps, ad2_root)
    shutil.copytree(ad2_export[0] / "can" / "validation", maps / "can" / "validation")
    tifffile.imwrite(folder / "999_regular.tiff", np.zeros(AD2_SHAPE, np.float32))
    with pytest.raises(DataError, match=r"1 anomaly map\(s\) in .* match no validation image"):
        evaluate_maps(maps, ad2_root)


@pytest.mark.slow
def test_ad2_run_is_reproduced_by_bench_evaluate(ad2_root, tmp_path, capsys):
    maps, record = run_export(tmp_path, "mvtec_ad2", ad2_root, "can")
    assert record["protocol"] == "official-ad2"
    folder = maps / "can" / "validation" / "good"
    assert len(list(folder.glob("*.tiff"))) == N_VALIDATION
    out = tmp_path / "rescored"
    args = ["evaluate", "--maps", str(maps), "--data", str(ad2_root), "--output", str(out)]
    assert main([*args, "--scores", str(maps / "can" / "scores.csv")]) == 0
    assert "seg_f1" in capsys.readouterr().out
    (rescored,) = json.loads(out.with_suffix(".json").read_text())
    assert_same_metrics(rescored, record)
    # SegF1 of the exported test maps at the threshold of the exported validation maps
    t = _threshold(folder)
    assert record["metrics"]["all"]["seg_threshold"] == pytest.approx(t, rel=1e-12)
    pred, gt = [], []
    for image in sorted((ad2_root / "can" / "test_public").glob("*/*.png")):
        kind = image.parent.name
        pred.append(tifffile.imread(maps / "can" / "test" / kind / f"{image.stem}.tiff") > t)
        mask = ad2_root / "can" / "test_public" / "ground_truth" / kind / f"{image.stem}_mask.png"
        gt.append(np.asarray(Image.open(mask)) > 0 if mask.is_file() else np.zeros(AD2_SHAPE))
    expected = f1_score(np.concatenate(gt, None).ravel() > 0, np.concatenate(pred, None).ravel())
    assert record["metrics"]["all"]["seg_f1"] == pytest.approx(expected, abs=1e-12)
