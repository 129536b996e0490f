"""The Ray executor on a real local cluster: a head node and one more worker node, started by
these tests on 127.0.0.1 (``ray start --block``) and stopped by them.

- a grid of jobs gives the same records (metrics to 1e-9) as the local executor;
- a shared (unified) fit requested by several jobs is computed once, by either executor;
- a worker killed (SIGKILL, by its pid) mid-job: the job is retried, and every job ends exactly
  once in results/ and exactly once in MLflow (job runs and training-curve runs);
- a job that fails by itself is recorded as failed once, next to the jobs that finish.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from bench.benchmark import run_benchmark  # noqa: E402
from bench.config import BenchConfig, DatasetEntry, DetectorEntry  # noqa: E402
from bench.job.fitting import fit_log  # noqa: E402
from bench.results import ResultStore  # noqa: E402
from bench.run_lock import LOCK_FILE  # noqa: E402

BIN = Path(sys.executable).parent
#: token authentication is for clusters reachable from other machines; these are loopback only
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``ray start --block`` as a process group of its own; returns once the node is up."""
    cmd = [str(BIN / "ray"), "start", "--block", *args, "--node-ip-address=127.0.0.1",
           "--num-cpus=1", "--num-gpus=0", "--object-store-memory=80000000"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """Stops a node: SIGTERM to its process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)  # its raylet, GCS and workers
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node Ray cluster on loopback, 1 CPU per node; yields its address."""
    logs = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **RAY_ENV}
    port = _free_port()
    head = _start_node(
        ["--head", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats"],
        logs / "head.log",
        env,
    )
    nodes = [head]
    try:
        nodes.append(
            _start_node(
                [f"--address=127.0.0.1:{port}", "--disable-usage-stats"], logs / "worker.log", env
            )
        )
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            _stop(node)
        # a killed head leaves its address in Ray's "current cluster" file, which `ray.init()`
        # and `ray status` would then try to join
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.fixture
def ray_env(monkeypatch):
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)


