"""MVTec AD 2 on generated data in the official layout: the loader (splits, roles, native-size
masks storing 255, errors that name the file), the official metrics (AU-PRO to FPR 0.05 and 0.3,
SegF1 at the validation threshold) against independent computations, and the submission export
checked as MVTec's submission checker checks it, written independently of our writer."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from reference_metrics import au_pro as reference_au_pro
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from bench.cli import main
from bench.datasets import DatasetLayoutError, get_dataset, mvtec_ad2, synthetic_ad2
from bench.datasets.builtin import generated_root
from bench.datasets.mvtec_ad2 import MVTecAD2
from bench.errors import ConfigError
from bench.evaluation import Evaluator
from bench.evaluation_ad2 import AD2Evaluator
from bench.metrics.segf1 import ValidationStats
from bench.types import Prediction, collate

SHAPE = (64, 96)  # the generated images' (height, width): not square
COUNTS = {"train": 4, "validation": 3, "test_good": 3, "test_bad": 4, "private": 3, "mixed": 4}


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory) -> Path:
    c = COUNTS
    return synthetic_ad2.generate(
        tmp_path_factory.mktemp("ad2"),
        size=SHAPE,
        n_train=c["train"],
        n_validation=c["validation"],
        n_test_good=c["test_good"],
        n_test_bad=c["test_bad"],
        n_private=c["private"],
        n_private_mixed=c["mixed"],
    )


@pytest.fixture
def copy(ad2_root, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(ad2_root, tmp_path / "ad2"))


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# --- loader and generator ------------------------------------------------------------------


def test_splits_hold_the_official_folders_with_their_roles(ad2_root):
    for scenario in ("can", "fabric"):
        base = ad2_root / scenario
        train = MVTecAD2(ad2_root, scenario, "train", image_size=32)
        assert [it["path"] for it in train.items] == _pngs(base / "train" / "good")
        validation = MVTecAD2(ad2_root, scenario, "validation", image_size=32)
        assert [it["path"] for it in validation.items] == _pngs(base / "validation" / "good")
        public = [*_pngs(base / "test_public" / "bad"), *_pngs(base / "test_public" / "good")]
        private = [*_pngs(base / "test_private"), *_pngs(base / "test_private_mixed")]
        test = MVTecAD2(ad2_root, scenario, "test", image_size=32)
        assert [it["path"] for it in test.items] == _pngs(base / "validation" / "good") + public
        full = MVTecAD2(ad2_root, scenario, "test", image_size=32, private_sets=True)
        assert [it["path"] for it in full.items] == [it["path"] for it in test.items] + private
        roles = Counter((it["role"], it["defect"]) for it in full.items)
        assert roles == {
            ("validation", "good"): COUNTS["validation"],
            ("test_public", "bad"): COUNTS["test_bad"],
            ("test_public", "good"): COUNTS["test_good"],
            ("test_private", "unknown"): COUNTS["private"],
            ("test_private_mixed", "unknown"): COUNTS["mixed"],
        }


def test_masks_store_255_at_native_size_and_meta_stays_plain(ad2_root):
    test = MVTecAD2(ad2_root, "can", "test", image_size=32, private_sets=True)
    gt_dir = ad2_root / "can" / "test_public" / "ground_truth" / "bad"
    samples = [test[i] for i in range(len(test))]
    for item, sample in zip(test.items, samples):
        meta = sample["meta"]
        assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == SHAPE
        assert {type(v) for v in meta.values()} == {str} and meta["role"] == item["role"]
        assert pickle.loads(pickle.dumps(meta)) == meta
        if meta["defect"] == "bad":
            raw = np.asarray(Image.open(gt_dir / f"{Path(meta['path']).stem}_mask.png"))
            assert raw.shape == SHAPE and set(np.unique(raw)) == {0, 255}
            assert torch.equal(sample["mask"], torch.from_numpy(raw == 255))
            assert int(sample["label"]) == 1
        else:  # good, validation and private images: label 0, empty mask
            assert int(sample["label"]) == 0 and not sample["mask"].any()
    batch = collate(samples)  # every role in one batch
    assert len(batch) == len(test) and batch.mask.shape == (len(test), *SHAPE)


def test_generator_writes_the_official_names_and_the_same_bytes_per_seed(tmp_path):
    small = dict(size=(48, 72), n_train=2, n_validation=1, n_test_good=1, n_test_bad=2)
    small |= dict(n_private=2, n_private_mixed=3, categories=("fabric",))
    a = synthetic_ad2.generate(tmp_path / "a", **small)
    b = synthetic_ad2.generate(tmp_path / "b", **small)
    c = synthetic_ad2.generate(tmp_path / "c", seed=1, **small)

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}

    assert files(a) == files(b) and files(a).keys() == files(c).keys() and files(a) != files(c)
    assert sorted(files(a)) == sorted(
        [
            "fabric/train/good/000_regular.png",
            "fabric/train/good/001_regular.png",
            "fabric/validation/good/000_regular.png",
            "fabric/test_public/good/000_regular.png",
            "fabric/test_public/bad/000_regular.png",
            "fabric/test_public/bad/001_regular.png",
            "fabric/test_public/ground_truth/bad/000_regular_mask.png",
            "fabric/test_public/ground_truth/bad/001_regular_mask.png",
            "fabric/test_private/000_regular.png",
            "fabric/test_private/001_regular.png",
            "fabric/test_private_mixed/000_mixed.png",
            "fabric/test_private_mixed/001_mixed.png",
            "fabric/test_private_mixed/002_mixed.png",
        ]
    )
    with Image.open(a / "fabric" / "test_private" / "000_regular.png") as img:
        assert (img.mode, img.size) == ("RGB", (72, 48))


def test_mixed_private_set_varies_the_lighting(ad2_root):
    def brightness(folder: Path) -> list[float]:
        return [float(np.asarray(Image.open(p)).mean()) for p in _pngs(folder)]

    base = ad2_root / "fabric"
    regular = brightness(base / "validation" / "good") + brightness(base / "test_private")
    mixed = brightness(base / "test_private_mixed")
    lo, hi = min(regular), max(regular)
    relit = [m for m in mixed if not 0.9 * lo <= m <= 1.1 * hi]
    assert 0 < len(relit) < len(mixed), (regular, mixed)  # some relit, some regular


def test_registry_roots_and_metric_family(ad2_root, monkeypatch):
    spec = get_dataset("mvtec_ad2")
    assert spec.loader is MVTecAD2 and spec.modalities == ("image",)
    assert (spec.metrics, spec.root_env, spec.download) == (
        "mvtec_ad2",
        "MVTEC_AD2_ROOT",
        "mvtec_ad2",
    )
    builtin = get_dataset("builtin_ad2")
    assert builtin.loader is MVTecAD2 and builtin.metrics == "mvtec_ad2"
    assert len(mvtec_ad2.SCENARIOS) == 8 and set(synthetic_ad2.CATEGORIES) < set(
        mvtec_ad2.SCENARIOS
    )
    monkeypatch.setenv("MVTEC_AD2_ROOT", str(ad2_root))
    assert spec.root() == ad2_root and spec.categories() == ["can", "fabric"]
    monkeypatch.delenv("MVTEC_AD2_ROOT")
    assert spec.root() == Path("data/mvtec_ad2")


def test_layout_errors_name_what_is_missing(copy, tmp_path):
    mask = copy / "can" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png"
    mask.unlink()
    with pytest.raises(DatasetLayoutError, match=f"expected {mask}") as err:
        MVTecAD2(copy, "can", "test")
    assert "test_public/ground_truth/bad/<id>_mask.png" in str(err.value)  # the layout
    MVTecAD2(copy, "can", "train")  # train needs no mask

    shutil.rmtree(copy / "fabric" / "test_private_mixed")
    MVTecAD2(copy, "fabric", "test")  # the private sets are read only on request
    with pytest.raises(DatasetLayoutError, match=r"fabric/test_private_mixed \(private_sets"):
        MVTecAD2(copy, "fabric", "test", private_sets=True)

    shutil.rmtree(copy / "fabric" / "validation")
    assert mvtec_ad2.categories(copy) == ["can"]
    assert "validation/good" in mvtec_ad2.broken_categories(copy)["fabric"]
    with pytest.raises(DatasetLayoutError, match=r"\['fabric'\] cannot be loaded.*validation"):
        get_dataset("mvtec_ad2").categories(copy)
    with pytest.raises(DatasetLayoutError, match=r"no scenario 'vial' .*\['can'\]"):
        MVTecAD2(copy, "vial", "test")
    with pytest.raises(DatasetLayoutError, match="MVTec AD 2 root .*nope does not exist"):
        mvtec_ad2.categories(tmp_path / "nope")


# --- metrics against independent computations ----------------------------------------------


def _maps(dataset: MVTecAD2, seed: int) -> list[torch.Tensor]:
    """A native-size float32 map per item: noise, higher on the defects (some missed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(dataset)):
        mask = dataset.target(dataset.items[i], SHAPE, torch.tensor([0, 0, *SHAPE]))["mask"]
        amap = rng.normal(0, 0.3, SHAPE) + mask.numpy() * rng.uniform(0.4, 1.6)
        out.append(torch.from_numpy(amap.astype(np.float32)))
    return out


