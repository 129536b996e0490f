"""README promises without a test elsewhere, through the real CLI (``bench.cli.main``) on tiny
generated data: the built-in configs, ``--force``, ``--protocol fast``, ``--seeds`` averaging,
``bench evaluate --pro-limit`` and ``--scores``, re-evaluation without refitting, F1-max."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from reference_metrics import au_pro, f1_max
from sklearn.metrics import roc_auc_score

from bench.cli import main
from bench.datasets import synthetic_3d, synthetic_ad, synthetic_real3d

SLUG = "feature_stats__mvtec_ad__washer__seed{}"


@pytest.fixture(scope="module")
def tiny_ad(tmp_path_factory) -> Path:
    """MVTec AD layout, one category at 64 px: 6 train, 3 good + 2 per defect (4 kinds) test."""
    return synthetic_ad.generate(
        tmp_path_factory.mktemp("tiny_ad"),
        categories=("washer",),
        size=64,
        n_train=6,
        n_test_good=3,
        n_per_defect=2,
    )


@pytest.fixture(scope="module")
def tiny_3d(tmp_path_factory) -> Path:
    return synthetic_3d.generate(
        tmp_path_factory.mktemp("tiny_3d"),
        categories=("dome",),
        n_train=2,
        n_validation=1,
        n_test_good=2,
        n_per_defect=1,
    )


@pytest.fixture(scope="module")
def tiny_points(tmp_path_factory) -> Path:
    return synthetic_real3d.generate(
        tmp_path_factory.mktemp("tiny_points"),
        n_train=2,
        n_test_good=3,
        n_per_defect=2,
        n_points=800,
    )


def run_args(tiny_ad: Path, out: Path, name: str, *extra: str) -> list[str]:
    """``bench run`` of feature_stats (random weights: fast, no download) on ``tiny_ad``."""
    return [
        "run",
        "--detectors",
        "feature_stats",
        "--param",
        "feature_stats.weights=random",
        "--datasets",
        "mvtec_ad",
        "--root",
        f"mvtec_ad={tiny_ad}",
        "--image-size",
        "64",  # the native size: the model's maps are the exported maps
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-tracking",
        "--output",
        str(out),
        "--name",
        name,
        *extra,
    ]


def ground_truth(root: Path, category: str, defect: str, stem: str, shape) -> np.ndarray:
    if defect == "good":
        return np.zeros(shape, dtype=bool)
    return (
        np.asarray(Image.open(root / category / "ground_truth" / defect / f"{stem}_mask.png")) > 0
    )


def read_export(maps: Path, root: Path, category: str = "washer") -> pd.DataFrame:
    """Every exported map with its mask and image score (scores.csv), one row per test image."""
    table = pd.read_csv(maps / category / "scores.csv", dtype={"id": str})
    table["map"] = [
        tifffile.imread(maps / category / "test" / r.defect / f"{r.id}.tiff")
        for r in table.itertuples()
    ]
    table["mask"] = [
        ground_truth(root, category, r.defect, r.id, r.map.shape) for r in table.itertuples()
    ]
    return table


# -- the built-in configs ----------------------------------------------------------------------
DINOMALY_ENCODER = "vit_base_patch14_reg4_dinov2.lvd142m"


def _builtin_configs() -> list[str]:
    from bench.config import builtin_configs

    return builtin_configs()


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory) -> SimpleNamespace:
    """Tiny generated MVTec AD 2, MVTec LOCO AD and folder roots (one category each)."""
    from bench.datasets import synthetic_ad2, synthetic_folder, synthetic_loco

    tmp = tmp_path_factory.mktemp("tiny_official")
    few = {"n_train": 2, "n_validation": 1, "n_test_good": 1}
    return SimpleNamespace(
        ad2=synthetic_ad2.generate(
            tmp / "ad2", categories=("can",), **few, n_test_bad=1, n_private=1, n_private_mixed=1
        ),
        loco=synthetic_loco.generate(
            tmp / "loco", categories=("pushpins",), **few, n_logical=1, n_structural=1
        ),
        folder=synthetic_folder.generate(tmp / "folder", n_normal=6, n_abnormal=2),
    )


@pytest.fixture
def builtin_env(monkeypatch, tmp_path, tiny_3d, tiny_points, tiny_official):
    """The built-in data's cache filled with tiny generated sets, and every dataset's environment
    variable naming a tiny root (MVTec AD: 9 training images, for 3 distinct 8-shot draws)."""
    from bench.datasets import synthetic_visa
    from bench.datasets.builtin import generated_root

    tiny_ad = synthetic_ad.generate(
        tmp_path / "ad", categories=("washer",), size=64, n_train=9, n_test_good=1, n_per_defect=1
    )
    visa = synthetic_visa.generate(tmp_path / "visa", n_train=2, n_test_good=1, n_anomaly=1)
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path))
    for kind, root in (("ad", tiny_ad), ("3d", tiny_3d), ("points", tiny_points), ("visa", visa)):
        generated_root(kind).symlink_to(root)
    monkeypatch.setenv("MVTEC_AD_ROOT", str(tiny_ad))
    monkeypatch.setenv("MVTEC_3D_ROOT", str(tiny_3d))
    monkeypatch.setenv("REAL3D_AD_ROOT", str(tiny_points))
    monkeypatch.setenv("ANOMALY_SHAPENET_ROOT", str(tiny_points))
    monkeypatch.setenv("VISA_ROOT", str(visa))
    monkeypatch.setenv("MVTEC_AD2_ROOT", str(tiny_official.ad2))
    monkeypatch.setenv("MVTEC_LOCO_ROOT", str(tiny_official.loco))
    monkeypatch.setenv("FOLDER_ROOT", str(tiny_official.folder))
    return SimpleNamespace(ad=tiny_ad, d3=tiny_3d, points=tiny_points, visa=visa, tmp=tmp_path)


def _jobs(cfg) -> dict:
    from bench.plan import plan_jobs

    return {j.run_name: j for j in plan_jobs(cfg)}


def _check_default(cfg, env, monkeypatch):
    """`default` on the built-in data (its cache filled with tiny generated sets)."""
    assert cfg.seeds == [0] and cfg.protocol == "official"
    jobs = _jobs(cfg)
    assert sorted(jobs) == sorted(
        [
            "feature_stats/builtin_ad/washer/seed0",
            "autoencoder/builtin_ad/washer/seed0",
            "knn/builtin_ad/washer/seed0",
            "grid_curvature/builtin_3d/dome/seed0",
            "curvature/builtin_3d/dome/seed0",
            "curvature/builtin_points/ellipsoid/seed0",
            "casl-cpu/builtin_points/ellipsoid/seed0",
            "dinomaly-cpu/builtin_ad/washer/unified/seed0",
            "dictas-cpu/builtin_ad/washer/from-builtin_visa-4shot-d0/seed0",
        ]
    )
    dictas = jobs["dictas-cpu/builtin_ad/washer/from-builtin_visa-4shot-d0/seed0"]
    assert dictas.fit.stage == "references" and len(dictas.references) == 4
    assert dictas.fit.parent.parts[0].dataset == "builtin_visa"
    assert (dictas.params["backbone"], dictas.params["epochs"], dictas.image_size) == (
        "efficientnet_lite0", 3, 224,
    )  # fmt: skip
    dino = jobs["dinomaly-cpu/builtin_ad/washer/unified/seed0"]  # CPU schedule, substitute
    assert (dino.params["encoder"], dino.params["iterations"]) == ("efficientnet_lite0", 400)
    assert (dino.image_size, dino.crop_size, dino.batch_size) == (160, None, 8)
    assert cfg.batch_size == 8
    casl = jobs["casl-cpu/builtin_points/ellipsoid/seed0"].params  # the CPU schedule
    assert (casl["pretrain_iterations"], casl["finetune_iterations"]) == (25, 300)
    assert jobs["autoencoder/builtin_ad/washer/seed0"].params["iterations"] == 300
    assert jobs["knn/builtin_ad/washer/seed0"].params["backbone"] == "efficientnet_lite0"
    knn = jobs["knn/builtin_ad/washer/seed0"]
    assert (knn.image_size, knn.crop_size) == (256, None)  # no crop in `default`
    assert jobs["curvature/builtin_3d/dome/seed0"].image_size is None  # native
    assert Path(jobs["curvature/builtin_points/ellipsoid/seed0"].root) == env.points.resolve()


def _check_dinomaly_mvtec(cfg, env, monkeypatch):
    """Dinomaly as published: seed 1, batch 16, 448 -> 392, unified 10,000 and per category
    5,000 iterations."""
    jobs = _jobs(cfg)
    assert sorted(jobs) == [
        "dinomaly per-category/mvtec_ad/washer/seed1",
        "dinomaly unified/mvtec_ad/washer/unified/seed1",
    ]
    for job in jobs.values():
        assert (job.image_size, job.crop_size, job.batch_size) == (448, 392, 16)
        assert job.params["weights"] == "pretrained" and job.params["variant"] == "dinomaly"
    unified = jobs["dinomaly unified/mvtec_ad/washer/unified/seed1"].params
    assert (unified["iterations"], unified["encoder"], unified["dropout"]) == (
        10000, DINOMALY_ENCODER, 0.2,
    )  # fmt: skip
    assert jobs["dinomaly per-category/mvtec_ad/washer/seed1"].params["iterations"] == 5000


def _check_dinomaly_offline(cfg, env, monkeypatch):
    assert {n: j.batch_size for n, j in _jobs(cfg).items()} == {
        "dinomaly (substitute)/mvtec_ad/washer/unified/seed1": 16,
        "knn/mvtec_ad/washer/seed1": 8,
    }


def _check_dinomaly_visa(cfg, env, monkeypatch):
    """The official dinomaly_visa_uni.py: the MVTec AD unified settings on VisA."""
    from bench.datasets import synthetic_visa

    jobs = _jobs(cfg)
    assert (
        len(jobs) == len(synthetic_visa.CATEGORIES)
        and len({j.fit_hash for j in jobs.values()}) == 1
    )
    for job in jobs.values():
        assert (job.dataset.name, job.image_size, job.crop_size, job.batch_size) == (
            "visa",
            448,
            392,
            16,
        )
        assert (job.params["iterations"], job.params["encoder"]) == (10000, DINOMALY_ENCODER)


def _dictas_as_published(train_on: str, layers: list[int], sigma: float | None):
    """DictAS as published: trained on VisA for MVTec AD and on MVTec AD for VisA, the official
    4-shot lists (their own test: test_dictas_shots.py), in both official test modes; with
    seeded draws instead of the lists on the generated data."""

    def check(cfg, env, monkeypatch):
        from bench.datasets import synthetic_visa
        from bench.plan import plan_jobs

        entries = [(d.label, d.shots, Path(d.shot_files[0]).name) for d in cfg.detectors]
        assert entries == [("dictas", 4, "4-shot.txt"), ("dictas classification", 4, "4-shot.txt")]
        assert cfg.detectors[1].params.get("sigma") == sigma
        for d in cfg.detectors:
            d.shot_files, d.shot_draws = None, 3
        monkeypatch.setenv("VISA_ROOT", str(synthetic_visa.generate(
            env.tmp / "v6", n_train=6, n_test_good=1, n_anomaly=1)))  # fmt: skip
        jobs = plan_jobs(cfg)
        assert len({j.fit.parent.hash for j in jobs}) == 1  # one training: both modes, 3 draws
        assert {j.params["test_mode"] for j in jobs} == {"segmentation", "classification"}
        for job in jobs:
            assert (job.image_size, job.batch_size, job.params["backbone"]) == (
                336, 24, "ViT-L-14-336",
            )  # fmt: skip
            assert (job.params["weights"], job.params["test_layers"]) == ("openai", layers)
            assert job.fit.parent.parts[0].dataset == train_on and job.params["epochs"] == 30
            assert job.params["score_normalisation"] == "per_category"

    return check


def _check_dictas_offline(cfg, env, monkeypatch):
    """DictAS with the token-source substitute, k = 1, 2, 4, 8 on MVTec AD bottle (the tiny data
    has washer only: planned there), 3 draws each, trained and training-free, the training on
    the built-in VisA."""
    assert [d.categories for d in cfg.datasets] == [["bottle"]]
    cfg.datasets[0].categories = ["washer"]
    jobs = list(_jobs(cfg).values())
    assert sorted(len(j.references) for j in jobs) == sorted([1, 2, 4, 8] * 6)
    assert len({j.fit.parent.hash for j in jobs}) == 2  # one training, one training-free
    for job in jobs:
        assert (job.params["backbone"], job.image_size) == ("efficientnet_lite0", 336)
        assert job.fit.parent.parts[0].dataset == "builtin_visa"


def _check_dinomaly2_mvtec3d(cfg, env, monkeypatch):
    """Dinomaly2's RGB + depth mode: the official dinomaly_mvtec3d.py on MVTec 3D-AD."""
    [job] = _jobs(cfg).values()
    assert job.run_name == "dinomaly2 rgb+depth/mvtec_3d/dome/unified/seed1"
    assert (job.image_size, job.crop_size, job.batch_size) == (392, None, 16)
    assert job.dataset.options == {"preprocess": True}
    want = ("rgb+depth", 40000, DINOMALY_ENCODER, None, 0.4, 1e-8)
    keys = ("inputs", "iterations", "encoder", "narrow_lr", "dropout", "attention_eps")
    assert tuple(job.params[k] for k in keys) == want


