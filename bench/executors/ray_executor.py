"""Runs a benchmark's jobs as Ray tasks, on this machine or across a cluster.

Each pending job is one task. A fit stage that two or more pending jobs need (a unified fit,
the first stage of a two-stage detector) is a task of its own that runs once; the job tasks
that need it wait for it (Ray passes its result as an argument) and load its saved state.
Tasks write into the same results folder as the local executor, so resume is the same: a
re-run skips finished jobs. That folder, and the driver's working directory (relative dataset
roots), must be at the same path on every node: a shared filesystem (checked by each task).

Retries: a task whose worker process or node is lost is retried up to ``max_retries`` times
(Ray's ``max_retries``). A job that raises is recorded as failed (its traceback under
``failed/``) and is not retried (``retry_exceptions=False``); the jobs of a failed shared fit
are recorded as failed with its error.

Tracking: the driver opens the benchmark's parent run; each task logs its job run (and a
trained fit's curve) under it. A retried task finds the run of its job by config hash
(:meth:`bench.tracking.Tracker.log_job`: exactly once, half-logged runs replaced); a run a task
could not log (e.g. the SQLite store was locked) is logged by the driver.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench.config import BenchConfig, ConfigError
from bench.plan import Fit, Job, plan_jobs
from bench.progress import console
from bench.results import ResultStore, write_json

#: written by the driver into the results folder; a task that cannot read it is on a node
#: that does not share the folder
SHARE_MARKER = ".ray-driver"
#: the names of the tasks (in the Ray dashboard, and in the traceback of a failed one)
FIT_TASK, JOB_TASK = "adbench-fit", "adbench-job"
#: one file per job a task is running (worker, device, start): the driver's progress view
RUNNING = "running"
#: a job task's console output (warnings, fit messages), one file per job
LOGS = "logs"
#: environment variables passed to every task (where data, weights and tracking live)
PASSED_ENV = ("ADBENCH_", "MLFLOW_", "MVTEC_", "VISA_", "REAL3D_", "ANOMALY_SHAPENET_", "TORCH_HOME", "HF_")  # fmt: skip


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "executor 'ray' needs Ray: pip install 'adbench[ray]' (or pip install 'ray[default]')"
        ) from err
    return ray


@dataclass(frozen=True)
class TaskContext:
    """What every task needs from the driver (sent once per task, small)."""

    output: str  # absolute
    name: str
    cwd: str
    device: str  # "cpu" or "cuda" (the GPU Ray assigns)
    num_workers: int
    export_maps: str | None
    train_log_every: int
    #: this run's id: the share check, and under --force what makes a record this run's own
    token: str
    force: bool
    #: (tracking URI, experiment id, parent run id); None: no tracking
    tracking: tuple[str, str, str] | None


# -- inside a task -------------------------------------------------------------------------------
def worker_info(device: torch.device) -> dict[str, Any]:
    """Which process on which node runs a task, and on what device."""
    import ray

    from bench.system import device_description

    context = ray.get_runtime_context()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node": context.get_node_id(),
        "device": device_description(device),
        "gpus": [str(g) for g in ray.get_gpu_ids()],
    }


def enter(ctx: TaskContext) -> tuple[ResultStore, torch.device]:
    """Checks that this node sees the driver's folders; the store and this task's device."""
    import ray

    host = socket.gethostname()
    try:
        os.chdir(ctx.cwd)
    except OSError as err:
        raise RuntimeError(
            f"node {host}: the driver's working directory {ctx.cwd} is not here ({err.strerror}); "
            "the Ray executor needs the results folder and relative dataset roots on a "
            "filesystem every node shares at the same path"
        ) from None
    store = ResultStore(ctx.output, ctx.name)
    marker = share_marker(store, ctx.token)
    if not marker.is_file():
        raise RuntimeError(
            f"node {host}: the results folder {store.root} is not the driver's (no {marker.name} "
            "written by this run); the Ray executor needs it on a filesystem every node shares "
            "at the same path"
        )
    if ctx.device != "cuda":
        return store, torch.device("cpu")
    if not (ray.get_gpu_ids() and torch.cuda.is_available()):
        raise RuntimeError(
            f"node {host}: Ray assigned GPU(s) {ray.get_gpu_ids()} but torch "
            f"{torch.__version__} sees no CUDA GPU here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return store, torch.device("cuda")


def share_marker(store: ResultStore, token: str) -> Path:
    """The file this run's driver writes into the results folder: a task that cannot read it
    is on a node that does not share the folder. One per run, so runs do not disturb
    each other."""
    return store.root / f"{SHARE_MARKER}-{token}"


def attach_tracker(ctx: TaskContext):
    if ctx.tracking is None:
        return None
    from bench.tracking import Tracker

    return Tracker.attach(*ctx.tracking)


@contextmanager
def task_console(store: ResultStore, slug: str):
    """The task's console output goes to ``logs/<slug>.log`` (the driver shows the live view)."""
    path = store.root / LOGS / f"{slug}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = console.file
    with open(path, "a", encoding="utf-8") as log:
        console.file = log
        try:
            yield path
        finally:
            console.file = before