def _feed(evaluator, dataset: MVTecAD2, maps: list[torch.Tensor], size: int = 4) -> None:
    for start in range(0, len(dataset), size):
        idx = range(start, min(start + size, len(dataset)))
        batch = collate([dataset[i] for i in idx])
        amap = torch.stack([maps[i] for i in idx])
        evaluator.update(Prediction(amap.flatten(1).amax(1), amap), batch)


@pytest.fixture(scope="module")
def scored(ad2_root, tmp_path_factory):
    """The can scenario with every role, its maps, and the AD2 evaluator's metrics."""
    dataset = MVTecAD2(ad2_root, "can", "test", image_size=16, private_sets=True)
    maps = _maps(dataset, seed=0)
    with pytest.raises(ConfigError, match="--export-maps"):  # private maps need a folder
        _feed(AD2Evaluator(), dataset, maps)
    evaluator = AD2Evaluator(export_dir=tmp_path_factory.mktemp("export"))
    _feed(evaluator, dataset, maps)
    return dataset, maps, evaluator, evaluator.compute()


def test_ad2_metrics_match_independent_computations(scored):
    dataset, maps, evaluator, out = scored
    roles = [it["role"] for it in dataset.items]
    public = [i for i, r in enumerate(roles) if r == "test_public"]
    m = np.stack([maps[i].numpy() for i in public]).astype(np.float64)
    g = np.stack([np.asarray(dataset[i]["mask"]) for i in public])
    labels = np.array([int(dataset.items[i]["defect"] == "bad") for i in public])
    val = np.concatenate(
        [maps[i].numpy().ravel() for i, r in enumerate(roles) if r == "validation"]
    )
    t = val.astype(np.float64).mean() + 3 * val.astype(np.float64).std()  # MVTec's baseline rule
    pred = m > t
    got = out["all"]
    assert list(out) == ["all"]  # AD 2's test_public has no defect types
    assert got["seg_threshold"] == pytest.approx(t, rel=1e-12)
    assert 0.2 < got["seg_f1"] < 0.95  # the fixture is neither trivial nor hopeless
    assert got["seg_f1"] == pytest.approx(f1_score(g.ravel(), pred.ravel()), abs=1e-12)
    assert got["seg_precision"] == pytest.approx(
        precision_score(g.ravel(), pred.ravel()), abs=1e-12
    )
    assert got["seg_recall"] == pytest.approx(recall_score(g.ravel(), pred.ravel()), abs=1e-12)
    called = pred.reshape(len(public), -1).any(1)
    assert got["class_f1"] == pytest.approx(f1_score(labels, called), abs=1e-12)
    assert got["au_pro_05"] == pytest.approx(reference_au_pro(m, g, 0.05), abs=1e-9)
    assert got["au_pro"] == pytest.approx(reference_au_pro(m, g, 0.3), abs=1e-9)
    assert got["au_pro_05"] != pytest.approx(got["au_pro"], abs=1e-3)
    scores = m.reshape(len(public), -1).max(1)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert evaluator.protocol_label == "official-ad2" and evaluator.n_validation == 3