def _check_dinomaly2_3d_offline(cfg, env, monkeypatch):
    assert {n for n in _jobs(cfg) if n.startswith("dinomaly2")} == {
        "dinomaly2 rgb+depth (substitute)/builtin_3d/dome/unified/seed1",
        "dinomaly2 rgb (substitute)/builtin_3d/dome/unified/seed1",
    }


def _check_bench_2d(cfg, env, monkeypatch):
    """`bench-2d` on the root MVTEC_AD_ROOT names."""
    assert cfg.seeds == [0] and cfg.protocol == "official"
    jobs = _jobs(cfg)
    assert sorted(jobs) == ["feature_stats/mvtec_ad/washer/seed0", "knn/mvtec_ad/washer/seed0"]
    assert {n: (j.image_size, j.crop_size) for n, j in jobs.items()} == {
        "feature_stats/mvtec_ad/washer/seed0": (256, None),
        "knn/mvtec_ad/washer/seed0": (256, 224),  # the paper's resize 256, centre crop 224
    }
    assert all(Path(j.root) == env.ad.resolve() for j in jobs.values())


def _check_bench_3d(cfg, env, monkeypatch):
    """`bench-3d` on the root MVTEC_3D_ROOT names."""
    assert cfg.seeds == [0] and cfg.protocol == "official"
    jobs = _jobs(cfg)
    assert sorted(jobs) == [
        "casl/mvtec_3d/dome/seed0",
        "curvature/mvtec_3d/dome/seed0",
        "grid_curvature/mvtec_3d/dome/seed0",
    ]
    assert jobs["casl/mvtec_3d/dome/seed0"].params["encoder_channels"] == [32, 64, 128, 256]
    assert cfg.batch_size == 4
    for job in jobs.values():
        assert job.image_size == 224 and job.dataset.options == {"preprocess": True}
        assert Path(job.root) == env.d3.resolve()