def job_task(ctx: TaskContext, job: Job, *needed: Any) -> dict[str, Any]:
    """One job: skips it when a finished record exists (a retry after the record was saved),
    else runs it; logs its MLflow run. Every error of its own is returned as the job's
    failure (traceback under ``failed/``), never raised: Ray retries lost workers only."""
    from bench.runner import short_error

    worker: dict[str, Any] | None = None
    store = ResultStore(ctx.output, ctx.name)
    try:
        store, device = enter(ctx)
        worker = worker_info(device)
        return {"run_name": job.run_name, "record": run_task_job(ctx, job, store, device, worker),
                "worker": worker}  # fmt: skip
    except Exception as err:
        try:
            path = str(store.save_failure(job, err))
        except OSError as unwritable:
            path = f"not written: {unwritable}"
        return {"run_name": job.run_name, "error": short_error(err), "traceback": path,
                "worker": worker}  # fmt: skip


def run_task_job(
    ctx: TaskContext, job: Job, store: ResultStore, device: torch.device, worker: dict
) -> dict[str, Any]:
    from bench.runner import run_job

    record = store.load(job)
    if record is not None and ctx.force and record.get("ray_run") != ctx.token:
        record = None  # --force: computed again, unless this run (an earlier attempt) did
    tracker = attach_tracker(ctx)
    if record is None:
        marker = store.root / RUNNING / f"{job.slug}.json"
        write_json(marker, {"run_name": job.run_name, "kind": "job", "started": time.time(),
                            **worker})  # fmt: skip
        try:
            with task_console(store, job.slug):
                console.print(f"{job.run_name}: started on {where(worker)}", soft_wrap=True)
                record = run_job(
                    job,
                    store,
                    device,
                    ctx.num_workers,
                    ctx.export_maps,
                    logger_for=None if tracker is None else tracker.fit_logger,
                    log_every=ctx.train_log_every,
                )
            record["ray_run"] = ctx.token
            store.save(record)
        finally:
            marker.unlink(missing_ok=True)
    if tracker is not None and not record.get("mlflow_run_id"):
        run_id = tracker.log_job(record)
        if run_id:
            record["mlflow_run_id"] = run_id
            store.save(record)
    return record


def fit_task(ctx: TaskContext, fit: Fit, *needed: Any) -> dict[str, Any]:
    """One fit stage that several jobs share: computed once (or loaded when a retried task
    finds it saved) and saved in its state folder, where the job tasks load it."""
    from bench.registry import create_detector
    from bench.runner import fit_or_load
    from bench.system import seed_everything
    from bench.training import TrainableDetector

    store, device = enter(ctx)
    seed_everything(fit.seed)
    tracker = attach_tracker(ctx)
    detector = create_detector(fit.detector.name, **fit.params)
    detector.to(device)
    if isinstance(detector, TrainableDetector):
        detector.log_every = ctx.train_log_every
    logger_for = None if tracker is None else tracker.fit_logger
    worker = worker_info(device)
    marker = store.root / RUNNING / f"fit-{fit.hash}.json"
    write_json(marker, {"run_name": f"fit {fit.name}", "kind": "fit", "started": time.time(),
                        **worker})  # fmt: skip
    try:
        with task_console(store, f"fit-{fit.hash}"):
            console.print(f"fit {fit.name}: started on {where(worker)}", soft_wrap=True)
            result = fit_or_load(detector, fit, store, device, ctx.num_workers, logger_for)
            for warning in result.warnings:
                console.print(f"[yellow]  {escape(warning)}[/]")
    finally:
        marker.unlink(missing_ok=True)
    return {"fit": fit.name, "computed": result.computed, "seconds": result.seconds,
            "worker": worker}  # fmt: skip


