"""Fit scopes end to end: unified fits shared by categories (and resumed after a kill), k-shot
draws with recorded references, training on another dataset, two-stage detectors, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from bench.benchmark import run_benchmark
from bench.capabilities import ReferenceStage
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry, validate
from bench.datasets import synthetic_visa
from bench.detector import FIT_SCOPES, Detector
from bench.plan import plan_jobs
from bench.registry import _REGISTRY, register_detector
from bench.report import write_report
from bench.results import ResultStore
from bench.types import Prediction

BIN = Path(sys.executable).parent


def _paths(train) -> list[str]:
    return sorted(m["path"] for batch in train for m in batch.meta)


def _score(batch, mean: torch.Tensor) -> Prediction:
    """Distance of each pixel's colour to the training images' mean colour."""
    maps = (batch.image - mean.view(1, 3, 1, 1)).abs().mean(1)
    return Prediction(score=maps.flatten(1).amax(1), anomaly_map=maps)


@pytest.fixture
def recorder():
    """A detector that keeps the paths of every image its fit received (in its state)."""
    name = "recorder_test"

    @register_detector(name)
    class Recorder(Detector):
        """Records what fit saw."""

        fit_scopes = FIT_SCOPES

        def __init__(self, seed: int = 0):
            self.seed = seed

        def fit(self, train):
            self.paths_ = _paths(train)
            self.mean_ = torch.stack([b.image.mean((0, 2, 3)) for b in train]).mean(0)

        def predict(self, batch):
            return _score(batch, self.mean_)

    yield name
    _REGISTRY.pop(name, None)


@pytest.fixture
def two_stage():
    """A two-stage detector: ``fit`` on the train_on dataset, then each category's references."""
    name = "two_stage_test"

    @register_detector(name)
    class TwoStage(Detector, ReferenceStage):
        """First stage on another dataset, second on k references."""

        fit_scopes = ("train_on", "shots")

        def fit(self, train):
            self.base_paths_ = _paths(train)

        def fit_references(self, references):
            self.ref_paths_ = _paths(references)
            self.mean_ = torch.stack([b.image.mean((0, 2, 3)) for b in references]).mean(0)

        def predict(self, batch):
            return _score(batch, self.mean_)

    yield name
    _REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return synthetic_visa.generate(
        tmp_path_factory.mktemp("visa"), n_train=6, n_test_good=3, n_anomaly=3
    )


def _cfg(tmp_path, ad_root, detector: str, **fields) -> BenchConfig:
    fields.setdefault("name", "scopes")
    return BenchConfig(
        detectors=[DetectorEntry(detector)],
        datasets=[DatasetEntry("mvtec_ad", root=str(ad_root), image_size=64)],
        batch_size=4,
        num_workers=0,
        output=str(tmp_path / "out"),
        **fields,
    )


def _fitted(store: ResultStore, fit) -> dict:
    blob = torch.load(store.fit_dir(fit) / "fitted.pt", weights_only=False)
    return blob["state"]


# -- few shots ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_shot_draws_record_their_references_and_the_report_spreads_over_draws(
    tmp_path, ad_root, recorder
):
    cfg = _cfg(tmp_path, ad_root, recorder, shots=2, shot_draws=3)
    jobs = plan_jobs(cfg)
    records, failed = run_benchmark(cfg)
    assert failed == [] and len(records) == 2 * 3
    store = ResultStore(cfg.output, cfg.name)
    by_job = {r["run_name"]: r for r in records}
    for category in sorted({j.category for j in jobs}):
        refs = [tuple(by_job[j.run_name]["references"]) for j in jobs if j.category == category]
        assert len(set(refs)) == 3 and all(len(r) == 2 for r in refs)
        assert all(r[0].startswith(f"{category}/train/good/") for r in refs)
    for job in jobs:  # the fit saw exactly the recorded references, nothing else
        record = by_job[job.run_name]
        seen = _fitted(store, job.fit)["paths_"]
        assert seen == sorted(
            str(Path(record["references_root"]) / r) for r in record["references"]
        )
        assert record["n_train"] == 2 and record["scope"]["shots"] == 2

    # mean and std over draws of the category mean, as the report states them
    write_report(cfg.output, cfg.name)
    summary = pd.read_csv(store.root / "summary.csv")
    per_draw = (
        pd.DataFrame(
            [{"draw": r["draw"], "v": r["metrics"]["all"]["image_auroc"]} for r in records]
        )
        .groupby("draw")["v"]
        .mean()
    )
    row = summary.iloc[0]
    assert row["fit"] == "2-shot" and row["draws"] == 3 and row["seeds"] == 1
    assert row["image_auroc"] == pytest.approx(per_draw.mean(), abs=1e-12)
    assert row["image_auroc_std"] == pytest.approx(np.std(per_draw.values, ddof=1), abs=1e-12)
    leaderboard = pd.read_csv(store.root / "leaderboard.csv")
    assert sorted(leaderboard["draw"]) == [0, 0, 1, 1, 2, 2]  # every draw kept
    markdown = (store.root / "leaderboard.md").read_text()
    # the mean over draws, its test-set interval, the spread over draws
    mean, spread = f"{per_draw.mean():.4f}", f"{np.std(per_draw.values, ddof=1):.4f}"
    assert re.search(rf"{mean} \[[01]\.\d{{3}}, [01]\.\d{{3}}\] ± {spread}", markdown)

    # the reference list is an MLflow artifact that replays the draw exactly
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    chosen = by_job[jobs[1].run_name]
    listed = client.download_artifacts(chosen["mlflow_run_id"], "references.txt", str(tmp_path))
    replay = _cfg(tmp_path, ad_root, recorder, shot_files=[listed], name="replay")
    replay.datasets[0].categories = [chosen["category"]]
    again, failed = run_benchmark(replay, track=False)
    assert failed == [] and again[0]["references"] == chosen["references"]
    assert again[0]["metrics"]["all"] == chosen["metrics"]["all"]
    # listed references are their own row and run name, never averaged with seeded draws
    assert again[0]["fit_label"] == "2-shot listed" and "/2shot-list0/" in again[0]["run_name"]


