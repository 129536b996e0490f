"""What runs inside a Ray task: one job, or one fit stage that several jobs share, through the
same functions as the local executor (:mod:`bench.job`). The driver is
:mod:`bench.executors.ray_executor`."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench.job.fitting import build_detector, fit_or_load
from bench.job.run import JobOptions, run_job, short_error
from bench.job.summary import write_error
from bench.plan import Fit, Job
from bench.progress import console
from bench.results import ResultStore, write_json
from bench.system import device_description, seed_everything
from bench.tracking import Tracker, ensure_logged

#: written by the driver into the results folder; a task that cannot read it is on a node
#: that does not share the folder
SHARE_MARKER = ".ray-driver"


#: the names of the tasks (in the Ray dashboard, and in the traceback of a failed one)
FIT_TASK, JOB_TASK = "adbench-fit", "adbench-job"


#: one file per job a task is running (worker, device, start): the driver's progress view
RUNNING = "running"


#: a job task's console output (warnings, fit messages), one file per job
LOGS = "logs"


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
    bootstrap: int = 1000
    bootstrap_seed: int = 0


def worker_info(device: torch.device) -> dict[str, Any]:
    """Which process on which node runs a task, and on what device."""
    import ray

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
    worker: dict[str, Any] | None = None
    store = ResultStore(ctx.output, ctx.name)
    try:
        store, device = enter(ctx)
        worker = worker_info(device)
        return {"run_name": job.run_name, "record": run_task_job(ctx, job, store, device, worker),
                "worker": worker}  # fmt: skip
    except Exception as err:
        unwritable = write_error(err)  # a folder made read-only, a full disk: named at the end
        if unwritable is not None:
            store.note_unwritable(unwritable)
        path = store.save_failure(job, err)
        return {"run_name": job.run_name, "error": short_error(err),
                "traceback": str(path) if path else "the worker's log", "worker": worker,
                "unsaved": unwritable is not None, "unwritable": store.unwritable}  # fmt: skip


def run_task_job(
    ctx: TaskContext, job: Job, store: ResultStore, device: torch.device, worker: dict
) -> dict[str, Any]:
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
                record = run_job(job, store, device, job_options(ctx, tracker))
            record["ray_run"] = ctx.token
            store.save(record)
        finally:
            marker.unlink(missing_ok=True)
    ensure_logged(tracker, store, record)
    return record


def job_options(ctx: TaskContext, tracker) -> JobOptions:
    logger_for = None if tracker is None else tracker.fit_logger
    return JobOptions(
        ctx.num_workers,
        ctx.export_maps,
        ctx.train_log_every,
        logger_for,
        ctx.bootstrap,
        ctx.bootstrap_seed,
    )


def fit_task(ctx: TaskContext, fit: Fit, *needed: Any) -> dict[str, Any]:
    """One fit stage that several jobs share: computed once (or loaded when a retried task
    finds it saved) and saved in its state folder, where the job tasks load it."""
    store, device = enter(ctx)
    seed_everything(fit.seed)
    options = job_options(ctx, attach_tracker(ctx))
    detector = build_detector(fit, device, options.log_every)
    worker = worker_info(device)
    marker = store.root / RUNNING / f"fit-{fit.hash}.json"
    write_json(marker, {"run_name": f"fit {fit.name}", "kind": "fit", "started": time.time(),
                        **worker})  # fmt: skip
    try:
        with task_console(store, f"fit-{fit.hash}"):
            console.print(f"fit {fit.name}: started on {where(worker)}", soft_wrap=True)
            result = fit_or_load(
                detector, fit, store, device, options.num_workers, options.logger_for
            )
            for warning in result.warnings:
                console.print(f"[yellow]  {escape(warning)}[/]")
    finally:
        marker.unlink(missing_ok=True)
    return {"fit": fit.name, "computed": result.computed, "seconds": result.seconds,
            "worker": worker}  # fmt: skip


def where(worker: dict[str, Any] | None) -> str:
    if not worker:
        return "?"
    gpus = f" GPU {','.join(worker['gpus'])}" if worker.get("gpus") else ""
    return f"{worker.get('host', '?')} pid {worker.get('pid', '?')} ({worker.get('device', '?')}{gpus})"