def _check_bench_points(cfg, env, monkeypatch):
    """`bench-points` on the roots REAL3D_AD_ROOT and ANOMALY_SHAPENET_ROOT name."""
    assert cfg.seeds == [0] and cfg.protocol == "official"
    assert sorted(_jobs(cfg)) == [
        "casl/anomaly_shapenet/ellipsoid/seed0",
        "casl/real3d_ad/ellipsoid/seed0",
        "curvature/anomaly_shapenet/ellipsoid/seed0",
        "curvature/real3d_ad/ellipsoid/seed0",
    ]


#: what each built-in config promises beyond loading and planning
BUILTIN_CHECKS = {
    "default": _check_default,
    "dinomaly-mvtec": _check_dinomaly_mvtec,
    "dinomaly-offline": _check_dinomaly_offline,
    "dinomaly-visa": _check_dinomaly_visa,
    "dictas-mvtec": _dictas_as_published("visa", [6, 12], None),
    "dictas-visa": _dictas_as_published("mvtec_ad", [6, 12, 18, 24], 0.0),
    "dictas-offline": _check_dictas_offline,
    "dinomaly2-mvtec3d": _check_dinomaly2_mvtec3d,
    "dinomaly2-3d-offline": _check_dinomaly2_3d_offline,
    "bench-2d": _check_bench_2d,
    "bench-3d": _check_bench_3d,
    "bench-points": _check_bench_points,
}


