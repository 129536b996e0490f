"""MLflow under faults (issue 29: 0c, 0d, 1), against real stores.

- A tracking server (a real ``mlflow server`` on loopback) killed mid-training costs the run
  seconds, not MLflow's minutes of retries: one message, then no path calls it again; the run
  exits 0 with every result on disk.
- When it is back, the next ``bench run`` gives the run that lost it its real status (never
  KILLED) and closes its training-curve run, and ``bench sync`` files its jobs under it.
- A run with a failed job ends FAILED, naming the job.
- A SQLite store that is truncated or overwritten is named with its recovery by ``bench run``
  (which goes on untracked), ``bench sync`` and ``bench links``; the results folder is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from bench.cli import main

#: MLflow's HTTP settings that a run against a server sets where the environment does not
HTTP_WAITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_TIMEOUT")  # fmt: skip

BIN = Path(sys.executable).parent
#: a trained detector small enough for seconds on a CPU: its curve is flushed at each checkpoint
AUTOENCODER = ("--param", "autoencoder.width=4", "--param", "autoencoder.latent=8",
               "--param", "autoencoder.iterations=24", "--param", "autoencoder.checkpoint_every=2",
               "--train-log-every", "1")  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No tracking URI from the environment; the HTTP bounds a run sets are undone after."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in HTTP_WAITS:
        monkeypatch.delenv(key, raising=False)


def bench(*args: str) -> SimpleNamespace:
    """The ``bench`` command in this process: exit code and stderr, whitespace squashed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=" ".join(err.getvalue().split()))


def _run_args(root: Path, out: Path, name: str, *extra: str) -> tuple[str, ...]:
    return ("run", "--datasets", "mvtec_ad", "--root", str(root), "--num-workers", "0",
            "--param", "feature_stats.weights=random", "--name", name, "--output", str(out),
            *extra)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(port: int, folder: Path) -> subprocess.Popen:
    """An ``mlflow server`` on loopback storing in ``folder`` (its own process group)."""
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _wait_up(proc: subprocess.Popen, uri: str) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            assert proc.poll() is None, "mlflow server exited at start-up"
            time.sleep(0.2)
    raise AssertionError("mlflow server did not come up within 180 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _curve_points(db: Path) -> int:
    """How many training-loss points the server's store holds (read with sqlite3)."""
    try:
        with sqlite3.connect(db, timeout=1) as con:
            sql = "SELECT count(*) FROM metrics WHERE key = 'train/loss'"
            return con.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0


def _timed(cmd: list[str], kill_when=None, on_kill=None) -> tuple[float, str, int]:
    """Runs ``cmd`` (seconds, output, exit code); calls ``on_kill`` once ``kill_when()``."""
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    while kill_when is not None and proc.poll() is None:
        if kill_when():
            on_kill()
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=900)
    return time.monotonic() - start, " ".join(out.split()), proc.returncode


