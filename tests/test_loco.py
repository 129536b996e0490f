"""MVTec LOCO AD: the generated copy (official layout, deterministic), the loader (union masks,
meta, errors that name the file or field) and LocoEvaluator (AU-sPRO and image AUROC per anomaly
kind against independent computations on the PNGs)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_metrics import au_spro as reference_au_spro
from reference_metrics import auroc
from torch.utils.data import DataLoader

from bench.datasets import DatasetLayoutError, get_dataset, mvtec_loco, synthetic_loco
from bench.datasets.mvtec_loco import MVTecLOCO
from bench.errors import ConfigError, DataError
from bench.evaluation_loco import LocoEvaluator
from bench.metrics import SPRO_LIMITS
from bench.types import Batch, Prediction, collate

SHAPE = (100, 160)  # the generator's (height, width): not square
KINDS = ("logical_anomalies", "structural_anomalies")
COUNTS = {"n_train": 3, "n_validation": 2, "n_test_good": 4, "n_logical": 4, "n_structural": 3}


@pytest.fixture(scope="module")
def loco_root(tmp_path_factory) -> Path:
    return synthetic_loco.generate(tmp_path_factory.mktemp("loco"), **COUNTS)


@pytest.fixture
def copy(loco_root, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(loco_root, tmp_path / "loco"))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _config(root: Path, category: str) -> dict[int, dict]:
    entries = json.loads((root / category / "defects_config.json").read_text())
    return {e["pixel_value"]: e for e in entries}


def _channels(gt_dir: Path, config: dict[int, dict]) -> list[tuple[np.ndarray, int]]:
    """Each PNG as (bool mask, saturation area), read independently of the harness."""
    out = []
    for png in sorted(gt_dir.glob("*.png")):
        raw = np.asarray(Image.open(png))
        entry = config[int(raw.max())]
        area = int((raw > 0).sum())
        t = entry["saturation_threshold"]
        out.append((raw > 0, int(t * area) if entry["relative_saturation"] else min(t, area)))
    return out


def test_generator_is_deterministic_and_official(loco_root, tmp_path):
    again = synthetic_loco.generate(tmp_path / "again", **COUNTS)
    assert _digest(again) == _digest(loco_root)
    other = synthetic_loco.generate(tmp_path / "other", **COUNTS, seed=1)
    assert _digest(other).keys() == _digest(loco_root).keys() != {}
    assert _digest(other) != _digest(loco_root)
    for category in ("breakfast_box", "pushpins"):
        base = loco_root / category
        config = _config(loco_root, category)
        assert {e["relative_saturation"] for e in config.values()} == {True, False}
        for split, kind, n in [
            ("train", "good", 3),
            ("validation", "good", 2),
            ("test", "good", 4),
            ("test", "logical_anomalies", 4),
            ("test", "structural_anomalies", 3),
        ]:
            images = sorted((base / split / kind).glob("*.png"))
            assert len(images) == n
            assert Image.open(images[0]).size == (SHAPE[1], SHAPE[0])
        overlapping = 0
        for kind in KINDS:
            for gt_dir in sorted((base / "ground_truth" / kind).iterdir()):
                assert (base / "test" / kind / f"{gt_dir.name}.png").is_file()
                pngs = [np.asarray(Image.open(p)) for p in sorted(gt_dir.glob("*.png"))]
                assert all(set(np.unique(p)) - {0} <= set(config) for p in pngs)
                assert all(len(np.unique(p)) == 2 for p in pngs)  # one value on 0
                if len(pngs) == 2 and ((pngs[0] > 0) & (pngs[1] > 0)).any():
                    overlapping += 1
        assert overlapping >= 1, category


def test_loader_splits_union_masks_and_meta(loco_root):
    for split, n in (("train", 3), ("validation", 2)):
        ds = MVTecLOCO(loco_root, "pushpins", split, image_size=32)
        assert len(ds) == n and ds.defect_types == ["good"]
    test = MVTecLOCO(loco_root, "pushpins", "test", image_size=(40, 64))
    assert test.defect_types == ["good", *KINDS] and len(test) == 11 and test.warnings == []
    config = _config(loco_root, "pushpins")
    for i, item in enumerate(test.items):
        sample = test[i]
        assert sample["image"].shape == (3, 40, 64) and sample["mask"].shape == SHAPE
        meta = sample["meta"]
        assert meta["defects_config"] == str(loco_root / "pushpins" / "defects_config.json")
        assert int(sample["label"]) == int(item["defect"] != "good")
        if item["defect"] == "good":
            assert meta["gt_dir"] == "" and not sample["mask"].any()
            continue
        gt_dir = loco_root / "pushpins" / "ground_truth" / item["defect"] / item["path"].stem
        assert meta["gt_dir"] == str(gt_dir)
        union = np.logical_or.reduce([m for m, _ in _channels(gt_dir, config)])
        assert torch.equal(sample["mask"], torch.from_numpy(union))
    assert all(isinstance(v, str) for v in test[0]["meta"].values())


def test_registry_and_roots(loco_root, monkeypatch):
    assert mvtec_loco.categories(loco_root) == ["breakfast_box", "pushpins"]
    spec = get_dataset("mvtec_loco")
    assert spec.loader is MVTecLOCO and spec.metrics == "loco" and spec.download == "mvtec_loco"
    assert spec.root_env == "MVTEC_LOCO_ROOT"
    monkeypatch.setenv("MVTEC_LOCO_ROOT", str(loco_root))
    assert spec.root() == loco_root and spec.categories() == ["breakfast_box", "pushpins"]
    builtin = get_dataset("builtin_loco")
    assert builtin.loader is MVTecLOCO and builtin.metrics == "loco" and builtin.download is None


def _write_config(root: Path, edit) -> Path:
    path = root / "pushpins" / "defects_config.json"
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e[1].pop("pixel_value"), r"entry 1: lacks field\(s\) pixel_value"),
        (
            lambda e: e[0].update(pixel_value=0),
            r"entry 0 \('missing_pushpin'\): field 'pixel_value' must be an integer in 1..255, got 0",
        ),
        (
            lambda e: e[0].update(saturation_threshold=0.5),
            r"field 'saturation_threshold' must be a positive integer .* got 0.5",
        ),
        (
            lambda e: e[1].update(saturation_threshold=1.5),
            r"entry 1 .* must be a fraction in \(0, 1\] .* got 1.5",
        ),
        (
            lambda e: e[2].update(relative_saturation="yes"),
            r"field 'relative_saturation' must be true or false",
        ),
        (
            lambda e: e[3].update(pixel_value=251),
            r"entry 3 \('scratch'\): pixel_value 251 is already taken by 'missing_pushpin'",
        ),
        (
            lambda e: e[0].update(defect_name=""),
            r"entry 0: field 'defect_name' must be a non-empty string",
        ),
    ],
)
def test_defects_config_fields_are_named(copy, edit, message):
    path = _write_config(copy, edit)
    with pytest.raises(DataError, match=message) as err:
        MVTecLOCO(copy, "pushpins", "test")
    assert str(path) in str(err.value)


def test_unknown_pixel_value_names_the_file(copy):
    gt_dir = copy / "pushpins" / "ground_truth" / "structural_anomalies" / "001"
    png = gt_dir / "000.png"
    raw = np.asarray(Image.open(png))
    Image.fromarray(np.where(raw > 0, 77, 0).astype(np.uint8)).save(png)
    test = MVTecLOCO(copy, "pushpins", "test")
    index = next(i for i, it in enumerate(test.items) if it["gt_dir"] == gt_dir)
    with pytest.raises(
        DataError, match=f"{png}: pixel value 77 matches no entry of .*defects_config.json"
    ):
        test[index]
    Image.fromarray(np.where(raw > 0, 241, 0).astype(np.uint8) + (raw == 0)).save(png)  # 1 and 241
    with pytest.raises(
        DataError, match=rf"{png} must store one non-zero pixel value .* \[1, 241\]"
    ):
        test[index]


def test_layout_errors_are_named(copy):
    gt = copy / "breakfast_box" / "ground_truth" / "logical_anomalies" / "002"
    shutil.rmtree(gt)
    with pytest.raises(
        DatasetLayoutError, match=f"no ground truth for .*002.png: expected the folder {gt}"
    ):
        MVTecLOCO(copy, "breakfast_box", "test")
    gt.mkdir()
    test = MVTecLOCO(copy, "breakfast_box", "test")
    index = next(i for i, it in enumerate(test.items) if it["gt_dir"] == gt)
    with pytest.raises(DatasetLayoutError, match=f"ground-truth folder {gt} holds no PNG"):
        test[index]
    (copy / "breakfast_box" / "test" / "scratches").mkdir()
    with pytest.raises(DatasetLayoutError, match="unexpected folder .*test/scratches"):
        MVTecLOCO(copy, "breakfast_box", "test")
    (copy / "pushpins" / "defects_config.json").unlink()
    assert mvtec_loco.categories(copy) == ["breakfast_box"]
    assert "has no defects_config.json" in mvtec_loco.broken_categories(copy)["pushpins"]
    with pytest.raises(DatasetLayoutError, match="pushpins.* has no defects_config.json"):
        get_dataset("mvtec_loco").categories(copy)


def _evaluate(dataset: MVTecLOCO, seed: int = 0, evaluator: LocoEvaluator | None = None):
    """Streams made-up predictions (a noisy hint of the mask at the input's size) in batches of
    3; returns the evaluator and the predicted maps."""
    evaluator = evaluator or LocoEvaluator()
    rng = torch.Generator().manual_seed(seed)
    for batch in DataLoader(dataset, batch_size=3, collate_fn=collate):
        y0, x0, y1, x1 = (int(v) for v in batch.roi[0])
        maps = torch.rand(len(batch), y1 - y0, x1 - x0, generator=rng)
        maps += 0.8 * batch.mask[:, y0:y1, x0:x1].float()
        maps = torch.round(maps * 20) / 20  # ties
        scores = torch.rand(len(batch), generator=rng) + 0.5 * batch.label
        evaluator.update(Prediction(score=scores, anomaly_map=maps), batch)
    return evaluator


def test_evaluator_matches_an_independent_computation(loco_root):
    config = _config(loco_root, "breakfast_box")
    test = MVTecLOCO(loco_root, "breakfast_box", "test", image_size=(50, 80))
    evaluator = _evaluate(test)  # maps at the images' native size: nothing is resampled
    out = evaluator.compute()
    assert evaluator.protocol_label == "official-loco" and evaluator.warnings == []
    assert set(out) == {"all", *KINDS}
    maps = [m.numpy() for m in evaluator.maps]
    channels = [_channels(Path(it["gt_dir"]), config) if it["gt_dir"] else [] for it in test.items]
    scores, labels = np.array(evaluator.scores), np.array(evaluator.labels)
    for subset in ("all", *KINDS):
        idx = [
            i
            for i, it in enumerate(test.items)
            if it["defect"] in ("good", subset) or subset == "all"
        ]
        for name, limit in SPRO_LIMITS.items():
            expected = reference_au_spro([maps[i] for i in idx], [channels[i] for i in idx], limit)
            assert out[subset][name] == pytest.approx(expected, abs=1e-9), (subset, name)
        assert out[subset]["image_auroc"] == pytest.approx(auroc(labels[idx], scores[idx]))
        assert "au_pro" in out[subset] and "pixel_auroc" in out[subset]
    for name in ("image_auroc", *SPRO_LIMITS):
        mean = 0.5 * (out[KINDS[0]][name] + out[KINDS[1]][name])
        assert out["all"][f"{name}_mean"] == pytest.approx(mean)
    assert 0 < out["all"]["au_spro_05"] < 1
    assert evaluator.record()["spro_limits"] == SPRO_LIMITS


def test_evaluator_scores_only_the_crop(copy):
    """A centre crop: each channel is cut to it, its saturation area taken from what is left
    (a missing pin's compartment, made relative here, is always cut)."""
    _write_config(copy, lambda e: e[0].update(saturation_threshold=0.5, relative_saturation=True))
    config = _config(copy, "pushpins")
    test = MVTecLOCO(copy, "pushpins", "test", image_size=(50, 80), crop_size=(30, 60))
    evaluator = _evaluate(test, seed=1)
    out = evaluator.compute()
    assert evaluator.protocol_label == "official-loco-cropped"
    y0, x0, y1, x1 = (int(v) for v in test[0]["roi"])
    assert (y1 - y0, x1 - x0) == (60, 120)
    dense = []
    for it in test.items:
        kept = []
        for png in sorted(Path(it["gt_dir"]).glob("*.png")) if it["gt_dir"] else []:
            raw = np.asarray(Image.open(png))
            mask, entry = raw[y0:y1, x0:x1] > 0, config[int(raw.max())]
            area, t = int(mask.sum()), entry["saturation_threshold"]
            if area:
                relative = entry["relative_saturation"]
                kept.append((mask, max(1, int(t * area)) if relative else min(t, area)))
        dense.append(kept)
    maps = [m.numpy() for m in evaluator.maps]
    assert all(m.shape == (60, 120) for m in maps)
    for name, limit in SPRO_LIMITS.items():
        expected = reference_au_spro(maps, dense, limit)
        assert out["all"][name] == pytest.approx(expected, abs=1e-9), name


def test_evaluator_refuses_what_it_cannot_score(loco_root):
    with pytest.raises(ConfigError, match="official protocol only"):
        LocoEvaluator(protocol="fast")
    prediction = Prediction(score=torch.zeros(1), anomaly_map=torch.zeros(1, 8, 8))
    plain = Batch(
        label=torch.tensor([1]),
        mask=torch.ones(1, 8, 8, dtype=torch.bool),
        roi=torch.tensor([[0, 0, 8, 8]]),
        meta=[{"path": "weave/test/hole/000.png", "category": "weave", "defect": "hole"}],
    )
    with pytest.raises(ValueError, match="needs meta 'gt_dir' and 'defects_config' .* for weave"):
        LocoEvaluator().update(prediction, plain)
    test = MVTecLOCO(loco_root, "pushpins", "test", image_size=32)
    sample = test[len(test) - 1]
    sample["mask"] = torch.zeros_like(sample["mask"])
    with pytest.raises(DataError, match="is not the union of .*structural_anomalies/002/"):
        LocoEvaluator().update(prediction, collate([sample]))
    sample["meta"]["gt_dir"] = ""
    with pytest.raises(DataError, match="anomalous test image .* has no ground-truth folder"):
        LocoEvaluator().update(prediction, collate([sample]))


def test_a_missing_kind_is_named_and_has_no_mean(tmp_path):
    root = synthetic_loco.generate(
        tmp_path,
        ("pushpins",),
        n_train=1,
        n_validation=1,
        n_test_good=2,
        n_logical=2,
        n_structural=0,
    )
    evaluator = _evaluate(MVTecLOCO(root, "pushpins", "test", image_size=32))
    out = evaluator.compute()
    assert set(out) == {"all", "logical_anomalies"}
    assert out["all"]["au_spro_05"] == out["logical_anomalies"]["au_spro_05"]
    assert not any(k.endswith("_mean") for k in out["all"])
    assert any("lacks structural_anomalies" in w for w in evaluator.warnings)


def test_bench_loco_config_plans_the_2d_detectors(loco_root, monkeypatch):
    from bench.config import builtin_configs, load_config
    from bench.plan import plan_jobs

    assert "bench-loco" in builtin_configs()
    monkeypatch.setenv("MVTEC_LOCO_ROOT", str(loco_root))
    jobs = {j.run_name: j for j in plan_jobs(load_config("bench-loco"))}
    assert sorted(jobs) == [
        f"{d}/mvtec_loco/{c}/seed0"
        for d in ("feature_stats", "knn")
        for c in ("breakfast_box", "pushpins")
    ]
    assert jobs["knn/mvtec_loco/pushpins/seed0"].crop_size is None