# -- on the driver -------------------------------------------------------------------------------
def shared_stages(jobs: list[Job], store: ResultStore) -> dict[str, Fit]:
    """The fit stages (by state folder) that two or more of ``jobs`` need and whose state is
    not saved yet: each becomes one fit task."""
    from bench.runner import FITTED_STATE, fit_chain

    uses: Counter[str] = Counter()
    stages: dict[str, Fit] = {}
    for job in jobs:
        for stage in fit_chain(job.fit):
            key = str(store.fit_dir(stage))
            uses[key] += 1
            stages[key] = stage
    return {
        key: stage
        for key, stage in stages.items()
        if uses[key] > 1 and not (store.fit_dir(stage) / FITTED_STATE).is_file()
    }


def nearest_shared(fit: Fit | None, shared: dict[str, Any], store: ResultStore) -> Any:
    """The task of the first stage of ``fit``'s chain that has one (None when none has)."""
    while fit is not None:
        task = shared.get(str(store.fit_dir(fit)))
        if task is not None:
            return task
        fit = fit.parent
    return None


def connect(cfg: BenchConfig):
    """Joins ``cfg.ray_address``, or starts a local Ray instance; (Ray's context, whether this
    call connected). A process already connected (``ray.init`` by the caller) keeps its
    connection, which the run then leaves open."""
    ray = import_ray()
    if ray.is_initialized():
        return ray.get_runtime_context(), False
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
    env.pop("ADBENCH_PROGRESS", None)
    kwargs: dict[str, Any] = {"log_to_driver": False, "runtime_env": {"env_vars": env}}
    if cfg.ray_address is None:  # a new instance, even beside a cluster `ray start`ed here
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        return ray.init(address=cfg.ray_address or "local", **kwargs), True
    except (ConnectionError, TimeoutError, ValueError) as err:
        where_ = cfg.ray_address or "a local instance"
        raise ConfigError(f"cannot start or join the Ray cluster ({where_}): {err}") from err


