"""Runs a benchmark's jobs as Ray tasks, on this machine or across a cluster.

Each pending job is one task. A fit stage that two or more pending jobs need (a unified fit,
the first stage of a two-stage detector) is a task of its own that runs once; the job tasks
that need it wait for it (Ray passes its result as an argument) and load its saved state.
Tasks write into the same results folder as the local executor, so resume is the same: a
re-run skips finished jobs. That folder, and the driver's working directory (relative dataset
roots), must be at the same path on every node: a shared filesystem (checked by each task).
The driver holds the results folder while it runs (:mod:`bench.run_lock`: a second run waits),
and checks a cluster address in seconds before joining it (:mod:`.ray_address`).

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
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.markup import escape

from bench.config import BenchConfig
from bench.errors import ConfigError
from bench.executors import still_to_track
from bench.executors.ray_address import bounded_join_waits, probe_ray_address
from bench.executors.ray_tasks import (
    FIT_TASK,
    JOB_TASK,
    RUNNING,
    TaskContext,
    fit_task,
    job_task,
    share_marker,
    where,
)
from bench.executors.view import ClusterView
from bench.job.fitting import FITTED_STATE, fit_chain
from bench.job.run import clear_for_force, short_error
from bench.job.summary import Failures, report_job
from bench.plan import Fit, Job, plan_jobs
from bench.progress import console
from bench.results import ResultStore
from bench.run_lock import run_lock
from bench.tracking import Tracker, ensure_logged

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


# -- on the driver -------------------------------------------------------------------------------
def shared_stages(jobs: list[Job], store: ResultStore) -> dict[str, Fit]:
    """The fit stages (by state folder) that two or more of ``jobs`` need and whose state is
    not saved yet: each becomes one fit task."""
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
    connection, which the run then leaves open. Ray's waits to join are bounded
    (:func:`bounded_join_waits`)."""
    with bounded_join_waits(cfg.ray_address):
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
    check_device(cfg)
    probe_ray_address(cfg.ray_address)  # seconds, where Ray itself would retry for minutes
    with bounded_join_waits(cfg.ray_address):
        import_ray()  # fails here without Ray; Ray reads some of its waits when first imported
    jobs = plan_jobs(cfg)
    store = ResultStore(Path(cfg.output).resolve(), cfg.name)
    export = str(Path(cfg.export_maps).resolve()) if cfg.export_maps else None
    store.check_writable(store.root / RUNNING, *([Path(export)] if export else []))
    with run_lock(store.root):  # before reading what is done and opening MLflow
        return run_jobs(cfg, jobs, store, export, force, track)


def run_jobs(
    cfg: BenchConfig,
    jobs: list[Job],
    store: ResultStore,
    export: str | None,
    force: bool,
    track: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`run_on_ray`'s jobs, while it holds the benchmark folder."""
    output = Path(cfg.output).resolve()
    done = {} if force else {j.run_name: store.load(j) for j in jobs}
    pending = [j for j in jobs if done.get(j.run_name) is None]
    token = uuid.uuid4().hex
    context, connected = connect(cfg)
    ray = import_ray()
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
        tracker = Tracker.from_config(cfg) if still_to_track(track, done) else None
        with tracker if tracker is not None else nullcontext():
            warn_sqlite_across_machines(tracker, nodes)
            tracking = None
            if tracker is not None and not tracker.failed and tracker.parent_id:
                tracking = (tracker.uri, tracker.experiment_id, tracker.parent_id)
            ctx = TaskContext(
                str(output), cfg.name, os.getcwd(), "cpu" if gpus == 0 else "cuda",
                cfg.num_workers, export, cfg.train_log_every, token, force, tracking,
                cfg.bootstrap, cfg.bootstrap_seed,
            )  # fmt: skip
            options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": cfg.max_retries,
                       "retry_exceptions": False}  # fmt: skip
            refs, fits = submit(ray, ctx, pending, store, options)
            view = ClusterView(len(jobs), len(jobs) - len(pending), store.root / RUNNING)
            records = [r for r in done.values() if r is not None]
            for record in records:
                ensure_logged(tracker, store, record)
            try:
                failed = collect(ray, refs, ctx, store, tracker, view, records)
            except KeyboardInterrupt:
                for ref in [*refs, *fits]:
                    ray.cancel(ref, force=True)
                raise
            if tracker is not None:
                tracker.log_summary(records, failed)
    finally:
        if connected:
            ray.shutdown()
        marker.unlink(missing_ok=True)
        for stale in (store.root / RUNNING).glob("*.json"):
            stale.unlink(missing_ok=True)  # left by killed workers
    return records, failed


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


def collect(ray, refs: dict, ctx, store: ResultStore, tracker, view, records: list):
    """Waits for every job task, showing progress; records and tracks each result once, and
    says at the end which folders the workers could not write. Returns the run names of the
    failed jobs."""
    failed: list[str] = []
    failures = Failures(store)
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
                    store.unwritable.update(out.get("unwritable") or {})
                    failures.unsaved += bool(out.get("unsaved"))
                    console.print(
                        f"[red]{escape(job.run_name)} failed: {escape(out['error'])}[/] "
                        f"(traceback in {out['traceback']})",
                        soft_wrap=True,
                    )
                    failed.append(job.run_name)
                    continue
                record = out["record"]
                console.print(f"{escape(job.run_name)} on {where(out['worker'])}:")
                report_job(record)
                ensure_logged(tracker, store, record)
                records.append(record)
    failures.finish()
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
        cause = getattr(err, "cause", None)
        from_fit = f"ray::{FIT_TASK}" in str(err)  # the remote traceback names the task
        if isinstance(err, ray.exceptions.RayTaskError) and from_fit and cause is not None:
            text = f"its shared fit failed: {short_error(cause)}"
        else:
            text = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        path = store.save_failure(job, err)  # its message holds the remote traceback
        return {"run_name": job.run_name, "error": text, "traceback": str(path), "worker": None}


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
