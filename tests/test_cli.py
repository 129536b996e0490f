"""The CLI end to end: run on generated 2D and 3D data, MLflow store, resume, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

BIN = Path(sys.executable).parent


def bench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(BIN / "bench"), *args], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ad_root, ad3d_root):
    out = tmp_path_factory.mktemp("results")
    config = out / "small.toml"
    config.write_text(
        f"""
name = "small"
batch_size = 4
num_workers = 0

[[detectors]]
name = "feature_stats"

[[detectors]]
name = "autoencoder"
params = {{ iterations = 30, width = 8, checkpoint_every = 10 }}

[[detectors]]
name = "grid_curvature"

[[datasets]]
name = "mvtec_ad"
root = "{ad_root}"
categories = ["washer"]
image_size = 128

[[datasets]]
name = "mvtec_3d"
root = "{ad3d_root}"
categories = ["dome"]
image_size = "native"
"""
    )
    first = bench("run", "--config", str(config), "--output", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    return out, config, first


@pytest.mark.slow
def test_run_writes_one_result_per_job_with_real_metrics(finished):
    out, _, first = finished
    jobs = sorted(p.name for p in (out / "small" / "jobs").glob("*.json"))
    assert jobs == [
        "autoencoder__mvtec_ad__washer__seed0.json",
        "feature_stats__mvtec_ad__washer__seed0.json",
        "grid_curvature__mvtec_3d__dome__seed0.json",
    ]
    curv = json.loads((out / "small" / "jobs" / jobs[2]).read_text())
    assert curv["metrics"]["all"]["image_auroc"] > 0.9  # dents and bumps stand out
    assert curv["metrics"]["all"]["au_pro"] > 0.8
    assert set(curv["metrics"]) == {"all", "dent", "bump", "hole", "crack"}
    assert curv["protocol"] == "official" and curv["n_test"] == 4 + 3 * 4
    feats = json.loads((out / "small" / "jobs" / jobs[1]).read_text())
    assert feats["metrics"]["all"]["image_auroc"] > 0.8  # pretrained EfficientNet-Lite0 features
    for record in (curv, feats):
        assert (
            record["timings"]["fit_seconds"] > 0
            and record["timings"]["predict_images_per_second"] > 0
        )
        assert record["memory"]["predict_peak_host_mb"] > 100
    assert "Leaderboard" in first.stdout and "grid_curvature" in first.stdout
    board = (out / "small" / "leaderboard.md").read_text()
    assert "## au_pro" in board and "mvtec_3d/dome" in board


@pytest.mark.slow
def test_trainable_detector_left_checkpoint_and_fitted_state(finished):
    out, _, _ = finished
    (state,) = (out / "small" / "state").glob("autoencoder__*")
    assert (state / "last.ckpt").is_file() and (state / "fitted.pt").is_file()


@pytest.mark.slow
def test_mlflow_store_mirrors_the_results(finished):
    out, _, _ = finished
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/small")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("adbench.kind") == "benchmark"]
    children = [r for r in runs if r.data.tags.get("adbench.kind") == "job"]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for run in children:
        record = json.loads(
            (out / "small" / "jobs" / f"{run.info.run_name.replace('/', '__')}.json").read_text()
        )
        assert record["mlflow_run_id"] == run.info.run_id
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert run.data.metrics[key] == pytest.approx(record["metrics"]["all"][key], abs=1e-12)
        assert run.data.params["dataset"] == record["dataset"]
        assert run.data.params["resampling"] == record["resampling"] == "tensor"
        assert run.data.tags["config_hash"] == record["config_hash"]
        assert run.data.tags["data_fingerprint"] == record["data_fingerprint"] != "unknown"
        assert run.data.tags["version.timm"] == record["versions"]["timm"]
        spent = sum(
            record["timings"][k] for k in ("fit_seconds", "predict_seconds", "eval_seconds")
        )
        assert (run.info.end_time - run.info.start_time) / 1000 == pytest.approx(spent, abs=0.01)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_defect.csv", "config.json", "curves.png", "overlays"} <= files
        assert [a.path for a in client.list_artifacts(run.info.run_id, "overlays")] == [
            f"overlays/{run.info.run_name.replace('/', '__')}.png"
        ]
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_defect.csv"))
        assert list(table["subset"]) == ["all", *sorted(set(record["metrics"]) - {"all"})]
        for _, row in table.iterrows():
            expected = record["metrics"][row["subset"]]["au_pro"]
            assert row["au_pro"] == pytest.approx(expected, abs=1e-12, nan_ok=True)
        config = json.loads(
            Path(client.download_artifacts(run.info.run_id, "config.json")).read_text()
        )
        assert config["config_hash"] == record["config_hash"]
        assert config["params"] == record["params"]
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"leaderboard.md", "leaderboard.png", "config.json"} <= parent_files


@pytest.mark.slow
def test_second_run_skips_finished_jobs_and_logs_no_duplicates(finished):
    out, config, _ = finished
    again = bench("run", "--config", str(config), "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done before, skipped") == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/small")
    jobs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("adbench.kind") == "job"
    ]
    assert len(jobs) == 3


@pytest.mark.slow
def test_report_rebuilds_the_leaderboard(finished):
    out, _, _ = finished
    (out / "small" / "leaderboard.md").unlink()
    rep = bench("report", "--name", "small", "--output", str(out))
    assert rep.returncode == 0, rep.stderr
    assert "feature_stats" in (out / "small" / "leaderboard.md").read_text()
    png = (out / "small" / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.slow
def test_list_via_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "bench", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "grid_curvature" in out.stdout and "point_cloud" in out.stdout


@pytest.mark.slow
def test_bad_config_is_a_clear_error(tmp_path):
    missing = bench("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "neither a file nor a built-in config" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[detectors]]\nname = "feature_stats"\nparams = { sigmaa = 2 }\n[[datasets]]\nname = "builtin_ad"\n'
    )
    out = bench("run", "--config", str(bad), "--no-tracking", "--output", str(tmp_path))
    assert out.returncode == 2 and "unknown parameter(s) ['sigmaa']" in out.stderr


def test_leaderboard_keeps_protocols_in_separate_columns():
    """One dataset scored under two protocols: two column groups, never one mean."""
    from bench.report import metric_table, summary_frame

    def record(detector, protocol, value):
        return {
            "detector": detector,
            "dataset": "mvtec_ad",
            "category": "bottle",
            "seed": 0,
            "protocol": protocol,
            "metric_version": "1.0",
            "metrics": {
                "all": {
                    m: value
                    for m in (
                        "image_auroc",
                        "pixel_auroc",
                        "au_pro",
                        "pixel_ap",
                        "image_ap",
                        "image_f1max",
                        "pixel_f1max",
                    )
                }
            },
            "timings": {"fit_seconds": 1.0, "predict_images_per_second": 1.0},
        }

    records = [record("a", "official", 0.9), record("b", "official-cropped", 0.8)]
    table = metric_table(records, "au_pro")
    assert set(table.columns) == {
        "mvtec_ad [official, v1.0]/bottle",
        "mvtec_ad [official, v1.0]/mean",
        "mvtec_ad [official-cropped, v1.0]/bottle",
        "mvtec_ad [official-cropped, v1.0]/mean",
    }
    assert table.loc[("a", "per-category"), "mvtec_ad [official, v1.0]/mean"] == 0.9
    assert table["mvtec_ad [official-cropped, v1.0]/mean"].isna()[("a", "per-category")]
    assert len(summary_frame(records)) == 2


@pytest.mark.slow
def test_killed_benchmark_resumes_without_repeating_jobs_or_runs(tmp_path, ad_root):
    """SIGKILL mid-benchmark, run again: finished jobs are skipped, the rest are done, and
    every job ends with exactly one MLflow run."""
    import signal
    import time

    out = tmp_path / "out"
    args = (
        "run",
        "--detectors",
        "feature_stats,autoencoder",
        "--datasets",
        "mvtec_ad",
        "--root",
        str(ad_root),
        "--image-size",
        "96",
        "--param",
        "autoencoder.iterations=60",
        "--param",
        "autoencoder.width=8",
        "--name",
        "killed",
        "--output",
        str(out),
    )
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "bench"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    jobs = out / "killed" / "jobs"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(jobs.glob("*.json"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in jobs.glob("*.json")}
    assert 2 <= len(done_before) < 4, "the kill came too late to interrupt the benchmark"
    assert not list(jobs.glob("*.tmp*")), "a half-written result file was left"

    again = bench(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done before, skipped") == len(done_before)
    assert len(list(jobs.glob("*.json"))) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/killed")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("adbench.kind") == "job"
    ]
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(set(names)) and len(names) == 4
    for p in jobs.glob("*.json"):
        record = json.loads(p.read_text())
        assert record["mlflow_run_id"] in {r.info.run_id for r in runs}
