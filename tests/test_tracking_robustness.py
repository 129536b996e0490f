"""Tracking and results under damage: a truncated job file, repeated syncs, a SIGKILLed run.

Everything runs the real ``bench`` command on generated data against real SQLite MLflow
stores under ``tmp_path``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from bench.cli import main
from bench.tracking import _machine, _start_ticks

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _default_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def bench(*args: str) -> SimpleNamespace:
    """The ``bench`` command in this process (no interpreter start-up): exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def _env() -> dict[str, str]:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_args(ad_root: Path, out: Path, name: str, *extra: str) -> tuple[str, ...]:
    return (
        "run",
        "--detectors",
        "feature_stats",
        "--datasets",
        "mvtec_ad",
        "--root",
        str(ad_root),
        "--image-size",
        "96",
        "--name",
        name,
        "--output",
        str(out),
        *extra,
    )


def _runs(uri: str, experiment: str, kind: str | None = None) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if kind is None or r.data.tags.get("adbench.kind") == kind]


@pytest.mark.slow
def test_truncated_job_file_is_named_skipped_and_rerun(tmp_path, ad_root):
    out = tmp_path / "out"
    first = bench(*_run_args(ad_root, out, "trunc", "--no-tracking"))
    assert first.returncode == 0, first.stderr
    jobs = sorted((out / "trunc" / "jobs").glob("*.json"))
    assert len(jobs) == 2
    broken, intact = jobs
    broken.write_text(broken.read_text()[:300])  # e.g. a full disk mid-write
    kept = json.loads(intact.read_text())

    report = bench("report", "--name", "trunc", "--output", str(out))
    assert report.returncode == 0, report.stderr
    assert report.stderr.count(str(broken)) == 1, report.stderr
    assert "not finished" in report.stderr
    board = pd.read_csv(out / "trunc" / "leaderboard.csv")
    assert list(board["category"]) == [kept["category"]]

    uri = f"sqlite:///{tmp_path / 'server.db'}"
    synced = bench("sync", "--name", "trunc", "--output", str(out), "--tracking-uri", uri)
    assert synced.returncode == 0, synced.stderr
    assert synced.stderr.count(str(broken)) == 1, synced.stderr
    assert "1 job(s) uploaded, 0 already there" in synced.stderr
    assert "a new parent run" in synced.stderr
    children = _runs(uri, "adbench/trunc", "job")
    assert [r.info.run_name for r in children] == [kept["run_name"]]
    (parent,) = _runs(uri, "adbench/trunc", "benchmark")  # one parent, opened for this sync
    assert children[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["adbench.origin"] == "sync"

    again = bench(*_run_args(ad_root, out, "trunc", "--no-tracking"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done before, skipped") == 1
    assert again.stderr.count(": running") == 1
    assert json.loads(broken.read_text())["run_name"]  # re-run and whole again


@pytest.mark.slow
def test_sync_reuses_the_benchmark_parent_and_creates_no_empty_runs(tmp_path, ad_root):
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"  # the default store
    tracked = bench(*_run_args(ad_root, out, "resync", "--categories", "weave"))
    assert tracked.returncode == 0, tracked.stderr
    untracked = bench(*_run_args(ad_root, out, "resync", "--categories", "washer", "--no-tracking"))
    assert untracked.returncode == 0, untracked.stderr
    (parent,) = _runs(uri, "adbench/resync", "benchmark")
    assert len(_runs(uri, "adbench/resync")) == 2

    sync = ("sync", "--name", "resync", "--output", str(out), "--tracking-uri", uri)
    first = bench(*sync)
    assert first.returncode == 0, first.stderr
    runs = _runs(uri, "adbench/resync")
    assert len(runs) == 3  # the new child only: no parent for the sync
    children = [r for r in runs if r.data.tags.get("adbench.kind") == "job"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert "1 job(s) uploaded, 1 already there" in first.stderr
    assert "the benchmark's parent run" in first.stderr

    idle = bench(*sync)
    assert idle.returncode == 0, idle.stderr
    assert "0 job(s) uploaded, 2 already there" in idle.stderr
    assert len(_runs(uri, "adbench/resync")) == 3


def _running_parents(db: Path) -> list[str]:
    """The parent runs RUNNING in a store another process is writing (read with sqlite3, so
    that this test never races the writer's MLflow schema set-up)."""
    try:
        with sqlite3.connect(db, timeout=1) as con:
            rows = con.execute(
                "SELECT runs.run_uuid FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                "WHERE tags.key = 'adbench.kind' AND tags.value = 'benchmark' "
                "AND runs.status = 'RUNNING'"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [r[0] for r in rows]


def _fake_parent(
    client: MlflowClient, exp_id: str, name: str, host: str, pid: int, started: float
) -> str:
    """A RUNNING parent run as if opened by process ``pid`` on ``host``."""
    tags = {
        "adbench.kind": "benchmark",
        "adbench.host": host,
        "adbench.machine": _machine(),
        "adbench.pid": str(pid),
        "adbench.pid_started": f"{started:.3f}",
        "adbench.pid_ticks": _start_ticks(pid) if started else "1",
    }
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


@pytest.mark.slow
def test_sigkilled_run_parent_is_marked_killed_by_the_next_run(tmp_path, ad_root):
    out = tmp_path / "out"
    args = _run_args(ad_root, out, "sigkill")
    db = out / "mlflow.db"
    proc = subprocess.Popen(
        [str(BIN / "bench"), *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not _running_parents(db) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the benchmark ended before it was killed"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    (killed,) = _runs(uri, "adbench/sigkill", "benchmark")
    assert killed.info.status == "RUNNING"
    exp_id = killed.info.experiment_id
    here, me = socket.gethostname(), psutil.Process()
    elsewhere = _fake_parent(client, exp_id, "sigkill", "another-host", proc.pid, 0.0)
    alive = _fake_parent(client, exp_id, "sigkill", here, me.pid, me.create_time())
    other_benchmark = _fake_parent(client, exp_id, "other", here, proc.pid, 0.0)

    again = bench(*args)
    assert again.returncode == 0, again.stderr
    status = {r.info.run_id: r.info.status for r in _runs(uri, "adbench/sigkill")}
    assert status[killed.info.run_id] == "KILLED"
    assert killed.data.tags["adbench.pid"] == str(proc.pid)
    note = client.get_run(killed.info.run_id).data.tags["adbench.status_note"]
    assert note.startswith(f"KILLED: its bench process (pid {proc.pid} on ") and (
        "ended without closing this run" in note
    )
    assert "marked 1 earlier run(s) of sigkill" in again.stderr
    for left_alone in (elsewhere, alive, other_benchmark):
        assert status[left_alone] == "RUNNING"
    new = [
        r
        for r in _runs(uri, "adbench/sigkill", "benchmark")
        if r.info.run_id not in {killed.info.run_id, elsewhere, alive, other_benchmark}
    ]
    assert [r.info.status for r in new] == ["FINISHED"]
    assert new[0].data.tags["adbench.host"] == socket.gethostname()