@pytest.mark.slow
def test_a_unified_few_shot_fit_pools_k_references_of_every_category(tmp_path, ad_root, recorder):
    cfg = _cfg(tmp_path, ad_root, recorder, scope="unified", shots=1, shot_draws=2)
    jobs = plan_jobs(cfg)
    assert len(jobs) == 4 and len({j.fit_hash for j in jobs}) == 2  # one fit per draw
    records, failed = run_benchmark(cfg, track=False)
    assert failed == []
    store = ResultStore(cfg.output, cfg.name)
    for draw in (0, 1):
        fit = next(j.fit for j in jobs if j.draw == draw)
        refs = sorted(
            str(Path(r["references_root"]) / x)
            for r in records
            if r["draw"] == draw
            for x in r["references"]
        )
        assert _fitted(store, fit)["paths_"] == refs and len(refs) == 2
    assert sum(r["fit_shared"] for r in records) == 2


# -- training on another dataset ---------------------------------------------------------------
def test_train_on_a_visa_layout_dataset_scores_the_mvtec_layout_one(
    tmp_path, ad_root, visa_root, recorder
):
    cfg = _cfg(tmp_path, ad_root, recorder, train_on={"dataset": "visa", "root": str(visa_root)})
    records, failed = run_benchmark(cfg, track=False)
    assert failed == [] and len(records) == 2
    assert len({r["fit_hash"] for r in records}) == 1
    store = ResultStore(cfg.output, cfg.name)
    assert len(list(store.root.glob("state/*/fitted.pt"))) == 1  # computed once, shared
    seen = _fitted(store, plan_jobs(cfg)[0].fit)["paths_"]
    csv = pd.read_csv(visa_root / "split_csv" / "1cls.csv")
    train = sorted(str(visa_root / p) for p in csv[csv["split"] == "train"]["image"])
    assert seen == train  # every VisA training image and nothing of the target
    for r in records:
        assert r["fit_label"] == "from visa" and r["scope"]["train_on"]["dataset"] == "visa"
        assert r["n_train"] == len(train) and 0 <= r["metrics"]["all"]["image_auroc"] <= 1


@pytest.mark.slow
def test_a_two_stage_detector_shares_its_first_stage_across_categories_and_draws(
    tmp_path, ad_root, visa_root, two_stage
):
    cfg = _cfg(
        tmp_path,
        ad_root,
        two_stage,
        train_on={"dataset": "visa", "root": str(visa_root), "categories": ["candle"]},
        shots=1,
        shot_draws=2,
    )
    jobs = plan_jobs(cfg)
    assert len(jobs) == 4 and len({j.fit.parent.hash for j in jobs}) == 1
    records, failed = run_benchmark(cfg, track=False)
    assert failed == []
    store = ResultStore(cfg.output, cfg.name)
    infos = [json.loads(p.read_text()) for p in store.root.glob("state/*/fit.json")]
    assert sorted(i["fit"]["stage"] for i in infos) == ["fit"] + ["references"] * 4
    candle = sorted(
        str(visa_root / p)
        for p in pd.read_csv(visa_root / "split_csv" / "1cls.csv").query(
            "object == 'candle' and split == 'train'"
        )["image"]
    )
    for job, record in zip(jobs, records):
        state = _fitted(store, job.fit)
        assert state["base_paths_"] == candle
        assert state["ref_paths_"] == [str(Path(job.root) / r) for r in record["references"]]
    first = next(
        p for p in store.root.glob("state/*/fit.json") if '"stage": "fit"' in p.read_text()
    )
    before = first.stat().st_mtime_ns
    again, _ = run_benchmark(cfg, track=False)  # all done before: nothing fitted again
    assert first.stat().st_mtime_ns == before
    run_benchmark(cfg, force=True, track=False)  # --force: the first stage once, not per job
    assert len(list(store.root.glob("state/*/fit.json"))) == 5
    assert first.stat().st_mtime_ns > before