def test_the_documented_configs_are_built_in():
    assert set(BUILTIN_CHECKS) <= set(_builtin_configs())


@pytest.mark.parametrize("name", _builtin_configs())
def test_builtin_config_loads_and_plans(name, builtin_env, monkeypatch):
    """Every built-in config loads and plans jobs on the tiny data; the documented ones plan
    what they promise (BUILTIN_CHECKS)."""
    from bench.config import load_config

    cfg = load_config(name)
    assert cfg.name == name
    if name in BUILTIN_CHECKS:
        BUILTIN_CHECKS[name](cfg, builtin_env, monkeypatch)
    else:
        assert _jobs(cfg)


# -- resume and --force ------------------------------------------------------------------------
@pytest.mark.slow
def test_force_reruns_a_finished_job_and_without_it_the_job_is_skipped(tmp_path, tiny_ad, capsys):
    args = run_args(tiny_ad, tmp_path, "force")
    job = tmp_path / "force" / "jobs" / f"{SLUG.format(0)}.json"
    assert main(args) == 0
    first_text = job.read_text()
    first = json.loads(first_text)
    assert first["fit_cached"] is False
    capsys.readouterr()

    assert main(args) == 0
    assert "done before, skipped" in capsys.readouterr().err
    assert job.read_text() == first_text  # not rewritten

    # --force writes the record and the fitted state again: rather than wait out the resolution
    # of their timestamps ("finished" has whole seconds), the old ones are set in the past
    past = "2000-01-01T00:00:00+00:00"
    job.write_text(json.dumps({**first, "finished": past}))
    states = sorted((tmp_path / "force").rglob("fitted.pt"))
    assert len(states) == 1
    os.utime(states[0], ns=(0, 0))
    assert main([*args, "--force"]) == 0
    again = json.loads(job.read_text())
    assert again["finished"] > past and again["finished"] >= first["finished"]
    assert states[0].stat().st_mtime_ns > 0  # the fit was saved again
    assert again["config_hash"] == first["config_hash"]
    assert again["fit_cached"] is False  # --force refits too