@pytest.mark.slow
def test_a_server_killed_mid_training_costs_seconds_and_its_runs_get_their_status(
    tmp_path, ad_root
):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(port, tmp_path)
    detectors = ("--detectors", "autoencoder,feature_stats", "--categories", "washer")
    args = (*detectors, "--image-size", "128", *AUTOENCODER)
    out = tmp_path / "out"
    try:  # the baseline while the server starts: the same run, untracked
        baseline, log, code = _timed(
            [str(BIN / "bench"), *_run_args(ad_root, tmp_path / "base", "lost", *args),
             "--no-tracking"]
        )  # fmt: skip
        assert code == 0, log
        _wait_up(server, uri)
        seconds, log, code = _timed(
            [str(BIN / "bench"), *_run_args(ad_root, out, "lost", *args), "--tracking-uri", uri],
            kill_when=lambda: _curve_points(tmp_path / "server.db") > 0,
            on_kill=lambda: _stop(server),
        )  # fmt: skip
        assert code == 0, log
        assert server.poll() is not None, "the run ended before the server was killed"
        assert seconds < baseline + 30, (seconds, baseline, log)  # minutes before the fix
        # one message naming the server and what to do; then no path waits on it again
        assert log.count("is off for the rest of this run") == 1, log
        assert f"tracking at {uri} is off" in log and "bench sync --name lost" in log
        records = [json.loads(p.read_text()) for p in (out / "lost" / "jobs").glob("*.json")]
        assert len(records) == 2 and not any(r.get("mlflow_run_id") for r in records)
        (entry,) = json.loads((out / "lost" / "tracking.json").read_text())["parents"]
        assert entry["status"] == "FINISHED" and entry["on_store"] is False

        server = _server(port, tmp_path)  # back, with the same store
        _wait_up(server, uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("adbench/lost").experiment_id
        (fit,) = [r for r in client.search_runs([exp]) if r.data.tags["adbench.kind"] == "fit"]
        assert client.get_run(entry["run_id"]).info.status == fit.info.status == "RUNNING"

        # the next run (another job of the benchmark): the lost run is FINISHED, not KILLED
        weave = _run_args(ad_root, out, "lost", "--detectors", "feature_stats",
                          "--categories", "weave", "--image-size", "64", "--tracking-uri", uri)  # fmt: skip
        nxt = bench(*weave)
        assert nxt.returncode == 0, nxt.stderr
        assert "KILLED" not in nxt.stderr and "ended while the tracking store was unreachable" in (
            nxt.stderr
        )
        lost = client.get_run(entry["run_id"])
        assert lost.info.status == "FINISHED"
        assert "the next `bench run` set this status later" in lost.data.tags["adbench.status_note"]
        fit = client.get_run(fit.info.run_id)
        assert fit.info.status == "FINISHED"
        assert "training finished" in fit.data.tags["adbench.status_note"]

        # sync files the lost run's jobs under it, not under a new parent or the next run's
        sync = bench("sync", "--name", "lost", "--output", str(out), "--tracking-uri", uri)
        assert sync.returncode == 0, sync.stderr
        assert "2 job(s) uploaded, 1 already there" in sync.stderr
        assert f"the benchmark's parent run, {entry['run_id']}" in sync.stderr
        runs = client.search_runs([exp])
        jobs = {r.info.run_name: r for r in runs if r.data.tags["adbench.kind"] == "job"}
        parents = [r for r in runs if r.data.tags["adbench.kind"] == "benchmark"]
        assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
        for record in records:
            job = jobs[record["run_name"]]
            assert job.data.tags["mlflow.parentRunId"] == entry["run_id"]
        trained = jobs[next(r["run_name"] for r in records if "autoencoder" in r["run_name"])]
        assert trained.data.tags["adbench.fit_run_id"] == fit.info.run_id
        assert "leaderboard.md" in {a.path for a in client.list_artifacts(entry["run_id"])}
    finally:
        _stop(server)


@pytest.mark.slow
def test_a_run_with_a_failed_job_ends_failed_naming_it(tmp_path, ad_root):
    root = tmp_path / "data"
    shutil.copytree(ad_root / "weave", root / "weave")
    shutil.copytree(ad_root / "washer", root / "washer")
    broken = next((root / "weave" / "test" / "good").iterdir())
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    run = bench(*_run_args(root, out, "half", "--detectors", "feature_stats",
                           "--image-size", "64"))  # fmt: skip
    assert run.returncode == 1 and "1 job(s) failed" in run.stderr, run.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/half")
    (parent,) = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags["adbench.kind"] == "benchmark"
    ]
    assert parent.info.status == "FAILED"
    note = parent.data.tags["adbench.status_note"]
    assert note.startswith("FAILED: 1 job(s) failed") and "feature_stats/mvtec_ad/weave" in note
    assert len(list((out / "half" / "jobs").glob("*.json"))) == 1


def _damage(db: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(db, db.stat().st_size // 2)
    else:
        db.write_bytes(os.urandom(8192))


@pytest.mark.slow
def test_a_damaged_sqlite_store_is_named_with_its_recovery(tmp_path, ad_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the message shows paths relative to the working folder
    args = _run_args(ad_root, Path("results"), "dmg", "--detectors", "feature_stats",
                     "--image-size", "64", "--categories")  # fmt: skip
    assert bench(*args, "washer").returncode == 0
    db = tmp_path / "results" / "mlflow.db"
    job = next((tmp_path / "results" / "dmg" / "jobs").glob("*.json"))
    kept, intact = job.read_bytes(), db.read_bytes()
    for how in ("truncated", "garbage"):
        db.write_bytes(intact)
        _damage(db, how)
        damaged = db.read_bytes()
        expected = (
            "MLflow store results/mlflow.db is not a readable SQLite database ({}); move it "
            "aside (mv results/mlflow.db results/mlflow.db.bad) and run `bench sync --name dmg "
            "--output results` to re-upload the finished jobs; the results folder is untouched"
        )
        reason = "file is not a database" if how == "garbage" else "database disk image"
        run = bench(*args, "weave", "--force")  # a job to run: the run opens tracking
        assert run.returncode == 0, run.stderr  # it goes on untracked: a warning
        assert expected.format(reason)[:80] in run.stderr and reason in run.stderr, run.stderr
        assert "tracking is off for this run" in run.stderr and "running" in run.stderr
        assert "sqlalchemy" not in run.stderr.lower() and "Traceback" not in run.stderr
        sync = bench("sync", "--name", "dmg", "--output", "results")
        assert sync.returncode == 2
        assert sync.stderr.startswith("bench: error: MLflow store results/mlflow.db is not"), (
            sync.stderr
        )
        assert "to re-upload the finished jobs; the results folder is untouched" in sync.stderr
        links = bench("links", "--output", "results")
        assert links.returncode == 2 and "bench sync --name <name> --output results" in (
            links.stderr
        )
        assert "sqlalchemy" not in (sync.stderr + links.stderr).lower()
        assert db.read_bytes() == damaged and job.read_bytes() == kept
    db.rename(db.with_name("mlflow.db.bad"))  # the recovery the message names
    # a new process, as the user's: this one's MLflow keeps its engine on the damaged file
    _, synced, code = _timed([str(BIN / "bench"), "sync", "--name", "dmg", "--output", "results"])
    assert code == 0 and "2 job(s) uploaded, 0 already there" in synced, synced