# -- unified fit: one training, killed and resumed ---------------------------------------------
def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(BIN / "bench"), *args], capture_output=True, text=True, env=env)


def _unified_args(ad_root: Path, out: Path) -> list[str]:
    return [
        "run", "--detectors", "autoencoder", "--datasets", "mvtec_ad", "--root", str(ad_root),
        "--image-size", "64", "--scope", "unified", "--batch-size", "4", "--num-workers", "0",
        "--param", "autoencoder.iterations=40", "--param", "autoencoder.width=8",
        "--param", "autoencoder.checkpoint_every=5", "--train-log-every", "1",
        "--name", "uni", "--output", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_unified_fit_trains_once_and_a_killed_training_resumes_to_the_same_metrics(
    tmp_path, ad_root, monkeypatch
):
    from bench.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(_unified_args(ad_root, tmp_path / "straight")) == 0  # uninterrupted

    out = tmp_path / "killed"
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "bench"), *_unified_args(ad_root, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("uni/state/*/last.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(next(out.glob("uni/state/*/last.ckpt")), weights_only=False)
    assert checkpoint["step"] < 40 and not list(out.glob("uni/state/*/fitted.pt")), (
        "the kill came too late to interrupt the training"
    )

    resumed = _bench(*_unified_args(ad_root, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming training at step" in resumed.stdout + resumed.stderr

    records = {}
    for name in ("straight", "killed"):
        jobs = sorted((tmp_path / name / "uni" / "jobs").glob("*.json"))
        records[name] = [json.loads(p.read_text()) for p in jobs]
        assert [r["category"] for r in records[name]] == ["washer", "weave"]  # one per category
        assert len({r["fit_hash"] for r in records[name]}) == 1
        assert len(list((tmp_path / name).glob("uni/state/*/fitted.pt"))) == 1  # one state
    for a, b in zip(records["straight"], records["killed"]):
        assert b["fit_label"] == "unified" and b["n_train"] == 2 * 12
        assert b["metrics"] == a["metrics"]  # exact resume: every metric equal, bit for bit

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/uni")
    runs = client.search_runs([exp.experiment_id])
    fits = [r for r in runs if r.data.tags.get("adbench.kind") == "fit"]
    assert len(fits) == 1 and fits[0].info.status == "FINISHED"  # one training run, resumed
    steps = [m.step for m in client.get_metric_history(fits[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(40))
    jobs = [r for r in runs if r.data.tags.get("adbench.kind") == "job"]
    assert len(jobs) == 2
    assert {r.data.tags["adbench.fit_run_id"] for r in jobs} == {fits[0].info.run_id}
    assert {r.data.params["fit"] for r in jobs} == {"unified"}


# -- what the plan refuses -----------------------------------------------------------------------
@pytest.fixture
def per_category_only():
    name = "per_category_only_test"

    @register_detector(name)
    class PerCategory(Detector):
        """Fits per category only (the default scopes)."""

    yield name
    _REGISTRY.pop(name, None)


def test_the_plan_refuses_scopes_a_detector_does_not_take(
    tmp_path, ad_root, per_category_only, two_stage, recorder
):
    with pytest.raises(
        ConfigError,
        match=r"'per_category_only_test'.*supports the fit scope\(s\) per_category; the config asks for unified",
    ):
        plan_jobs(_cfg(tmp_path, ad_root, per_category_only, scope="unified"))
    with pytest.raises(ConfigError, match="two stages: set train_on"):
        plan_jobs(_cfg(tmp_path, ad_root, two_stage, shots=1))
    with pytest.raises(ConfigError, match="one stage: train_on and shots"):
        plan_jobs(_cfg(tmp_path, ad_root, recorder, train_on="mvtec_ad", shots=1))
    with pytest.raises(
        ConfigError, match="washer: shots = 99 but its training split holds only 12"
    ):
        plan_jobs(_cfg(tmp_path, ad_root, recorder, shots=99))
    with pytest.raises(ConfigError, match="takes all 12 training images, so its 3 draws"):
        plan_jobs(_cfg(tmp_path, ad_root, recorder, shots=12, shot_draws=3))
    with pytest.raises(
        ConfigError,
        match=r"train_on dataset mvtec_ad \(root /nowhere; set it with --root mvtec_ad=PATH",
    ):
        plan_jobs(
            _cfg(tmp_path, ad_root, recorder, train_on={"dataset": "mvtec_ad", "root": "/nowhere"})
        )
    with pytest.raises(ConfigError, match="scope 'unified' and train_on exclude each other"):
        validate(_cfg(tmp_path, ad_root, recorder, scope="unified", train_on="visa"))
    listed = tmp_path / "refs.txt"
    listed.write_text("washer/train/good/000.png\nweave/train/good/nope.png\n")
    with pytest.raises(
        ConfigError, match=rf"shot file {listed} lists no training image of category weave"
    ):
        plan_jobs(_cfg(tmp_path, ad_root, recorder, shot_files=[str(listed)]))
    listed.write_text("washer/train/good/000.png\nweave/train/good/001.png\nweave/x.png\n")
    with pytest.raises(
        ConfigError, match=rf"shot file {listed} line 3: weave/x.png is not a training image"
    ):
        plan_jobs(_cfg(tmp_path, ad_root, recorder, shot_files=[str(listed)]))
    # a list of more categories than evaluated (the shipped official ones): theirs are left alone
    listed.write_text("washer/train/good/000.png\ncable/train/good/076.png\n")
    jobs = plan_jobs(_cfg(tmp_path, ad_root, recorder, shot_files=[str(listed)],
                          categories=["washer"]))  # fmt: skip
    assert [j.references for j in jobs] == [("washer/train/good/000.png",)]


def test_scope_flags_on_the_command_line(tmp_path, ad_root, visa_root, capsys):
    from bench.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["run", "--detectors", "knn", "--datasets", "mvtec_ad", "--root", f"mvtec_ad={ad_root}",
         "--train-on", "visa:candle", "--root", f"visa={visa_root}"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.train_on == {"dataset": "visa", "root": str(visa_root), "categories": ["candle"]}
    args = build_parser().parse_args(
        ["run", "--detectors", "knn", "--shots", "4", "--shot-draws", "5", "--scope", "unified"]
    )
    cfg = config_from_args(args)
    assert (cfg.scope, cfg.shots, cfg.shot_draws) == ("unified", 4, 5)
    # the same dataset evaluated and trained on: --root sets both
    args = build_parser().parse_args(
        ["run", "--detectors", "knn", "--datasets", "visa", "--train-on", "visa",
         "--root", f"visa={visa_root}"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.datasets[0].root == str(visa_root) and cfg.train_on["root"] == str(visa_root)
    # a scope flag replaces the config's whole group: listed files give way to seeded draws
    listed = tmp_path / "shots.toml"
    listed.write_text(
        'shot_files = ["a.txt"]\ntrain_on = "visa"\n[[detectors]]\nname = "knn"\n'
        '[[datasets]]\nname = "mvtec_ad"\n'
    )
    args = build_parser().parse_args(
        ["run", "--config", str(listed), "--shots", "2", "--shot-draws", "3", "--scope", "unified"]
    )
    cfg = config_from_args(args)
    assert (cfg.shot_files, cfg.shots, cfg.shot_draws) == (None, 2, 3)
    assert (cfg.scope, cfg.train_on) == ("unified", None)
    from bench.cli import main

    assert main(["run", "--detectors", "feature_stats", "--shots", "0", "--no-tracking"]) == 2
    assert "--shots 0 is not valid; expected an integer >= 1" in capsys.readouterr().err


def test_report_means_skip_nothing_and_spreads_use_complete_replicates():
    """Seed 1 lacks category b: the mean is over categories of per-category means (as without
    replicates), the spread only over the replicates that scored every category."""
    from bench.report import metric_table, summary_frame

    def record(category, seed, value):
        return {
            "detector": "d", "dataset": "ds", "category": category, "seed": seed,
            "protocol": "official", "metric_version": "1.0", "fit_hash": f"{category}{seed}",
            "metrics": {"all": {"image_auroc": value}},
            "timings": {"fit_seconds": 2.0, "predict_images_per_second": 1.0},
        }  # fmt: skip

    records = [
        record("a", 0, 0.9),
        record("b", 0, 0.5),
        record("a", 1, 0.7),
        record("a", 2, 0.8),
        record("b", 2, 0.4),
    ]
    row = summary_frame(records).iloc[0]
    assert row["image_auroc"] == pytest.approx(((0.9 + 0.7 + 0.8) / 3 + (0.5 + 0.4) / 2) / 2)
    assert row["image_auroc_std"] == pytest.approx(np.std([0.7, 0.6], ddof=1))  # seeds 0, 2
    assert (row["seeds"], row["fits"], row["fit_seconds"]) == (3, 5, 2.0)
    table = metric_table(records, "image_auroc")
    assert table.loc[("d", "per-category"), "ds/mean"] == pytest.approx(row["image_auroc"])