def check_device(cfg: BenchConfig) -> None:
    """Ray assigns the GPUs: a job's device is "cuda" (the GPU it got) or "cpu"."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"device {cfg.device!r} with the Ray executor: Ray gives each job its GPU(s), so the "
            "device is auto, cuda or cpu (choose GPUs with CUDA_VISIBLE_DEVICES on each node, "
            "or ray start --num-gpus)"
        )


def request(cfg: BenchConfig, nodes: list[dict]) -> tuple[float, float]:
    """(GPUs, CPUs) each job asks for: the config's, GPUs defaulting to 1 on a cluster with
    GPUs (0 on CPU). Refused when no single node could ever run a job."""
    largest = {key: max((n.get("Resources", {}).get(key, 0.0) for n in nodes), default=0.0)
               for key in ("GPU", "CPU")}  # fmt: skip
    if cfg.device == "cpu":
        gpus = 0.0
    elif cfg.gpus_per_job is not None:
        gpus = float(cfg.gpus_per_job)
    else:
        gpus = 1.0 if largest["GPU"] > 0 else 0.0
    cpus = float(cfg.cpus_per_job)
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError(
            f"device 'cuda' with the Ray executor needs GPUs per job: the largest node has "
            f"{largest['GPU']:g}; set gpus_per_job (--gpus-per-job) > 0 or use device auto"
        )
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"gpus_per_job {gpus:g}: a fraction must be at most 1 (Ray's rule)")
    if gpus == 0 and cpus == 0:
        raise ConfigError("cpus_per_job 0 with no GPU per job would start every job at once")
    for key, wanted in (("GPU", gpus), ("CPU", cpus)):
        if wanted > largest[key]:
            raise ConfigError(
                f"each job asks for {wanted:g} {key}(s), but the largest node of the Ray cluster "
                f"has {largest[key]:g}: no job could start"
            )
    return gpus, cpus


def run_on_ray(cfg: BenchConfig, force: bool = False, track: bool = True):
    """Runs every planned job not already finished as Ray tasks; (records, failed run names)."""
    from bench.executors.view import ClusterView
    from bench.runner import check_writable, report_job
    from bench.tracking import Tracker

    ray = import_ray()
    check_device(cfg)
    jobs = plan_jobs(cfg)
    output = Path(cfg.output).resolve()
    store = ResultStore(output, cfg.name)
    folders = [store.root / sub for sub in ("jobs", "state", "figures", "failed", RUNNING)]
    export = str(Path(cfg.export_maps).resolve()) if cfg.export_maps else None
    check_writable(*folders, *([Path(export)] if export else []))
    done = {} if force else {j.run_name: store.load(j) for j in jobs}
    pending = [j for j in jobs if done.get(j.run_name) is None]
    token = uuid.uuid4().hex
    context, connected = connect(cfg)
    marker = share_marker(store, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpus, cpus = request(cfg, nodes)
        if force:
            clear_for_force(store, pending)
        for stale in (store.root / RUNNING).glob("*.json"):
            stale.unlink(missing_ok=True)  # left by a driver or workers killed earlier
        marker.write_text(token)
        announce(cfg, jobs, pending, ray.cluster_resources(), nodes, gpus, cpus)
        if connected:  # a caller's own ray.init shows its dashboard itself
            url = getattr(context, "dashboard_url", None)
            console.print(f"Ray dashboard: http://{url}" if url else
                          "Ray dashboard: not running (pip install 'ray\\[default]' on the head node)")  # fmt: skip
        tracker = Tracker.from_config(cfg) if track else None
        with tracker if tracker is not None else nullcontext():
            warn_sqlite_across_machines(tracker, nodes)
            tracking = None
            if tracker is not None and not tracker.failed and tracker.parent_id:
                tracking = (tracker.uri, tracker.experiment_id, tracker.parent_id)
            ctx = TaskContext(
                str(output), cfg.name, os.getcwd(), "cpu" if gpus == 0 else "cuda",
                cfg.num_workers, export, cfg.train_log_every, token, force, tracking,
            )  # fmt: skip
            options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": cfg.max_retries,
                       "retry_exceptions": False}  # fmt: skip
            refs, fits = submit(ray, ctx, pending, store, options)
            view = ClusterView(len(jobs), len(jobs) - len(pending), store.root / RUNNING)
            records = [r for r in done.values() if r is not None]
            for record in records:
                track_record(tracker, store, record)
            try:
                failed = collect(ray, refs, ctx, store, tracker, view, records, report_job)
            except KeyboardInterrupt:
                for ref in [*refs, *fits]:
                    ray.cancel(ref, force=True)
                raise
            if tracker is not None:
                tracker.log_summary(records)
    finally:
        if connected:
            ray.shutdown()
        marker.unlink(missing_ok=True)
        for stale in (store.root / RUNNING).glob("*.json"):
            stale.unlink(missing_ok=True)  # left by killed workers
    return records, failed


def clear_for_force(store: ResultStore, pending: list[Job]) -> None:
    """As the local ``--force``: every fit stage and kept prediction of the jobs, anew."""
    from bench.runner import clear_fitted_state, fit_chain, pending_path

    for stage_dir in {str(store.fit_dir(f)) for j in pending for f in fit_chain(j.fit)}:
        clear_fitted_state(Path(stage_dir))
    for job in pending:
        pending_path(store, job).unlink(missing_ok=True)


def announce(cfg, jobs, pending, cluster: dict, nodes: list, gpus: float, cpus: float) -> None:
    console.print(
        f"[bold]{cfg.name}[/]: {len(jobs)} job(s), {len(pending)} to run, on a Ray cluster of "
        f"{len(nodes)} node(s) ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} "
        f"GPUs); each job asks for {cpus:g} CPU(s), {gpus:g} GPU(s)",
        soft_wrap=True,
    )


def submit(ray, ctx: TaskContext, pending: list[Job], store: ResultStore, options: dict):
    """A fit task per shared stage (parents first), then a task per job; ({ref: job}, the fit
    task refs). A GPU task's worker process serves that one task (``max_calls=1``): CUDA
    cannot move to the next task's GPU in a process that used another."""
    max_calls = 1 if options["num_gpus"] > 0 else 0
    fit_remote = ray.remote(max_calls=max_calls)(fit_task).options(name=FIT_TASK, **options)
    job_remote = ray.remote(max_calls=max_calls)(job_task).options(name=JOB_TASK, **options)
    shared = shared_stages(pending, store)
    tasks: dict[str, Any] = {}

    def fit_ref(stage: Fit):
        key = str(store.fit_dir(stage))
        if key not in tasks:
            before = nearest_shared(stage.parent, shared, store)
            parent = None if before is None else fit_ref(before)
            tasks[key] = fit_remote.remote(ctx, stage, *([] if parent is None else [parent]))
        return tasks[key]

    refs = {}
    for job in pending:
        stage = nearest_shared(job.fit, shared, store)
        needed = [] if stage is None else [fit_ref(stage)]
        refs[job_remote.remote(ctx, job, *needed)] = job
    return refs, list(tasks.values())


