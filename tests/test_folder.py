"""The ``folder`` dataset on real files: the seeded, recorded split (checked against the rule
restated here), masks matched by stem, anomalib's options (lists, absolute folders, extensions,
normal_test_dir), errors that name the files, and the built-in folders and their config."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench.cli import main
from bench.datasets import DatasetLayoutError, get_dataset, synthetic_folder
from bench.datasets.builtin import generated_root
from bench.datasets.folder import FolderDataset, category_name
from bench.errors import ConfigError, DataError
from bench.evaluation import Evaluator
from bench.types import Prediction, collate

SIZE = (48, 64)  # (height, width) of the generated images
N_NORMAL, N_ABNORMAL = 11, 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return synthetic_folder.generate(
        tmp_path_factory.mktemp("parts"), size=SIZE, n_normal=N_NORMAL, n_abnormal=N_ABNORMAL
    )


@pytest.fixture
def copy(root, tmp_path) -> Path:
    """A private copy to break (its category is "copy")."""
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _open(root: Path, split: str, **options) -> FolderDataset:
    return FolderDataset(root, category_name(root), split, image_size=32, **options)


def _rel(ds: FolderDataset, defect: str | None = None) -> list[str]:
    items = [it for it in ds.items if defect is None or it["defect"] == defect]
    return sorted(Path(it["path"]).relative_to(ds.root).as_posix() for it in items)


def _expected_held_out(normals: list[str], ratio: float, seed: int) -> list[str]:
    """The documented rule, restated: the round(ratio * n) paths first by sha256("seed/path")."""
    k = math.floor(ratio * len(normals) + 0.5)
    ranked = sorted(normals, key=lambda p: hashlib.sha256(f"{seed}/{p}".encode()).digest())
    return sorted(ranked[:k])


def _png(path: Path, shape: tuple[int, int], value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def test_seeded_split_is_deterministic_recorded_and_disjoint(root):
    normals = sorted(f"normal/{p.name}" for p in (root / "normal").iterdir())
    assert len(normals) == N_NORMAL and {Path(n).suffix for n in normals} == {
        ".png",
        ".jpg",
        ".bmp",
    }
    expected = _expected_held_out(normals, 0.2, 0)
    assert len(expected) == 2  # round(0.2 * 11)
    train, test = _open(root, "train"), _open(root, "test")
    assert train.held_out == test.held_out == expected
    assert _rel(train) == sorted(set(normals) - set(expected))
    assert _rel(test, "good") == expected
    assert test.split_record == {"normal_split_ratio": 0.2, "seed": 0, "held_out": expected}
    for i, item in enumerate(test.items):
        meta = test[i]["meta"]
        assert meta["held_out"] == (item["defect"] == "good")
        assert int(test[i]["label"]) == (item["defect"] != "good")
    assert _open(root, "test").held_out == expected  # a second opening: the same split
    other = _open(root, "train", seed=1, normal_split_ratio=0.5)
    assert other.held_out == _expected_held_out(normals, 0.5, 1) != expected
    assert len(other.held_out) == 6 and len(other) == 5
    alias = _open(root, "train", test_split_ratio=0.5, seed=1)  # anomalib's data module name
    assert alias.held_out == other.held_out


def test_abnormal_images_get_their_masks_by_stem_at_native_size(root):
    test = _open(root, "test")
    abnormal = [it for it in test.items if it["defect"] != "good"]
    assert len(abnormal) == N_ABNORMAL and test.defect_types == ["abnormal", "good"]
    masks = {p.stem: p for p in (root / "masks").iterdir()}
    pairs = 0
    for i, item in enumerate(test.items):
        sample = test[i]
        assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == SIZE
        if item["defect"] == "good":
            assert not sample["mask"].any()
            continue
        stem = Path(item["path"]).stem
        mask_file = masks.get(stem) or masks[f"{stem}_mask"]
        assert item["mask_path"] == mask_file
        expected = np.asarray(Image.open(mask_file).convert("L")) != 0
        assert sample["mask"].any() and torch.equal(sample["mask"], torch.from_numpy(expected))
        pairs += mask_file.suffix != Path(item["path"]).suffix or mask_file.stem != stem
    assert pairs == N_ABNORMAL  # every pair differs in extension or name: matched by stem


def test_anomalib_options_lists_absolute_folders_extensions_and_normal_test_dir(tmp_path):
    root = tmp_path / "line"
    for name in ("a", "b"):
        _png(root / "good" / f"{name}.png", (40, 50))
    Image.new("RGB", (50, 40)).save(root / "good" / "c.jpg")  # left out by extensions
    (root / "good" / ".thumbs").mkdir()
    (root / "good" / ".thumbs" / "a.png").write_bytes(b"not an image")  # hidden: skipped
    extra = _png(tmp_path / "elsewhere" / "d.png", (30, 20)).parent  # absolute, outside root
    _png(root / "defects" / "scratch" / "000.png", (30, 20))
    _png(root / "defects" / "dent" / "000.png", (36, 44))
    scratch = _png(root / "gt" / "scratch" / "000_mask.png", (30, 20), value=0)
    dent = _png(root / "gt" / "dent" / "000.png", (36, 44), value=0)
    for path in (scratch, dent):  # masks storing 1: every non-zero pixel counts
        array = np.asarray(Image.open(path)).copy()
        array[5:9, 3:7] = 1
        Image.fromarray(array).save(path)
    options = {
        "normal_dir": ["good", str(root / "good")],  # the same folder twice: listed once
        "normal_test_dir": str(extra),
        "abnormal_dir": ["defects/scratch", str(root / "defects" / "dent")],
        "mask_dir": "gt",
        "extensions": ["PNG"],
    }
    train, test = _open(root, "train", **options), _open(root, "test", **options)
    assert _rel(train) == ["good/a.png", "good/b.png"] and train.held_out == []
    assert any("skipped 1 hidden" in w for w in train.warnings)
    assert test.split_record == {"normal_test_dir": [str(extra)]}
    by_name = {Path(it["path"]).relative_to(tmp_path).as_posix(): it for it in test.items}
    assert sorted(by_name) == [
        "elsewhere/d.png",
        "line/defects/dent/000.png",
        "line/defects/scratch/000.png",
    ]
    assert by_name["line/defects/scratch/000.png"]["mask_path"] == scratch
    assert by_name["line/defects/dent/000.png"]["mask_path"] == dent
    assert test.defect_types == ["dent", "good", "scratch"]
    for i, item in enumerate(test.items):  # sizes differ between images: masks follow each
        sample = test[i]
        native = Image.open(item["path"]).size[::-1]
        assert sample["mask"].shape == native and test.native_size(item) == native
        assert int(sample["mask"].sum()) == (0 if item["defect"] == "good" else 16)
        assert sample["meta"]["held_out"] is False


def test_mask_mismatches_name_both_folders_and_the_stems(copy):
    where = [str(copy / "abnormal"), str(copy / "masks")]
    _png(copy / "masks" / "stray.png", SIZE)
    with pytest.raises(
        DatasetLayoutError, match="no abnormal image of the same stem: stray"
    ) as err:
        _open(copy, "test")
    assert all(w in str(err.value) for w in where)
    _open(copy, "train")  # training needs no mask
    (copy / "masks" / "stray.png").unlink()
    next((copy / "masks").glob("defect_002*")).unlink()
    with pytest.raises(
        DatasetLayoutError, match="have no mask of the same stem.*: defect_002"
    ) as err:
        _open(copy, "test")
    assert all(w in str(err.value) for w in where)
    _png(copy / "masks" / "defect_002.png", SIZE)
    _png(copy / "masks" / "defect_002_mask.png", SIZE)
    with pytest.raises(DatasetLayoutError, match="defect_002.* matches several masks"):
        _open(copy, "test")


def test_missing_empty_and_overlapping_folders_are_errors(copy, tmp_path):
    with pytest.raises(
        DatasetLayoutError, match=f"normal_dir folder {copy / 'nope'} does not exist"
    ):
        _open(copy, "train", normal_dir="nope")
    with pytest.raises(
        DatasetLayoutError,
        match='mask_dir folder .*gt does not exist \\(set mask_dir = "" for none',
    ):
        _open(copy, "test", mask_dir="gt")
    (copy / "empty").mkdir()
    with pytest.raises(
        DatasetLayoutError, match=f"abnormal_dir folder {copy / 'empty'} holds no image"
    ):
        _open(copy, "test", abnormal_dir="empty")
    with pytest.raises(DatasetLayoutError, match="holds no image with extension .tif"):
        _open(copy, "train", extensions=[".tif"])
    with pytest.raises(DatasetLayoutError, match="is both in normal_dir and in abnormal_dir"):
        _open(copy, "train", normal_dir=".")
    with pytest.raises(DatasetLayoutError, match=f"root {tmp_path / 'gone'} does not exist"):
        FolderDataset(tmp_path / "gone", "gone", "train")
    with pytest.raises(DatasetLayoutError, match="has one category, 'copy'"):
        FolderDataset(copy, "parts", "train")


def test_unreadable_files_and_wrong_mask_sizes_name_the_file(copy):
    broken = copy / "normal" / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        _open(copy, "train", normal_split_ratio=0)
    broken.unlink()
    mask = next((copy / "masks").glob("defect_001*"))
    mask.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=f"cannot read ground-truth mask {mask}"):
        _open(copy, "test")
    _png(mask, (SIZE[0] + 1, SIZE[1]))
    with pytest.raises(DataError) as err:
        _open(copy, "test")
    image = next((copy / "abnormal").glob("defect_001.*"))
    assert f"{mask} is 49x64 (HxW) but its image {image} is 48x64" in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"normal_split_ratio": 1.0}, "normal_split_ratio must be a number in"),
        ({"normal_split_ratio": 0.1, "test_split_ratio": 0.3}, "disagree"),
        ({"extensions": [""]}, "extensions holds a non-suffix"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"normal_dir": ""}, "normal_dir is required"),
        ({"abnormal_dir": 3}, "abnormal_dir must be a folder or a list of folders"),
    ],
)
def test_bad_options_are_config_errors(root, options, message):
    with pytest.raises(ConfigError, match=message):
        _open(root, "test", **options)


def test_without_masks_image_metrics_are_exact_and_pixel_metrics_undefined(root):
    test = _open(root, "test", mask_dir="")
    assert any("no mask_dir" in w for w in test.warnings)
    samples = [test[i] for i in range(len(test))]
    assert not any(s["mask"].any() for s in samples)
    batch = collate(samples)
    scores = torch.stack([s["image"].mean() for s in samples])  # any fixed score
    maps = torch.stack([s["image"].mean(0) for s in samples])
    evaluator = Evaluator()
    evaluator.update(Prediction(score=scores, anomaly_map=maps), batch)
    metrics = evaluator.compute()["all"]
    labels = [int(s["label"]) for s in samples]
    assert sum(labels) == N_ABNORMAL
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores.numpy()))
    assert all(math.isnan(metrics[k]) for k in ("pixel_auroc", "pixel_ap", "au_pro"))


def test_registry_and_builtin_folder_work_without_options(monkeypatch, tmp_path):
    spec = get_dataset("folder")
    assert spec.loader is FolderDataset and spec.modalities == ("image",)
    assert spec.root_env == "FOLDER_ROOT" and spec.download is None
    monkeypatch.delenv("FOLDER_ROOT", raising=False)
    assert spec.root() == Path("data/folder")
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path / "cache"))
    synthetic_folder.generate(generated_root("folder"), size=SIZE, n_normal=6, n_abnormal=4)
    builtin = get_dataset("builtin_folder")
    assert builtin.loader is FolderDataset
    (category,) = builtin.categories()
    assert category == generated_root("folder").name
    test = builtin.open(category, "test", image_size=32)  # the loader's defaults fit it
    assert len(test.held_out) == 1 and len(test) == 1 + 4
    assert len(builtin.open(category, "train", image_size=32)) == 5


def test_bench_folder_config_plans_the_2d_detectors_with_folder_options(root, monkeypatch):
    from bench.config import builtin_configs, load_config
    from bench.plan import plan_jobs

    assert "bench-folder" in builtin_configs()
    monkeypatch.setenv("FOLDER_ROOT", str(root))
    jobs = {j.run_name: j for j in plan_jobs(load_config("bench-folder"))}
    category = category_name(root)
    assert sorted(jobs) == [f"{d}/folder/{category}/seed0" for d in ("feature_stats", "knn")]
    options = jobs[f"knn/folder/{category}/seed0"].dataset.options
    assert (options["normal_dir"], options["abnormal_dir"], options["mask_dir"]) == (
        "normal",
        "abnormal",
        "masks",
    )


@pytest.mark.slow
def test_bench_run_on_builtin_folder_detects_the_defects(tmp_path, monkeypatch):
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path / "cache"))
    synthetic_folder.generate(generated_root("folder"), n_normal=20, n_abnormal=8)
    out = tmp_path / "out"
    args = ["run", "--config", "bench-folder", "--detectors", "feature_stats"]
    args += ["--datasets", "builtin_folder", "--image-size", "96", "--no-tracking"]
    assert main([*args, "--output", str(out), "--name", "folder"]) == 0
    category = generated_root("folder").name
    job = out / "folder" / "jobs" / f"feature_stats__builtin_folder__{category}__seed0.json"
    record = json.loads(job.read_text())
    assert record["n_test"] == 4 + 8  # round(0.2 * 20) held-out normals and the anomalies
    assert record["metrics"]["all"]["image_auroc"] > 0.75, record["metrics"]


def test_a_batch_of_mixed_native_sizes_scores_each_mask_at_its_own_size(tmp_path):
    """Images of two sizes resize alike; their masks stay native and travel as a list."""
    rng = np.random.default_rng(0)
    shapes = {"a": (40, 56), "b": (64, 48), "c": (40, 56), "d": (64, 48)}
    for stem, shape in shapes.items():
        _png(tmp_path / "normal" / f"{stem}.png", shape, int(rng.integers(90, 160)))
        _png(tmp_path / "abnormal" / f"{stem}.png", shape, int(rng.integers(90, 160)))
        mask = np.zeros(shape, dtype=np.uint8)
        y, x = rng.integers(4, 20, 2)
        mask[y : y + 9, x : x + 7] = 255
        Image.fromarray(mask).save(_png(tmp_path / "masks" / f"{stem}.png", shape))
    test = _open(tmp_path, "test")
    samples = [test[i] for i in range(len(test))]
    batch = collate(samples)
    assert isinstance(batch.mask, list)
    assert sorted({tuple(m.shape) for m in batch.mask}) == [(40, 56), (64, 48)]
    maps = torch.rand(len(samples), 16, 16, generator=torch.Generator().manual_seed(1))
    evaluator = Evaluator()
    evaluator.update(Prediction(score=maps.amax((1, 2)), anomaly_map=maps), batch)
    got = evaluator.compute()["all"]["pixel_auroc"]

    native = [  # the official protocol, restated: each map upsampled to its own mask
        torch.nn.functional.interpolate(m[None, None], size=s["mask"].shape, mode="bilinear")[0, 0]
        for m, s in zip(maps, samples)
    ]
    scores = torch.cat([m.reshape(-1) for m in native]).numpy()
    truth = torch.cat([s["mask"].reshape(-1) for s in samples]).numpy()
    assert got == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_masks_named_stem_then_anything_match_as_anomalib_accepts(tmp_path):
    """anomalib's Folder takes any mask whose name contains the image's stem: here `<stem>` /
    `<stem>_mask` first, then the one mask left named `<stem>` + a separator + anything."""
    for stem in ("a", "b", "c"):
        _png(tmp_path / "normal" / f"{stem}.png", (24, 32))
    for stem in ("000", "000_x", "001", "002"):
        _png(tmp_path / "abnormal" / f"{stem}.png", (24, 32))
    for name in ("000_gt.png", "000_x_mask.png", "001-label.bmp", "002.png"):
        _png(tmp_path / "masks" / name, (24, 32), 255)
    test = _open(tmp_path, "test")
    pairs = {
        Path(it["path"]).stem: Path(it["mask_path"]).name
        for it in test.items
        if it["mask_path"] is not None
    }
    assert pairs == {
        "000": "000_gt.png",
        "000_x": "000_x_mask.png",
        "001": "001-label.bmp",
        "002": "002.png",
    }
    _png(tmp_path / "masks" / "001_other.png", (24, 32), 255)
    with pytest.raises(DatasetLayoutError, match=r"001\.png matches several masks by stem"):
        _open(tmp_path, "test")