# -- one official run with exported maps, re-used below -----------------------------------------
@pytest.fixture(scope="module")
def official(tmp_path_factory, tiny_ad):
    out = tmp_path_factory.mktemp("official")
    maps = out / "maps"
    assert main(run_args(tiny_ad, out, "proto", "--export-maps", str(maps))) == 0
    record = json.loads((out / "proto" / "jobs" / f"{SLUG.format(0)}.json").read_text())
    return out, maps / "feature_stats" / "mvtec_ad" / "seed0", record


def test_official_pixel_metrics_and_f1max_match_scikit_learn_on_the_exported_maps(
    official, tiny_ad
):
    _, maps, record = official
    table = read_export(maps, tiny_ad)
    assert len(table) == record["n_test"] == 3 + 4 * 2
    assert record["protocol"] == "official" and record["fit_cached"] is False
    masks = np.concatenate([m.reshape(-1) for m in table["mask"]])
    values = np.concatenate([m.reshape(-1) for m in table["map"]])
    metrics = record["metrics"]["all"]
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks, values), abs=1e-9)
    assert metrics["pixel_f1max"] == pytest.approx(f1_max(masks, values), abs=1e-9)
    labels = (table["defect"] != "good").to_numpy()
    assert metrics["image_f1max"] == pytest.approx(f1_max(labels, table["score"]), abs=1e-12)