def _bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV}
    return subprocess.run(
        [str(BIN / "bench"), "run", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _grid(root: Path, output: Path, **kw) -> BenchConfig:
    """knn and feature_stats per category, and knn unified over both categories."""
    knn = {"backbone": "efficientnet_lite0"}
    return BenchConfig(
        name="grid",
        detectors=[
            DetectorEntry("feature_stats", params={"weights": "random"}),
            DetectorEntry("knn", params=knn),
            DetectorEntry("knn", label="knn-unified", params=knn, scope="unified"),
        ],
        datasets=[DatasetEntry("mvtec_ad", root=str(root), image_size=64)],
        batch_size=8,
        num_workers=0,
        output=str(output),
        **kw,
    )


def _write_toml(cfg: BenchConfig, path: Path) -> Path:
    lines = [f'name = "{cfg.name}"', f"batch_size = {cfg.batch_size}", "num_workers = 0"]
    for det in cfg.detectors:
        lines += ["[[detectors]]", f'name = "{det.name}"', f'label = "{det.display}"']
        lines.append("params = {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in det.params.items()) + "}")  # fmt: skip
        if det.scope:
            lines.append(f'scope = "{det.scope}"')
    for ds in cfg.datasets:
        lines += ["[[datasets]]", f'name = "{ds.name}"', f'root = "{ds.root}"',
                  f"image_size = {ds.image_size}"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _metrics(records: list[dict]) -> dict[str, dict]:
    return {r["run_name"]: r["metrics"] for r in records}


def _assert_close(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for run in a:
        assert a[run].keys() == b[run].keys(), run
        for group in a[run]:
            for key, value in a[run][group].items():
                other = b[run][group][key]
                if value != value:  # NaN (undefined for the subset) on both sides
                    assert other != other, (run, group, key)
                else:
                    assert abs(value - other) <= tol, (run, group, key, value, other)


def _mlflow_runs(output: Path, kind: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/grid")
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`adbench.kind` = '{kind}'", max_results=1000
    )


@pytest.mark.slow
def test_ray_grid_matches_the_local_executor_and_computes_a_shared_fit_once(
    cluster, ad_root, tmp_path
):
    import torch

    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    # Ray gives each task cpus_per_job (1) threads; float sums depend on the thread count
    # (3e-8 in pixel AUROC with 2 threads), so the reference runs with 1 thread as well
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local, failed = run_benchmark(_grid(ad_root, local_out), track=False)
    finally:
        torch.set_num_threads(threads)
    assert not failed and len(local) == 6

    config = _write_toml(_grid(ad_root, ray_out), tmp_path / "grid.toml")
    args = ["--config", str(config), "--output", str(ray_out), "--executor", "ray",
            "--address", cluster]  # fmt: skip
    proc = _bench(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    store = ResultStore(ray_out, "grid")
    remote = store.records()
    _assert_close(_metrics(local), _metrics(remote))
    assert {r["fit_hash"] for r in remote} == {r["fit_hash"] for r in local}
    # both nodes worked, and each job names the process that ran it
    assert len({r["worker"]["pid"] for r in remote}) >= 2

    unified = {r["fit_hash"] for r in remote if r["fit_label"] == "unified"}
    assert len(unified) == 1 and len([r for r in remote if r["fit_label"] == "unified"]) == 2
    for out in (local_out, ray_out):  # the unified fit: one computation for its two jobs
        log = fit_log(ResultStore(out, "grid"))
        assert [e["hash"] for e in log].count(next(iter(unified))) == 1
        assert len(log) == 5  # 4 per-category fits + 1 unified
    assert "Ray dashboard" in proc.stderr

    # exactly once in MLflow, under the one parent run the driver opened
    jobs = _mlflow_runs(ray_out, "job")
    assert sorted(r.info.run_name for r in jobs) == sorted(r["run_name"] for r in remote)
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {
        r.info.run_id for r in _mlflow_runs(ray_out, "benchmark")
    }
    assert len(_mlflow_runs(ray_out, "benchmark")) == 1

    # resume: a re-run skips every finished job and starts no task
    again = _bench(args, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "6 job(s), 0 to run" in " ".join(again.stderr.split())
    assert len(fit_log(store)) == 5


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_retried_and_every_job_ends_exactly_once(
    cluster, ad_root, tmp_path
):
    out = tmp_path / "out"
    cfg = BenchConfig(
        name="grid",
        detectors=[DetectorEntry("autoencoder", params={"iterations": 60})],
        datasets=[DatasetEntry("mvtec_ad", root=str(ad_root), image_size=64)],
        batch_size=4,
    )
    config = _write_toml(cfg, tmp_path / "kill.toml")
    args = ["--config", str(config), "--output", str(out), "--executor", "ray", "--address",
            cluster, "--train-log-every", "5"]  # fmt: skip
    env = {**os.environ, **RAY_ENV}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [str(BIN / "bench"), "run", *args], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    running = out / "grid" / "running"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and driver.poll() is None:
        markers = sorted(running.glob("*.json")) if running.is_dir() else []
        if markers:
            time.sleep(1.0)  # into the job (data, training)
            try:
                marker = json.loads(markers[0].read_text())
            except (OSError, json.JSONDecodeError):
                continue
            os.kill(marker["pid"], signal.SIGKILL)
            killed = marker
        time.sleep(0.1)
    assert killed is not None, (tmp_path / "driver.log").read_text()[-4000:]
    assert driver.wait(600) == 0, (tmp_path / "driver.log").read_text()[-4000:]

    records = ResultStore(out, "grid").records()
    assert sorted(r["category"] for r in records) == ["washer", "weave"]
    retried = next(r for r in records if r["run_name"] == killed["run_name"])
    assert retried["worker"]["pid"] != killed["pid"]  # a new worker process ran it again
    assert not list((out / "grid" / "failed").glob("*"))
    assert not list(running.glob("*.json"))

    jobs = [r for r in _mlflow_runs(out, "job") if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in jobs) == sorted(r["run_name"] for r in records)
    assert len(_mlflow_runs(out, "job")) == 2  # no half-logged run of the killed attempt left
    fits = _mlflow_runs(out, "fit")
    assert sorted(r.data.tags["fit_hash"] for r in fits) == sorted(r["fit_hash"] for r in records)
    assert all(r.info.status == "FINISHED" for r in fits)


@pytest.mark.slow
def test_failing_jobs_are_recorded_failed_once_and_the_others_finish(cluster, ad_root, tmp_path):
    """A broken training image of weave: its per-category job fails by itself, and the shared
    unified fit fails, so both of its jobs are recorded failed with the fit's error; washer's
    per-category job finishes. Nothing is retried."""
    root = tmp_path / "data"
    shutil.copytree(ad_root, root)
    broken = sorted((root / "weave" / "train" / "good").iterdir())[0]
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    fast = {"weights": "random"}
    cfg = BenchConfig(
        name="grid",
        detectors=[
            DetectorEntry("feature_stats", params=fast),
            DetectorEntry("feature_stats", label="fs-unified", params=fast, scope="unified"),
        ],
        datasets=[DatasetEntry("mvtec_ad", root=str(root), image_size=64)],
    )
    config = _write_toml(cfg, tmp_path / "fail.toml")
    args = ["--config", str(config), "--output", str(out), "--executor", "ray", "--address",
            cluster, "--no-tracking"]  # fmt: skip
    proc = _bench(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-4000:]
    text = " ".join(proc.stderr.split())
    assert "3 job(s) failed:" in text
    assert text.count("its shared fit failed:") == 2
    assert broken.name in text  # the errors name the file
    failures = sorted(f.stem for f in (out / "grid" / "failed").glob("*.txt"))
    assert failures == [
        "feature_stats__mvtec_ad__weave__seed0",
        "fs-unified__mvtec_ad__washer__unified__seed0",
        "fs-unified__mvtec_ad__weave__unified__seed0",
    ]
    assert [r["run_name"] for r in ResultStore(out, "grid").records()] == [
        "feature_stats/mvtec_ad/washer/seed0"
    ]
    # not retried: one attempt in the failed job's console log; the shared fit's jobs never ran
    log = (out / "grid" / "logs" / "feature_stats__mvtec_ad__weave__seed0.log").read_text()
    assert log.count("started on") == 1
    assert not (out / "grid" / "logs" / "fs-unified__mvtec_ad__weave__unified__seed0.log").exists()


def test_ray_executor_options_are_checked(ray_env, ad_root, tmp_path):
    from bench.config import ConfigError, validate

    cfg = _grid(ad_root, tmp_path, executor="ray", gpus_per_job=-1)
    with pytest.raises(ConfigError, match="gpus_per_job = -1 is not valid; expected 0, a"):
        validate(cfg)
    cfg = _grid(ad_root, tmp_path, executor="rayon")
    with pytest.raises(ConfigError, match='executor = "rayon" is not valid; expected one of local'):
        validate(cfg)


def test_cli_executor_flags_reach_the_config(ad_root, tmp_path):
    from bench.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "run",
            "--executor",
            "ray",
            "--address",
            "10.0.0.5:6379",
            "--gpus-per-job",
            "0.25",
            "--cpus-per-job",
            "2",
            "--max-retries",
            "5",
        ]  # fmt: skip
    )
    cfg = config_from_args(args)
    assert (cfg.executor, cfg.ray_address, cfg.gpus_per_job, cfg.cpus_per_job, cfg.max_retries) == (
        "ray", "10.0.0.5:6379", 0.25, 2.0, 5
    )  # fmt: skip


def test_cluster_view_counts_jobs_and_shows_each_worker_and_device(tmp_path, capsys):
    from rich.console import Console

    from bench.executors.view import ClusterView
    from bench.results import write_json

    running = tmp_path / "running"
    now = time.time()
    write_json(running / "a.json", {"run_name": "knn/x/a/seed0", "host": "gpu1", "pid": 11,
                                    "device": "NVIDIA H100", "gpus": ["0"], "started": now - 30})  # fmt: skip
    write_json(running / "b.json", {"run_name": "knn/x/b/seed0", "host": "gpu2", "pid": 12,
                                    "device": "NVIDIA H100", "gpus": ["1"], "started": now - 5})  # fmt: skip
    (running / "c.json").write_text("{half written")  # skipped, not fatal
    view = ClusterView(total=6, skipped=1, running_dir=running)
    with view:
        view.refresh()
        view.finished("knn/x/z/seed0", {"record": {}, "worker": {"host": "gpu1", "pid": 11,
                                                                 "gpus": ["0"]}})  # fmt: skip
        view.finished("knn/x/y/seed0", {"error": "boom", "worker": None})
    err = " ".join(capsys.readouterr().err.split())
    assert "knn/x/a/seed0: running on gpu1 GPU 0 (NVIDIA H100)" in err
    text = Console(record=True, width=200)
    text.print(view.render())
    shown = text.export_text()
    assert "2/6 done (1 before), 2 running, 1 failed, 1 queued" in shown
    assert "gpu1 GPU 0" in shown and "gpu2 GPU 1" in shown and "30 s" in shown
    row = next(line for line in shown.splitlines() if "gpu1 GPU 0" in line)
    assert row.split("│")[-2].strip() == "1"  # the one job that worker finished


def test_job_requests_follow_the_cluster_and_impossible_ones_are_refused(ad_root, tmp_path):
    from bench.config import ConfigError
    from bench.executors.ray_executor import check_device, request

    gpu_nodes = [{"Resources": {"CPU": 16.0, "GPU": 4.0}}, {"Resources": {"CPU": 8.0, "GPU": 2.0}}]
    cpu_nodes = [{"Resources": {"CPU": 2.0}}]
    cfg = _grid(ad_root, tmp_path, executor="ray")
    assert request(cfg, gpu_nodes) == (1.0, 1.0)  # a GPU each by default where there are GPUs
    assert request(cfg, cpu_nodes) == (0.0, 1.0)
    cfg.gpus_per_job = 0.25
    assert request(cfg, gpu_nodes) == (0.25, 1.0)
    cfg.device = "cpu"
    assert request(cfg, gpu_nodes) == (0.0, 1.0)
    for field, value, message in (
        ("gpus_per_job", 1.5, "a fraction must be at most 1"),
        ("gpus_per_job", 6, "largest node of the Ray cluster has 4"),
        ("cpus_per_job", 32, "largest node of the Ray cluster has 16"),
    ):
        bad = _grid(ad_root, tmp_path, executor="ray", **{field: value})
        with pytest.raises(ConfigError, match=message):
            request(bad, gpu_nodes)
    with pytest.raises(ConfigError, match="needs GPUs per job"):
        request(_grid(ad_root, tmp_path, executor="ray", device="cuda"), cpu_nodes)
    with pytest.raises(ConfigError, match="Ray gives each job its GPU"):
        check_device(_grid(ad_root, tmp_path, executor="ray", device="cuda:1"))


@pytest.mark.slow
def test_force_reruns_every_job_and_refits_once_per_fit(cluster, ad_root, tmp_path):
    out = tmp_path / "out"
    cfg = BenchConfig(
        name="grid",
        detectors=[DetectorEntry("feature_stats", params={"weights": "random"})],
        datasets=[DatasetEntry("mvtec_ad", root=str(ad_root), image_size=64)],
    )
    config = _write_toml(cfg, tmp_path / "force.toml")
    args = ["--config", str(config), "--output", str(out), "--executor", "ray", "--address",
            cluster, "--no-tracking"]  # fmt: skip
    assert _bench(args, tmp_path).returncode == 0
    store = ResultStore(out, "grid")
    first = {r["run_name"]: r["ray_run"] for r in store.records()}
    # the driver holds the results folder too: started while another process holds it, it
    # waits, touching nothing, and goes on when that process lets go
    with open(store.root / LOCK_FILE, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        log = tmp_path / "forced.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([str(BIN / "bench"), "run", *args, "--force"], cwd=tmp_path,
                                    env={**os.environ, **RAY_ENV}, stderr=err, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while "Waiting for it to finish" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert {r["run_name"]: r["ray_run"] for r in store.records()} == first
    proc.wait(timeout=600)
    forced = SimpleNamespace(returncode=proc.returncode, stderr=log.read_text())
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "to run" not in forced.stderr.split("Waiting for it to finish")[0]  # it waited first
    assert "2 job(s), 2 to run" in " ".join(forced.stderr.split())
    second = {r["run_name"]: r["ray_run"] for r in store.records()}
    assert first.keys() == second.keys() and len(set(first.values()) | set(second.values())) == 2
    hashes = [e["hash"] for e in fit_log(store)]
    assert len(hashes) == 4 and all(hashes.count(h) == 2 for h in hashes)


# -- a Ray address where no Ray answers (issue 29, 0b) ------------------------------------------
def _run_cli(args: list[str], capsys) -> tuple[int, str, float]:
    """``bench run`` in this process: (exit code, stderr, seconds, imports excluded)."""
    import bench.executors.ray_executor  # noqa: F401
    from bench.cli import main

    started = time.monotonic()
    code = main(["run", *args])
    return code, capsys.readouterr().err, time.monotonic() - started


@pytest.mark.slow
def test_an_address_where_no_ray_answers_fails_in_seconds_before_any_job(
    ray_env, ad_root, tmp_path, capsys
):
    import http.server
    import threading

    closed = _free_port()  # bound, then closed: nothing listens there
    silent = socket.socket()  # a TCP server that accepts and never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    hint = "start the head with `ray start --head` or drop --address (ray_address) to run a local instance"  # fmt: skip
    not_ray = "answers but is not a Ray head (its GCS port: `ray start --head --port`, 6379 by default): no gRPC handshake in 3 s; check the address and port"  # fmt: skip
    cases = [
        (f"127.0.0.1:{closed}", f"Ray: nothing answers at 127.0.0.1:{closed} (connection refused); {hint}"),
        (f"ray://127.0.0.1:{closed}", f"Ray: nothing answers at 127.0.0.1:{closed} (connection refused); {hint}"),
        (f"127.0.0.1:{silent.getsockname()[1]}", f"Ray: 127.0.0.1:{silent.getsockname()[1]} {not_ray}"),
        (f"127.0.0.1:{web.server_address[1]}", f"Ray: 127.0.0.1:{web.server_address[1]} {not_ray}"),
    ]  # fmt: skip
    out = tmp_path / "out"
    try:
        for address, message in cases:
            args = ["--detectors", "feature_stats", "--datasets", "mvtec_ad", "--root",
                    str(ad_root), "--image-size", "64", "--name", "grid", "--output", str(out),
                    "--executor", "ray", "--address", address]  # fmt: skip
            code, err, seconds = _run_cli(args, capsys)
            assert code == 2, err
            assert err.strip().splitlines()[-1] == f"bench: error: {message}", err
            assert seconds < 10, (address, seconds)  # Ray alone retries for over five minutes
            assert not out.exists()  # before any job, and before the results folder
    finally:
        silent.close()
        web.shutdown()
        web.server_close()


def test_ray_addresses_are_parsed_and_auto_keeps_rays_meaning():
    from bench.errors import ConfigError
    from bench.executors.ray_address import probe_ray_address, split_address

    assert split_address("head:6380") == ("head", 6380, False)
    assert split_address("head") == ("head", 6379, False)
    assert split_address("ray://head") == ("head", 10001, True)
    assert split_address("[::1]:7000") == ("::1", 7000, False)
    for address in (None, "auto", "local"):
        probe_ray_address(address)  # Ray's own meaning: nothing to check here
    for bad in ("head:port", "head:70000", ":6379", "head:6379/x"):
        with pytest.raises(ConfigError, match="is not an address: expected HOST:PORT"):
            probe_ray_address(bad)
