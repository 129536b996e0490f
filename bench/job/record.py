"""The record of a finished job (``jobs/<run>.json``): identity, metrics, curves, timings,
memory and provenance. Its keys are the results folder's schema: old records stay readable."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
from typing import Any

import timm
import torch
from rich.markup import escape

from bench import __version__
from bench.capabilities import TransductiveScores
from bench.fingerprint import data_fingerprint
from bench.job.data import JobData, current_train_fingerprint, fit_size
from bench.job.fitting import FitResult
from bench.job.predicting import Predictions
from bench.metrics import METRIC_VERSION
from bench.plan import Fit, Job
from bench.progress import console
from bench.registry import get_detector_class
from bench.system import device_description


def job_record(
    job: Job,
    data: JobData,
    modality: str,
    fit: FitResult,
    pred: Predictions,
    scored: dict,
    device: torch.device,
) -> dict[str, Any]:
    """The result file of one job: identity, metrics, curves, timings, memory, provenance."""
    evaluator = pred.evaluator
    cls = get_detector_class(job.detector.name)
    n_test = len(data.test_set)
    return {
        "run_name": job.run_name,
        "config_hash": job.config_hash,
        "fit_hash": job.fit_hash,
        "detector": job.detector.display,
        "detector_name": job.detector.name,
        "modality": modality,
        "params": job.params,
        "substitutes": cls.substitutes(job.params),
        "transductive": cls.transductive(job.params)
        if issubclass(cls, TransductiveScores)
        else None,
        "dataset": job.dataset.name,
        "root": job.root,
        "category": job.category,
        "seed": job.seed,
        **scope_fields(job),
        "image_size": job.image_size,
        "crop_size": job.crop_size,
        "resampling": job.fit.resampling,
        "batch_size": job.batch_size,
        "protocol": evaluator.protocol_label,
        "metric_version": METRIC_VERSION,
        "metrics": scored["metrics"],
        #: 95% intervals of metrics["all"] (bench.metrics.bootstrap); None when turned off
        "ci": scored.get("ci"),
        #: the per-image file (bench.per_image), relative to the benchmark folder
        "per_image": None,
        "curves": evaluator.curves,
        "discovery": scored["discovery"],
        "warnings": job_warnings(fit, data) + evaluator.warnings,
        "maps_exported_to": None if evaluator.export_dir is None else str(evaluator.export_dir),
        "n_train": fit_size(job.fit),
        "n_test": n_test,
        #: how a loader split its data itself (a folder dataset's seeded split of the normals)
        "data_split": getattr(data.test_set, "split_record", None),
        "fit_cached": fit.cached,
        "fit_shared": fit.shared,
        "skipped_steps": fit.skipped_steps,
        "predictions_resumed": pred.resumed,
        "timings": timings(fit, pred, scored, n_test),
        "memory": memory(fit, pred),
        "device": device_description(device),
        #: the process that ran the job (with the Ray executor, any node of the cluster)
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "data_fingerprint": hashlib.sha256(
            f"{job.train_data}|{job.test_data}".encode()
        ).hexdigest()[:16],
        "train_fingerprint": job.train_data,
        "test_fingerprint": job.test_data,
        "versions": versions(),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def job_warnings(fit: FitResult, data: JobData) -> list[str]:
    """What the fit and the test data warned about (e.g. skipped files, skipped steps)."""
    warnings = [*fit.warnings, *getattr(data.test_set, "warnings", [])]
    if fit.skipped_steps:
        warnings.append(
            f"{fit.skipped_steps} optimiser steps of the training were skipped: their gradients "
            "held NaN or inf"
        )
    return warnings


def timings(fit: FitResult, pred: Predictions, scored: dict, n_test: int) -> dict[str, Any]:
    """Seconds of the fit, prediction and scoring, and the throughput of prediction."""
    predict, model = pred.predict_seconds, pred.model_seconds
    return {
        "fit_seconds": fit.seconds,
        "fitted_seconds": fit.fitted_seconds,
        "predict_seconds": predict,
        "predict_images_per_second": n_test / predict if predict else None,
        "model_images_per_second": n_test / model if model else None,
        "eval_seconds": scored["eval_seconds"],
        "bootstrap_seconds": scored.get("bootstrap_seconds"),
    }


def memory(fit: FitResult, pred: Predictions) -> dict[str, float]:
    """Peak host and GPU memory of the fit and of prediction, in MiB."""
    return {
        "fit_peak_host_mb": fit.peak.host_bytes / 2**20,
        "predict_peak_host_mb": pred.peak_host_bytes / 2**20,
        "fit_peak_gpu_mb": fit.peak.gpu_bytes / 2**20,
        "predict_peak_gpu_mb": pred.peak_gpu_bytes / 2**20,
    }


def versions() -> dict[str, str | None]:
    return {
        "adbench": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
    }


def scope_fields(job: Job) -> dict[str, Any]:
    """What a job was fitted on: the fit scope, the fit's identity and training categories, and
    for few-shot jobs the draw and its reference images (relative to ``references_root``)."""
    fit, scope = job.fit, job.scope
    stages = []
    stage: Fit | None = fit
    while stage is not None:
        stages.append(
            {
                "name": stage.name,
                "hash": stage.hash,
                "stage": stage.stage,
                "label": stage.label,
                "categories": [f"{p.dataset}/{p.category}" for p in stage.parts],
                "root": sorted({p.root for p in stage.parts}),
            }
        )
        stage = stage.parent
    return {
        "fit_label": fit.label,
        "scope": {
            "scope": scope.scope if scope is not None else "per_category",
            "train_on": None
            if scope is None or scope.train_on is None
            else {
                "dataset": scope.train_on.dataset,
                "categories": stages[-1]["categories"],
                "root": stages[-1]["root"][0],
            },
            "shots": len(job.references) if job.references else None,
            "shot_draws": scope.draws if scope is not None and scope.few_shot else None,
            "shot_files": list(scope.shot_files) if scope is not None else [],
        },
        "fit": {"name": fit.name, "stages": stages},
        "draw": job.draw,
        "references": list(job.references) or None,
        #: every reference of the fit (a unified few-shot fit pools all categories'): what
        #: ``--shot-file`` needs to replay the fit
        "fit_references": [f for p in fit.parts for f in (p.files or ())] or None,
        "references_root": job.root if job.references else None,
    }


def check_unchanged(job: Job, data: JobData, record: dict[str, Any]) -> None:
    """Warns when the data changed between planning and the end of the job: the record then
    stands under the identity of the data as planned."""
    try:
        train_now = current_train_fingerprint(job.fit)
    except Exception as err:  # e.g. a training file removed meanwhile
        train_now = f"unreadable ({err})"
    now = (train_now, data_fingerprint(data.test_set))
    if now != (job.train_data, job.test_data):
        warning = (
            f"{job.category}: the data changed while the job ran (fingerprints {now} now, "
            f"{(job.train_data, job.test_data)} when planned); re-run to score the new data"
        )
        console.print(f"[yellow]  {escape(warning)}[/]")
        record["warnings"].append(warning)