def test_only_public_items_enter_the_base_metrics(scored):
    dataset, maps, _, out = scored
    public = [i for i, it in enumerate(dataset.items) if it["role"] == "test_public"]
    plain = Evaluator()
    for i in public:
        batch = collate([dataset[i]])
        plain.update(Prediction(maps[i].flatten()[None].amax(1), maps[i][None]), batch)
    base = plain.compute()["all"]
    assert {k: out["all"][k] for k in base} == base


def test_threshold_rules_and_streamed_statistics():
    rng = np.random.default_rng(3)
    parts = [
        torch.from_numpy((1000 + rng.normal(0, 1e-3, n)).astype(np.float32)) for n in (7, 500, 1)
    ]
    stats = ValidationStats()
    for part in parts:
        stats.update(part.reshape(1, -1))
    every = np.concatenate([p.numpy() for p in parts]).astype(np.float64)
    assert stats.count == every.size and stats.max == every.max()
    assert stats.mean == pytest.approx(every.mean(), rel=1e-13)
    assert stats.std == pytest.approx(every.std(), rel=1e-7)  # std is 1e-6 of the mean
    assert stats.threshold("mean_std", 2.5) == pytest.approx(every.mean() + 2.5 * every.std())
    assert stats.threshold("max") == every.max()
    assert math.isnan(ValidationStats().threshold())
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        stats.threshold("median")


