"""VisA loader on generated data in the official layout: counts, labels, native-size masks with
the non-zero rule, errors that name the file, and a short benchmark run on ``builtin_visa``."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main
from bench.datasets import DatasetLayoutError, VisA, get_dataset, synthetic_visa, visa
from bench.datasets.builtin import generated_root

SHAPE = (120, 160)  # the generator's (height, width): not square


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return synthetic_visa.generate(
        tmp_path_factory.mktemp("visa"), n_train=6, n_test_good=3, n_anomaly=5
    )


@pytest.fixture
def copy(visa_root, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(visa_root, tmp_path / "visa"))


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "split_csv" / "1cls.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _rewrite(root: Path, edit) -> None:
    path = root / "split_csv" / "1cls.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_counts_labels_and_defects_follow_the_csv(visa_root):
    rows = _rows(visa_root)
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    counts = Counter((r["object"], r["split"], r["label"]) for r in rows)
    for category in ("candle", "pcb1"):
        train = VisA(visa_root, category, "train", image_size=32)
        test = VisA(visa_root, category, "test", image_size=32)
        assert len(train) == counts[category, "train", "normal"] == 6
        assert len(test) == counts[category, "test", "normal"] + counts[category, "test", "anomaly"]
        assert train.defect_types == ["good"] and test.defect_types == ["anomaly", "good"]
        labels = [int(test[i]["label"]) for i in range(len(test))]
        assert labels == [int(it["defect"] == "anomaly") for it in test.items]
        assert sum(labels) == counts[category, "test", "anomaly"] == 5
        listed = {visa_root / r["image"] for r in rows if r["object"] == category}
        assert {it["path"] for it in (*train.items, *test.items)} == listed


def test_masks_are_native_size_and_every_non_zero_pixel_is_anomalous(visa_root):
    test = VisA(visa_root, "candle", "test", image_size=32)
    for i, item in enumerate(test.items):
        sample = test[i]
        assert sample["image"].shape == (3, 32, 32) and test.native_size(item) == SHAPE
        assert sample["mask"].shape == SHAPE and sample["mask"].dtype == torch.bool
        if item["defect"] == "good":
            assert not sample["mask"].any() and item["mask_path"] is None
            continue
        raw = np.asarray(Image.open(item["mask_path"]))
        assert set(np.unique(raw)) == {0, 1}  # VisA stores 1, not 255
        assert torch.equal(sample["mask"], torch.from_numpy(raw == 1))
        assert sample["meta"]["defect"] == "anomaly" and sample["meta"]["category"] == "candle"


def test_categories_registry_and_root(visa_root, monkeypatch):
    assert visa.categories(visa_root) == ["candle", "pcb1"]
    assert visa.broken_categories(visa_root) == {}
    spec = get_dataset("visa")
    assert spec.loader is VisA and spec.modalities == ("image",) and spec.root_env == "VISA_ROOT"
    assert get_dataset("builtin_visa").loader is VisA
    monkeypatch.setenv("VISA_ROOT", str(visa_root))
    assert spec.root() == visa_root and spec.categories() == ["candle", "pcb1"]
    monkeypatch.delenv("VISA_ROOT")
    assert spec.root() == Path("data/visa")


def test_missing_mask_file_is_named_with_its_image(copy):
    row = next(r for r in _rows(copy) if r["object"] == "pcb1" and r["label"] == "anomaly")
    (copy / row["mask"]).unlink()
    with pytest.raises(DatasetLayoutError) as err:
        VisA(copy, "pcb1", "test")
    text = str(err.value)
    assert (
        f"mask {copy / row['mask']} of anomaly image {copy / row['image']} does not exist" in text
    )
    assert "split_csv/1cls.csv" in text and "Data/Masks/Anomaly" in text  # the layout
    VisA(copy, "pcb1", "train")  # the train split does not need it


def test_anomaly_row_without_mask_is_named(copy):
    _rewrite(copy, lambda lines: [*lines[:-1], lines[-1].rsplit(",", 1)[0] + ","])
    last = _rows(copy)[-1]
    with pytest.raises(DatasetLayoutError, match=f"row {len(_rows(copy)) + 1}: anomaly image"):
        VisA(copy, last["object"], "test")


def test_missing_image_is_named(copy):
    row = next(r for r in _rows(copy) if r["object"] == "candle" and r["split"] == "train")
    (copy / row["image"]).unlink()
    with pytest.raises(DatasetLayoutError, match=f"image {copy / row['image']} does not exist"):
        VisA(copy, "candle", "train")


def test_broken_header_and_values_are_named(copy):
    _rewrite(copy, lambda lines: ["object,split,label,img,mask", *lines[1:]])
    with pytest.raises(DatasetLayoutError) as err:
        visa.categories(copy)
    assert "lacks column(s) image" in str(err.value)
    assert "expected the columns object,split,label,image,mask" in str(err.value)

    _rewrite(copy, lambda lines: [",".join(visa.COLUMNS), *lines[1:]])
    _rewrite(copy, lambda lines: [*lines[:2], lines[2].replace(",train,", ",val,"), *lines[3:]])
    with pytest.raises(DatasetLayoutError, match="row 3: split 'val' is not one of"):
        VisA(copy, "candle", "train")
    _rewrite(
        copy, lambda lines: [*lines[:2], lines[2].replace(",val,normal,", ",train,ok,"), *lines[3:]]
    )
    with pytest.raises(DatasetLayoutError, match="row 3: label 'ok' is not one of"):
        visa.categories(copy)


def test_missing_root_csv_and_category(copy, tmp_path):
    with pytest.raises(DatasetLayoutError, match=f"VisA root {tmp_path / 'nope'} does not exist"):
        visa.categories(tmp_path / "nope")
    with pytest.raises(DatasetLayoutError, match="no category 'capsules'.*'candle', 'pcb1'"):
        VisA(copy, "capsules", "test")
    shutil.rmtree(copy / "pcb1" / "Data" / "Images")
    assert visa.categories(copy) == ["candle"]
    assert "pcb1" in visa.broken_categories(copy)
    with pytest.raises(DatasetLayoutError, match=r"pcb1/Data/Images is missing"):
        get_dataset("visa").categories(copy)
    (copy / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"split file .*split_csv/1cls.csv is missing"):
        visa.categories(copy)


@pytest.mark.slow
def test_bench_run_on_builtin_visa_detects_the_defects(tmp_path, monkeypatch):
    """``builtin_visa`` reads its cached root; a small set is generated there beforehand."""
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path / "cache"))
    synthetic_visa.generate(generated_root("visa"), n_train=12, n_test_good=6, n_anomaly=8)
    out = tmp_path / "out"
    args = ["run", "--detectors", "feature_stats", "--datasets", "builtin_visa"]
    args += ["--image-size", "96", "--no-tracking", "--output", str(out), "--name", "visa"]
    assert main(args) == 0
    for category in ("candle", "pcb1"):
        job = out / "visa" / "jobs" / f"feature_stats__builtin_visa__{category}__seed0.json"
        record = json.loads(job.read_text())
        assert record["n_test"] == 14
        assert record["metrics"]["all"]["image_auroc"] > 0.75, (category, record["metrics"])


def test_bench_visa_config_plans_the_2d_detectors_on_visa_root(visa_root, monkeypatch):
    from bench.config import builtin_configs, load_config
    from bench.plan import plan_jobs

    assert "bench-visa" in builtin_configs()
    monkeypatch.setenv("VISA_ROOT", str(visa_root))
    jobs = {j.run_name: j for j in plan_jobs(load_config("bench-visa"))}
    assert sorted(jobs) == [
        f"{d}/visa/{c}/seed0" for d in ("feature_stats", "knn") for c in ("candle", "pcb1")
    ]
    knn = jobs["knn/visa/pcb1/seed0"]
    assert (knn.image_size, knn.crop_size) == (256, 224)  # bench-2d's knn geometry
    assert all(Path(j.root) == visa_root.resolve() for j in jobs.values())
