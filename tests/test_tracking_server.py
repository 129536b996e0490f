"""A real `mlflow server` on loopback: a benchmark run while it is down still writes its
results, `bench sync` uploads them once it is up under one parent run, and nothing is uploaded
twice (nor is an empty parent created by a sync with nothing to upload)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

BIN = Path(sys.executable).parent


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(BIN / "bench"), *args], capture_output=True, text=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_address():
    port = _free_port()
    return port, f"http://127.0.0.1:{port}"


def _start_server(port: int, folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited at start-up") from None
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow server did not come up within 120 s")


@pytest.mark.slow
def test_outage_then_sync_uploads_each_job_once(tmp_path, ad_root, server_address):
    port, uri = server_address
    out = tmp_path / "results"
    args = ("--detectors", "feature_stats", "--datasets", "mvtec_ad", "--root", str(ad_root))
    common = ("--image-size", "96", "--name", "outage", "--output", str(out))
    down = bench("run", *args, *common, "--tracking-uri", uri)
    assert down.returncode == 0, down.stderr
    assert "unreachable" in down.stdout + down.stderr
    records = [json.loads(p.read_text()) for p in sorted((out / "outage" / "jobs").glob("*.json"))]
    assert len(records) == 2 and not any(r.get("mlflow_run_id") for r in records)

    server = _start_server(port, tmp_path)
    try:
        first = bench("sync", "--name", "outage", "--output", str(out), "--tracking-uri", uri)
        assert first.returncode == 0, first.stderr
        assert "2 job(s) uploaded, 0 already there" in first.stderr
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("adbench/outage")
        jobs = [
            r
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("adbench.kind") == "job"
        ]
        assert sorted(r.info.run_name for r in jobs) == sorted(r["run_name"] for r in records)
        (parent,) = [  # the run was never on this server: one new parent for the sync
            r
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("adbench.kind") == "benchmark"
        ]
        assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
        assert parent.info.status == "FINISHED"
        assert "leaderboard.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        for run in jobs:
            record = json.loads(
                (
                    out / "outage" / "jobs" / f"{run.info.run_name.replace('/', '__')}.json"
                ).read_text()
            )
            assert record["mlflow_run_id"] == run.info.run_id
            assert run.data.metrics["au_pro"] == pytest.approx(record["metrics"]["all"]["au_pro"])
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"per_defect.csv", "config.json", "curves.png"} <= files

        again = bench("sync", "--name", "outage", "--output", str(out), "--tracking-uri", uri)
        assert "0 job(s) uploaded, 2 already there" in again.stderr
        assert len(client.search_runs([exp.experiment_id])) == 3  # no empty parent
        rerun = bench("run", *args, *common, "--tracking-uri", uri)
        assert rerun.returncode == 0 and rerun.stderr.count("done before, skipped") == 2
        jobs_after = [
            r
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("adbench.kind") == "job"
        ]
        assert len(jobs_after) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_make_server_serves_a_team_run_and_its_artifacts(tmp_path, ad_root, server_address):
    """`make server` (the team's tracking server) as a real process on loopback: a benchmark
    pointed at it through MLFLOW_TRACKING_URI logs its runs there, and the artifacts land in
    the server's folder under RESULTS (proxied: the client never writes them itself)."""
    port, uri = server_address
    served = tmp_path / "served"
    env = {**os.environ, "MLFLOW_BACKEND_URI": f"sqlite:///{tmp_path / 'team.db'}"}
    server = subprocess.Popen(
        ["make", "--no-print-directory", "server", f"PORT={port}", "SERVER_HOST=127.0.0.1",
         f"RESULTS={served}", "SERVER_ARGS=--workers 1"],
        cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(0.5)
        out = tmp_path / "client"
        run = subprocess.run(
            [str(BIN / "bench"), "run", "--detectors", "feature_stats", "--datasets",
             "mvtec_ad", "--root", str(ad_root), "--categories", "washer", "--image-size",
             "64", "--name", "team", "--output", str(out)],
            capture_output=True, text=True,
            env={**os.environ, "ADBENCH_PROGRESS": "0", "MLFLOW_TRACKING_URI": uri},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("adbench/team")
        (job,) = [
            r
            for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("adbench.kind") == "job"
        ]
        assert job.info.run_name == "feature_stats/mvtec_ad/washer/seed0"
        assert (tmp_path / "team.db").is_file()  # MLFLOW_BACKEND_URI is the backend
        stored = {p.name for p in (served / "mlartifacts").rglob("*") if p.is_file()}
        assert {"per_defect.csv", "config.json"} <= stored
        assert not (out / "mlartifacts").exists() and not (out / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, 15)  # make and the mlflow server it started
        server.wait(timeout=30)