def test_max_rule_and_transductive_scores_keep_only_public_items(ad2_root):
    dataset = MVTecAD2(ad2_root, "fabric", "test", image_size=16)
    maps = _maps(dataset, seed=1)
    evaluator = AD2Evaluator(threshold_rule="max")
    _feed(evaluator, dataset, maps)
    roles = [it["role"] for it in dataset.items]
    val_max = max(float(maps[i].max()) for i, r in enumerate(roles) if r == "validation")
    evaluator.replace_scores(torch.arange(len(roles), dtype=torch.float32))
    out = evaluator.compute()["all"]
    assert out["seg_threshold"] == val_max
    public = [i for i, r in enumerate(roles) if r == "test_public"]
    assert evaluator.scores == [float(i) for i in public]
    with pytest.raises(ValueError, match=r"\(3,\) replacement scores for the 10 images"):
        evaluator.replace_scores(torch.zeros(3))
    with pytest.raises(ConfigError, match="threshold_rule must be one of"):
        AD2Evaluator(threshold_rule="p99")


# --- the submission export, checked as MVTec's check_and_prepare_data_for_upload.py does ------


def check_submission(root: Path, sets: dict[str, dict[str, int]]) -> list[Path]:
    """MVTec's checks (utils.py: check_anomaly_image_dir, check_images), written here: exactly
    the folders anomaly_images and anomaly_images_thresholded; in each, one folder per object
    (here: the objects run, the server wants all eight) holding exactly test_private and
    test_private_mixed with the files <nnn>_regular / <nnn>_mixed numbered from 000, .tiff
    single-channel float16 maps, .png single-channel images of 0 and 255. ``sets``: object ->
    set -> number of images. Returns every file."""
    found = []
    assert {p.name for p in root.iterdir()} == {"anomaly_images", "anomaly_images_thresholded"}
    for kind, ext in (("anomaly_images", ".tiff"), ("anomaly_images_thresholded", ".png")):
        assert all(p.is_dir() for p in (root / kind).iterdir())
        assert {p.name for p in (root / kind).iterdir()} == set(sets)
        for obj, counts in sets.items():
            folder = root / kind / obj
            assert {p.name for p in folder.iterdir()} == {"test_private", "test_private_mixed"}
            for name, n in counts.items():
                suffix = "regular" if name == "test_private" else "mixed"
                files = sorted((folder / name).iterdir())
                assert [f.name for f in files] == [f"{i:03d}_{suffix}{ext}" for i in range(n)]
                for f in files:
                    img = tifffile.imread(f) if ext == ".tiff" else np.asarray(Image.open(f))
                    assert img.ndim == 2, f
                    if ext == ".tiff":
                        assert img.dtype == np.float16, f
                    else:
                        assert set(np.unique(img)) <= {0, 255}, f
                found += files
    return found