def collect(ray, refs: dict, ctx, store: ResultStore, tracker, view, records: list, report):
    """Waits for every job task, showing progress; records and tracks each result once.
    Returns the run names of the failed jobs."""
    failed: list[str] = []
    with view:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            view.refresh()
            for ref in ready:
                job = refs.pop(ref)
                out = outcome(ray, ref, job, ctx, store)
                (store.root / RUNNING / f"{job.slug}.json").unlink(missing_ok=True)
                view.finished(job.run_name, out)
                if "record" not in out:
                    console.print(
                        f"[red]{escape(job.run_name)} failed: {escape(out['error'])}[/] "
                        f"(traceback in {out['traceback']})",
                        soft_wrap=True,
                    )
                    failed.append(job.run_name)
                    continue
                record = out["record"]
                console.print(f"{escape(job.run_name)} on {where(out['worker'])}:")
                report(record)
                track_record(tracker, store, record)
                records.append(record)
    return failed


def outcome(ray, ref, job: Job, ctx: TaskContext, store: ResultStore) -> dict[str, Any]:
    """A job task's result. When the task ended in an error (its worker lost past the retries,
    or the shared fit it waited for failed): the job's record if an attempt saved it before,
    else its failure, recorded under ``failed/`` here since no task could."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        record = store.load(job)
        if record is not None and (not ctx.force or record.get("ray_run") == ctx.token):
            return {"run_name": job.run_name, "record": record, "worker": record.get("worker")}
        from bench.runner import short_error

        cause = getattr(err, "cause", None)
        from_fit = f"ray::{FIT_TASK}" in str(err)  # the remote traceback names the task
        if isinstance(err, ray.exceptions.RayTaskError) and from_fit and cause is not None:
            text = f"its shared fit failed: {short_error(cause)}"
        else:
            text = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        path = store.failure_path(job.run_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(err))  # with the remote traceback
        return {"run_name": job.run_name, "error": text, "traceback": str(path), "worker": None}


def track_record(tracker, store: ResultStore, record: dict[str, Any]) -> None:
    """Logs a record that has no MLflow run yet (its task could not, or it finished before)."""
    if tracker is None or record.get("mlflow_run_id"):
        return
    run_id = tracker.log_job(record)
    if run_id:
        record["mlflow_run_id"] = run_id
        store.save(record)


def where(worker: dict[str, Any] | None) -> str:
    if not worker:
        return "?"
    gpus = f" GPU {','.join(worker['gpus'])}" if worker.get("gpus") else ""
    return f"{worker.get('host', '?')} pid {worker.get('pid', '?')} ({worker.get('device', '?')}{gpus})"


def warn_sqlite_across_machines(tracker, nodes: list[dict]) -> None:
    """SQLite takes writers from one machine only: a cluster of several machines needs a
    tracking server."""
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    if tracker is not None and tracker.uri.startswith("sqlite:") and len(hosts) > 1:
        console.print(
            f"[yellow]MLflow: {len(hosts)} machines would write to the SQLite store "
            f"{escape(tracker.uri)}; SQLite is not safe on a shared filesystem. Start `make "
            "server` on one machine and set MLFLOW_TRACKING_URI=http://HOST:5000 on the driver.[/]",
            soft_wrap=True,
        )
