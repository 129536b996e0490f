"""One job, the same in-process and in a Ray task: fit or load, predict, score, record, save.

Nothing computed is lost to a late failure: when scoring (or anything after prediction) fails,
the predictions are kept in the job's state folder and the next run scores them without
predicting again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench.detector import Detector
from bench.job.data import JobData, job_modality, open_data
from bench.job.fitting import (
    FitResult,
    LiveFit,
    build_detector,
    clear_fitted_state,
    fit_chain,
    fit_or_load,
    fitted_seconds,
)
from bench.job.predicting import (
    Predictions,
    discover,
    drop_kept_predictions,
    keep_predictions,
    load_predictions,
    new_evaluator,
    pending_path,
    predict_all,
    score,
)
from bench.job.record import check_unchanged, job_record
from bench.metrics import headline
from bench.metrics.bootstrap import DEFAULT_RESAMPLES
from bench.plan import Fit, Job
from bench.progress import console
from bench.results import ResultStore, WriteError, write_elsewhere, writing
from bench.system import PeakMemory, seed_everything


class FailedAfterPrediction(RuntimeError):
    """A job failed after its predictions were made; they are kept for the next run."""


def short_error(err: BaseException) -> str:
    """``Type: message`` of an error; for one raised in a DataLoader worker, the original error
    (the last line of the worker's traceback) instead of the whole traceback."""
    text = str(err)
    if isinstance(err, (WriteError, FailedAfterPrediction)):
        return text  # "could not write <path>: <why>"; the original error's own type and message
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        return f"{name.rpartition('.')[2]}{sep}{message}"  # bench.errors.DataError -> DataError
    return f"{type(err).__name__}: {text}"


@dataclass(frozen=True)
class JobOptions:
    """How jobs run, whichever executor runs them."""

    num_workers: int = 0
    #: write every anomaly map under this folder (``--export-maps``)
    export_maps: str | None = None
    #: trained detectors log loss, lr and throughput every N steps
    log_every: int = 1
    #: ``logger_for(fit, resuming)``: a trained fit stage's step logger (MLflow), or None
    logger_for: Callable[[Fit, bool], Any] | None = None
    #: bootstrap resamples of each job's confidence intervals (0: none), and their seed
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = 0


def run_job(
    job: Job,
    store: ResultStore,
    device: torch.device,
    options: JobOptions = JobOptions(),
    live: LiveFit | None = None,
) -> dict[str, Any]:
    """Brings a detector to the job's fit (kept in memory by ``live`` for the jobs after it,
    loaded from the fit's cached state, or fitted), scores one category and saves its record."""
    seed_everything(job.seed)
    detector = live.take(job.fit, job.params) if live is not None else None
    if detector is None:
        if live is not None:
            live.drop()  # the last fit's detector is released before this one is built
        detector = build_detector(job.fit, device, options.log_every)
        fit = fit_or_load(detector, job.fit, store, device, options.num_workers, options.logger_for)
        if live is not None:
            live.keep(job.fit, detector)
    else:
        fit = FitResult(True, 0.0, PeakMemory(), shared=True)
        fit.fitted_seconds = fitted_seconds(store, job.fit)
    skipped = detector.fitted_state().get("skipped_steps_")  # a trained detector's
    fit.skipped_steps = None if skipped is None else len(skipped)
    data = open_data(job, device, options.num_workers)
    modality = job_modality(detector, data.spec)
    evaluator = new_evaluator(job, modality, options.export_maps, data.spec.metrics)
    kept_at = pending_path(store, job)
    pred = load_predictions(kept_at, evaluator.export_dir)
    if pred is None:
        pred = predict_all(detector, job, data, device, evaluator)
    record = score_and_save(job, store, detector, data, modality, fit, pred, device, options)
    drop_kept_predictions(store.state_dir(job))
    check_unchanged(job, data, record)
    return record


def score_and_save(
    job: Job,
    store: ResultStore,
    detector: Detector,
    data: JobData,
    modality: str,
    fit: FitResult,
    pred: Predictions,
    device: torch.device,
    options: JobOptions = JobOptions(),
) -> dict[str, Any]:
    """Scores the predictions (metrics, per-image data, bootstrap intervals) and saves the
    job's record, per-image file and overlay figure; on a failure the predictions are kept for
    the next run (:class:`FailedAfterPrediction`)."""
    scored = record = None
    try:
        scored = score(pred, job.root, options.bootstrap, options.bootstrap_seed)
        scored["discovery"] = discover(detector, pred, job.seed)
        record = job_record(job, data, modality, fit, pred, scored, device)
        if scored["per_image"] is not None:
            record["per_image"] = store.save_per_image(job, scored["per_image"])
        figure = store.root / "figures" / f"{job.slug}.png"
        with writing(figure):
            overlays = pred.overlays.save(figure, job.run_name)
        record["overlays"] = None if overlays is None else str(overlays)
        store.save(record)
        return record
    except BaseException as err:
        kept_at = pending_path(store, job)
        kept = pred.resumed or _keep(kept_at, pred)
        if not isinstance(err, Exception):  # Ctrl-C: the predictions are kept all the same
            raise
        outcome = (
            f"the predictions are kept in {kept_at}; re-running the same command scores them "
            "without predicting again"
            if kept
            else "the predictions could not be kept either"
        )
        if scored is not None:  # metrics computed before the failure are at least shown
            console.print(f"  its metrics (not saved):{headline(scored['metrics']['all'])}")
        if record is not None:  # and the whole record kept where it can be
            elsewhere = write_elsewhere(
                "bench-record-", ".json", json.dumps(record, indent=2, sort_keys=True, default=str)
            )
            outcome += f"; its record is in {elsewhere}" if elsewhere else ""
        raise FailedAfterPrediction(f"{short_error(err)} (after prediction: {outcome})") from err


def clear_for_force(store: ResultStore, jobs: list[Job]) -> None:
    """``--force``: every fit stage of ``jobs`` and every prediction they kept, computed anew
    (a stage that several jobs share is cleared once, before any of them runs)."""
    for stage_dir in sorted({str(store.fit_dir(f)) for j in jobs for f in fit_chain(j.fit)}):
        clear_fitted_state(Path(stage_dir))
    for job in jobs:
        pending_path(store, job).unlink(missing_ok=True)


def _keep(path: Path, pred: Predictions) -> bool:
    """Keeps the predictions of a failed job; False (with a message) when that fails too."""
    try:
        with writing(path):
            keep_predictions(path, pred)
        return True
    except Exception as err:
        with suppress(OSError):
            path.with_suffix(".tmp").unlink(missing_ok=True)
        message = str(err) if isinstance(err, WriteError) else f"{path}: {err}"
        console.print(f"[red]  cannot keep the predictions: {escape(message)}[/]", soft_wrap=True)
        return False
