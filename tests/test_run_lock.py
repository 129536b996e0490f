"""One ``bench run`` at a time per benchmark folder (bench.run_lock).

Two real ``bench run`` processes of the same benchmark and output folder started at once: the
second waits for the first (saying who holds the folder), then finds every job finished; each
fit is computed once, MLflow ends with one run per job and one parent, FINISHED. ``bench sync``
refuses a folder a run holds. A holder killed by SIGKILL leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.cli import main
from bench.run_lock import LOCK_FILE, run_lock

CONFIG = """name = "{name}"
output = "{output}"
num_workers = 0
batch_size = 8
bootstrap = 50
[[detectors]]
name = "feature_stats"
params = {{ weights = "random" }}
[[datasets]]
name = "mvtec_ad"
root = "{root}"
image_size = 64
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _bench_run(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bench", "run", "--config", str(config)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_for(condition, procs: list[subprocess.Popen], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_two_runs_started_at_once_compute_each_job_once(tmp_path, ad_root):
    out = tmp_path / "out"
    folder = out / "twice"
    folder.mkdir(parents=True)
    config, other = tmp_path / "twice.toml", tmp_path / "other.toml"
    config.write_text(CONFIG.format(name="twice", output=out, root=ad_root))
    other.write_text(CONFIG.format(name="other", output=out, root=ad_root))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # the folder is held while both start, so that both reach it before either runs a job;
    # then they race for it as two runs started at the same instant would. A run of another
    # benchmark starts with them: it shares the new mlflow.db, whose schema only one creates
    with open(folder / LOCK_FILE, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        procs = [_bench_run(config, log) for log in logs]
        _wait_for(lambda: all("Waiting" in log.read_text() for log in logs), procs)
        third = _bench_run(other, tmp_path / "c.log")
    for proc in procs:
        proc.wait(timeout=300)
    assert third.wait(timeout=300) == 0, (tmp_path / "c.log").read_text()
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs

    # one process ran both jobs; the other waited for it, named it, and skipped them
    (winner,) = [i for i in (0, 1) if errs[i].count(": running") == 2]
    loser = 1 - winner
    assert errs[loser].count(": running") == 0 and errs[loser].count("done before, skipped") == 2
    assert f"pid {procs[winner].pid} on" in errs[loser] and str(folder / LOCK_FILE) in errs[loser]
    assert "Waiting for it to finish" in errs[loser] and "going on" in errs[loser]

    # every fit computed once
    fits = [json.loads(line) for line in (folder / "fits.jsonl").read_text().splitlines()]
    assert len(fits) == 2 and set(Counter(f["hash"] for f in fits).values()) == {1}
    assert {f["pid"] for f in fits} == {procs[winner].pid}

    # MLflow: one run per job, under the one parent, FINISHED
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/twice")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("adbench.kind") == "benchmark"]
    jobs = [r for r in runs if r.data.tags.get("adbench.kind") == "job"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(r.info.run_name for r in jobs) == sorted(
        json.loads(p.read_text())["run_name"] for p in (folder / "jobs").glob("*.json")
    )
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    for path in (folder / "jobs").glob("*.json"):
        assert json.loads(path.read_text())["mlflow_run_id"] in {r.info.run_id for r in jobs}
    # the other benchmark, started at the same time on the same new store, is tracked whole
    exp = client.get_experiment_by_name("adbench/other")
    runs = client.search_runs([exp.experiment_id])
    kinds = Counter((r.data.tags.get("adbench.kind"), r.info.status) for r in runs)
    assert kinds == {("benchmark", "FINISHED"): 1, ("job", "FINISHED"): 2}


@pytest.mark.slow
def test_sync_refuses_a_folder_a_run_holds_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    folder = tmp_path / "out" / "held"
    (folder / "jobs").mkdir(parents=True)
    (folder / "jobs" / "a.json").write_text(json.dumps({"run_name": "a", "config_hash": "x"}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bench.run_lock import run_lock\n"
         f"with run_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["sync", "--name", "held", "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith(f"bench: error: {folder} is in use by another process: pid ")
        assert f"pid {holder.pid} on" in err and "(bench run)" in err
        assert f"lock {folder / LOCK_FILE}" in err and "bench sync it after that ends" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with run_lock(folder, "test"):  # the killed holder's lock went with it: no wait
        assert time.monotonic() - started < 1
    assert "Waiting" not in capsys.readouterr().err
