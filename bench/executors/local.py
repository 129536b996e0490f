"""Runs a benchmark's jobs in this process, one after the other. Jobs that share a fit and run
one after the other share its detector in memory."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import BenchConfig
from bench.executors import still_to_track
from bench.job.fitting import LiveFit
from bench.job.run import JobOptions, clear_for_force, run_job
from bench.job.summary import Failures, report_job
from bench.plan import Job, plan_jobs
from bench.progress import console
from bench.results import ResultStore
from bench.run_lock import run_lock
from bench.system import device_description, resolve_device
from bench.tracking import Tracker, ensure_logged

if TYPE_CHECKING:
    import torch


def run_local(
    cfg: BenchConfig, force: bool = False, track: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """Runs every planned job not already finished, here, one after the other; returns
    (records, failed run names)."""
    device = resolve_device(cfg.device)  # before planning: a wrong device fails at once
    jobs = plan_jobs(cfg)
    store = ResultStore(cfg.output, cfg.name)
    store.check_writable(*([Path(cfg.export_maps)] if cfg.export_maps else []))
    console.print(f"[bold]{cfg.name}[/]: {len(jobs)} job(s) on {device_description(device)}")
    with run_lock(store.root):  # before reading what is done and opening MLflow
        return run_jobs(cfg, jobs, store, device, force, track)


def run_jobs(
    cfg: BenchConfig,
    jobs: list[Job],
    store: ResultStore,
    device: torch.device,
    force: bool,
    track: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`run_local`'s jobs, while it holds the benchmark folder."""
    done = {} if force else {job.run_name: store.load(job) for job in jobs}
    if force:
        clear_for_force(store, jobs)
    tracker = Tracker.from_config(cfg) if still_to_track(track, done) else None
    options = JobOptions(
        cfg.num_workers,
        cfg.export_maps,
        cfg.train_log_every,
        None if tracker is None else tracker.fit_logger,
        cfg.bootstrap,
        cfg.bootstrap_seed,
    )
    records, failed, failures = [], [], Failures(store)
    live = LiveFit()
    with tracker if tracker is not None else nullcontext():
        for i, job in enumerate(jobs, 1):
            if live.take(job.fit, job.params) is None:
                live.drop()  # kept only for the jobs right after it that share its fit
            record = done.get(job.run_name)
            if record is not None:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: done before, skipped")
            else:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: running")
                try:
                    record = run_job(job, store, device, options, live)
                except Exception as err:
                    failed.append(failures.add(job, err))
                    continue
                report_job(record)
            ensure_logged(tracker, store, record)
            records.append(record)
        if tracker is not None:
            tracker.log_summary(records, failed)
    failures.finish()
    return records, failed