@pytest.mark.slow
def test_fast_protocol_end_to_end_reuses_the_fitted_state(official, tiny_ad):
    """`--protocol fast` compares maps (bilinear) and masks (nearest) at 256 px, says so in
    the record, and re-evaluating the same fit under it loads fitted.pt instead of refitting."""
    out, official_maps, official_record = official
    fast_maps = out / "fast_maps"
    args = run_args(tiny_ad, out, "proto", "--protocol", "fast", "--export-maps", str(fast_maps))
    assert main(args) == 0
    record = json.loads((out / "proto" / "jobs" / f"{SLUG.format(0)}.json").read_text())
    assert record["protocol"] == "fast" and record["fit_cached"] is True
    assert record["fit_hash"] == official_record["fit_hash"]
    assert record["config_hash"] != official_record["config_hash"]

    table = read_export(fast_maps / "feature_stats" / "mvtec_ad" / "seed0", tiny_ad)
    before = read_export(official_maps, tiny_ad)
    for a, b in zip(table["map"], before["map"]):  # the same fit predicts the same maps
        np.testing.assert_array_equal(a, b)
    maps = torch.from_numpy(np.stack(table["map"]))[:, None]
    masks = torch.from_numpy(np.stack(table["mask"])).float()[:, None]
    maps256 = F.interpolate(maps, size=(256, 256), mode="bilinear", align_corners=False)
    masks256 = F.interpolate(masks, size=(256, 256), mode="nearest")
    expected = roc_auc_score(masks256.reshape(-1).numpy() > 0.5, maps256.reshape(-1).numpy())
    fast, slow = record["metrics"]["all"], official_record["metrics"]["all"]
    assert fast["pixel_auroc"] == pytest.approx(expected, abs=1e-9)
    assert abs(fast["pixel_auroc"] - slow["pixel_auroc"]) > 1e-6  # resampled: not the same
    assert fast["image_auroc"] == slow["image_auroc"]  # image scores do not depend on it


# -- bench evaluate ------------------------------------------------------------------------------
def evaluate(tmp_path: Path, maps: Path, data: Path, name: str, *extra: str) -> dict:
    stem = tmp_path / name
    assert (
        main(["evaluate", "--maps", str(maps), "--data", str(data), "--output", str(stem), *extra])
        == 0
    )
    (record,) = json.loads(stem.with_suffix(".json").read_text())
    return record


def test_evaluate_pro_limit_matches_the_definition_at_each_limit(official, tiny_ad, tmp_path):
    _, maps, run_record = official
    table = read_export(maps, tiny_ad)
    stack, masks = np.stack(table["map"]).astype(np.float64), np.stack(table["mask"])
    values = {}
    for limit in (0.1, 0.3):
        record = evaluate(tmp_path, maps, tiny_ad, f"limit{limit}", "--pro-limit", str(limit))
        assert record["pro_limit"] == limit
        values[limit] = record["metrics"]["all"]["au_pro"]
        assert values[limit] == pytest.approx(au_pro(stack, masks, limit), abs=1e-9)
    assert abs(values[0.1] - values[0.3]) > 1e-3
    assert values[0.3] == pytest.approx(run_record["metrics"]["all"]["au_pro"], abs=1e-9)