def test_private_maps_are_exported_as_mvtec_s_checker_expects(scored, ad2_root, tmp_path):
    dataset, maps, evaluator, out = scored
    # a second scenario into the same folder, as the jobs of one run write it
    fabric = MVTecAD2(ad2_root, "fabric", "test", image_size=16, private_sets=True)
    second = AD2Evaluator(export_dir=evaluator.export_dir)
    _feed(second, fabric, _maps(fabric, seed=2))
    second.compute()
    root = evaluator.export_dir / "submission"
    counts = {"test_private": COUNTS["private"], "test_private_mixed": COUNTS["mixed"]}
    files = check_submission(root, {"can": counts, "fabric": counts})
    assert len(files) == 2 * 2 * (COUNTS["private"] + COUNTS["mixed"])
    assert evaluator.record()["submission"] == str(root)
    # each map is its image's own, at native size; each thresholded map binarises it
    t, flagged = out["all"]["seg_threshold"], []
    for i, item in enumerate(dataset.items):
        if item["role"] not in ("test_private", "test_private_mixed"):
            continue
        rel = Path("can") / item["role"] / item["path"].stem
        half = tifffile.imread(root / "anomaly_images" / rel.with_suffix(".tiff"))
        binary = np.asarray(
            Image.open(root / "anomaly_images_thresholded" / rel.with_suffix(".png"))
        )
        assert half.shape == binary.shape == SHAPE
        assert np.array_equal(half, maps[i].numpy().astype(np.float16))
        assert np.array_equal(binary == 255, half.astype(np.float64) > t)
        flagged.append((binary == 255).mean())
    assert 0 < max(flagged) < 1  # the threshold flags some pixels, not all
    # the public maps go to the usual layout, outside the submission
    assert sorted(p.name for p in evaluator.export_dir.iterdir()) == ["can", "fabric", "submission"]


def test_maps_beyond_float16_and_unknown_roles_are_errors(ad2_root, tmp_path):
    dataset = MVTecAD2(ad2_root, "can", "test", image_size=16, private_sets=True)
    maps = [m * 1e5 for m in _maps(dataset, seed=4)]
    with pytest.raises(ValueError, match="beyond float16 .*65504"):
        _feed(AD2Evaluator(export_dir=tmp_path), dataset, maps)
    sample = dataset[0]
    sample["meta"] = {**sample["meta"], "role": "test"}
    with pytest.raises(ValueError, match=r"unknown MVTec AD 2 role\(s\) \['test'\]"):
        AD2Evaluator().update(Prediction(torch.zeros(1), torch.zeros(1, *SHAPE)), collate([sample]))


# --- the benchmark config and a short run ---------------------------------------------------


def test_bench_ad2_config_plans_the_2d_detectors_on_mvtec_ad2_root(ad2_root, monkeypatch):
    from bench.config import builtin_configs, load_config
    from bench.plan import plan_jobs

    assert "bench-ad2" in builtin_configs()
    monkeypatch.setenv("MVTEC_AD2_ROOT", str(ad2_root))
    jobs = {j.run_name: j for j in plan_jobs(load_config("bench-ad2"))}
    assert sorted(jobs) == [
        f"{d}/mvtec_ad2/{c}/seed0" for d in ("feature_stats", "knn") for c in ("can", "fabric")
    ]
    assert all(Path(j.root) == ad2_root.resolve() for j in jobs.values())
    assert all((j.image_size, j.crop_size) == (256, None) for j in jobs.values())


@pytest.mark.slow
def test_bench_run_on_builtin_ad2_reports_the_official_metrics_and_a_submission(
    tmp_path, monkeypatch
):
    """``builtin_ad2`` reads its cached root; a small set is generated there beforehand. The
    private sets are read and exported as the submission checker expects them."""
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path / "cache"))
    synthetic_ad2.generate(generated_root("ad2"), n_train=12, n_validation=4)
    config = tmp_path / "ad2.toml"
    config.write_text(
        'name = "ad2"\n[[detectors]]\nname = "feature_stats"\n[[datasets]]\n'
        'name = "builtin_ad2"\nimage_size = 96\noptions = { private_sets = true }\n'
    )
    out, maps = tmp_path / "out", tmp_path / "maps"
    args = ["run", "--config", str(config), "--no-tracking", "--output", str(out)]
    assert main([*args, "--export-maps", str(maps)]) == 0
    for scenario in ("can", "fabric"):
        job = out / "ad2" / "jobs" / f"feature_stats__builtin_ad2__{scenario}__seed0.json"
        record = json.loads(job.read_text())
        assert record["protocol"] == "official-ad2" and record["n_test"] == 4 + 8 + 12 + 10 + 10
        metrics = record["metrics"]["all"]
        assert {"au_pro_05", "au_pro", "seg_f1", "seg_threshold"} <= set(metrics)
        assert metrics["image_auroc"] > 0.75, (scenario, metrics)
    counts = {"test_private": 10, "test_private_mixed": 10}
    submission = maps / "feature_stats" / "builtin_ad2" / "seed0" / "submission"
    check_submission(submission, {"can": counts, "fabric": counts})
    board = (out / "ad2" / "leaderboard.md").read_text()
    assert "## au_pro_05" in board and "scored by the publisher's server only" in board