def test_evaluate_scores_file_supplies_the_image_scores(official, tiny_ad, tmp_path):
    _, maps, _ = official
    table = read_export(maps, tiny_ad)
    labels = (table["defect"] != "good").to_numpy()
    default = evaluate(tmp_path, maps, tiny_ad, "default")  # each map's maximum
    peaks = [float(m.max()) for m in table["map"]]
    assert default["metrics"]["all"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels, peaks), abs=1e-12
    )

    csv = tmp_path / "mine.csv"
    mine = table[["category", "defect", "id"]].assign(
        score=np.random.default_rng(0).random(len(table))
    )
    mine.to_csv(csv, index=False)
    record = evaluate(tmp_path, maps, tiny_ad, "scored", "--scores", str(csv))
    expected = roc_auc_score(labels, mine["score"])
    assert record["metrics"]["all"]["image_auroc"] == pytest.approx(expected, abs=1e-12)
    assert expected != pytest.approx(roc_auc_score(labels, peaks))  # the file made the difference
    assert record["metrics"]["all"]["pixel_auroc"] == default["metrics"]["all"]["pixel_auroc"]


# -- seeds -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_seeds_are_averaged_in_the_leaderboard(tmp_path, tiny_ad):
    assert main(run_args(tiny_ad, tmp_path, "seeds", "--seeds", "0,1")) == 0
    folder = tmp_path / "seeds"
    per_seed = [
        json.loads((folder / "jobs" / f"{SLUG.format(s)}.json").read_text()) for s in (0, 1)
    ]
    assert [r["seed"] for r in per_seed] == [0, 1]
    values = [r["metrics"]["all"]["pixel_auroc"] for r in per_seed]
    assert values[0] != values[1]  # random weights drawn per seed: averaging is visible
    mean = float(np.mean(values))
    summary = pd.read_csv(folder / "summary.csv")
    (row,) = summary[
        (summary.detector == "feature_stats") & (summary.dataset == "mvtec_ad")
    ].itertuples()
    assert row.pixel_auroc == pytest.approx(mean, abs=1e-12)
    board = (folder / "leaderboard.md").read_text()
    section = board.split("## pixel_auroc")[1].split("##")[0]
    spread = float(np.std(values, ddof=1))  # sample std over the seeds
    assert row.pixel_auroc_std == pytest.approx(spread, abs=1e-12) and row.seeds == 2
    # the mean, the test-set interval of the mean over seeds, the spread over seeds
    cell = rf"{mean:.4f} \[[01]\.\d{{3}}, [01]\.\d{{3}}\] ± {spread:.4f}"
    assert re.search(rf"\| feature_stats \| per-category \| {cell} \| {cell} \|", section)


# -- unorganised clouds: point F1-max ---------------------------------------------------------------
@pytest.mark.slow
def test_point_f1max_matches_scikit_learn_on_the_exported_point_scores(tmp_path, tiny_points):
    from bench.datasets.real3d import PointCloudSet

    maps = tmp_path / "maps"
    args = [
        "run",
        "--detectors",
        "curvature",
        "--datasets",
        "real3d_ad",
        "--root",
        f"real3d_ad={tiny_points}",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-tracking",
        "--output",
        str(tmp_path),
        "--name",
        "points",
        "--export-maps",
        str(maps),
    ]
    assert main(args) == 0
    record = json.loads(
        (tmp_path / "points" / "jobs" / "curvature__real3d_ad__ellipsoid__seed0.json").read_text()
    )
    exported = maps / "curvature" / "real3d_ad" / "seed0" / "ellipsoid" / "test"
    scores, labels = [], []
    for item in PointCloudSet(tiny_points, "ellipsoid", "test").items:
        values = np.loadtxt(exported / item["defect"] / f"{item['path'].stem}.txt")
        truth = (
            np.zeros(len(values), bool)
            if item["gt_path"] is None
            else np.loadtxt(item["gt_path"])[:, 3] > 0.5
        )
        assert len(values) == len(truth)
        scores.append(values)
        labels.append(truth)
    s, y = np.concatenate(scores), np.concatenate(labels)
    assert record["protocol"] == "points"
    assert record["metrics"]["all"]["point_f1max"] == pytest.approx(f1_max(y, s), abs=1e-6)
    assert record["metrics"]["all"]["point_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
