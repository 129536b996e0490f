"""Runs jobs: fit, predict, evaluate; measures time and memory; writes and tracks results.

A job flows through :func:`open_data`, :func:`fit_or_load`, :func:`predict_all`,
:func:`evaluate` and :func:`job_record`. Nothing computed is lost to a late failure: when the
evaluation (or anything after prediction) fails, the predictions are kept in the job's state
folder and the next run scores them without predicting again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import time
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from rich.markup import escape
from torch.utils.data import ConcatDataset

from bench import __version__
from bench.config import BenchConfig, ConfigError
from bench.datasets import get_dataset
from bench.detector import Detector, UnreadableState
from bench.discovery import discover_types
from bench.evaluation import Evaluator, PointEvaluator
from bench.fingerprint import data_fingerprint
from bench.loading import EpochLoader
from bench.metrics import METRIC_VERSION
from bench.overlays import OverlayCollector
from bench.plan import Fit, Job, open_split, plan_jobs, select
from bench.progress import console, progress_bar
from bench.registry import create_detector, get_detector_class
from bench.results import ResultStore, read_record, write_json
from bench.system import (
    PeakMemory,
    device_description,
    resolve_device,
    seed_everything,
    track_peak_memory,
)
from bench.training import CHECKPOINT_NAME, TrainableDetector, amp_dtype
from bench.types import collate_training

__all__ = ["data_fingerprint", "run_benchmark", "run_job"]

FITTED_STATE = "fitted.pt"
#: when and from what a fit was computed (its seconds are reported by every job sharing it)
FIT_INFO = "fit.json"
#: one line per fit stage computed, by any process of any machine: what was fitted, where, when
FIT_LOG = "fits.jsonl"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def job_modality(detector, spec) -> str:
    """The input a job feeds the detector: the first modality it accepts that the dataset
    serves by default, else the first the dataset can provide."""
    accepted = detector.accepted_modalities(detector.get_params())
    for pool in (spec.modalities, spec.feeds):
        for modality in accepted:
            if modality in pool:
                return modality
    raise ValueError(
        f"{type(detector).__name__} accepts {accepted}; {spec.name} feeds {spec.feeds}"
    )


def short_error(err: BaseException) -> str:
    """``Type: message`` of an error; for one raised in a DataLoader worker, the original error
    (the last line of the worker's traceback) instead of the whole traceback."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        return f"{name.rpartition('.')[2]}{sep}{message}"  # bench.errors.DataError -> DataError
    return f"{type(err).__name__}: {text}"


def summary_line(record: dict[str, Any]) -> str:
    """One line of headline metrics for the console: image ones, then pixel or point ones."""
    m, t = record["metrics"]["all"], record["timings"]
    fit = "shared fit" if record.get("fit_shared") else f"{t['fit_seconds']:.1f}s fit"
    return f"{headline(m)}  ({fit}, {t['predict_images_per_second']:.1f} samples/s)"


def headline(m: dict[str, float]) -> str:
    """The headline metrics of one metrics group: image ones, then pixel or point ones."""
    shown = [("image AUROC", "image_auroc")]
    if "point_auroc" in m:
        shown += [("point AUROC", "point_auroc"), ("point AP", "point_ap")]
    else:
        shown += [("pixel AUROC", "pixel_auroc"), ("AU-PRO", "au_pro")]
    return "".join(f"  {label} {m[key]:.4f}" for label, key in shown)


# -- the stages of one job ------------------------------------------------------------------------
@dataclass
class JobData:
    spec: Any
    test_set: Any
    test: EpochLoader


def input_options(image_size, crop_size, resampling: str) -> dict[str, Any]:
    """A loader's input options; ``resampling`` only when not the loaders' default ("tensor"),
    so that loaders without RGB images to resize (point clouds) need not take it."""
    opts = {"image_size": image_size, "crop_size": crop_size}
    return opts if resampling == "tensor" else {**opts, "resampling": resampling}


def open_data(job: Job, device: torch.device, num_workers: int) -> JobData:
    """The evaluated category's test split (the training data belongs to the fit)."""
    spec = get_dataset(job.dataset.name)
    opts = {
        **input_options(job.image_size, job.crop_size, job.fit.resampling),
        **job.dataset.options,
    }
    test_set = spec.open(job.category, "test", job.root, **opts)
    pin = device.type == "cuda"
    test = EpochLoader(test_set, job.batch_size, num_workers=num_workers, pin_memory=pin)
    return JobData(spec, test_set, test)


def open_fit_data(
    fit: Fit, trainable: bool, device: torch.device, num_workers: int
) -> tuple[list[Any], EpochLoader]:
    """The training images of one fit (every part, pooled) and their batches."""
    sets = []
    for part in fit.parts:
        opts = input_options(fit.image_size, fit.crop_size, fit.resampling)
        split = get_dataset(part.dataset).open(
            part.category, "train", part.root, **opts, **json.loads(part.options)
        )
        sets.append(select(split, part.files))
    pooled = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    loader = EpochLoader(
        pooled,
        fit.batch_size,
        shuffle=trainable,
        seed=fit.seed,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=trainable and len(pooled) >= fit.batch_size,
        collate_fn=collate_training,
    )
    return sets, loader


def fit_size(fit: Fit) -> int:
    """How many training images the fit gets (from the plan's index, without loading)."""
    return sum(
        len(select(open_split(p.dataset, p.root, p.category, p.options, "train"), p.files))
        for p in fit.parts
    )


@dataclass
class FitResult:
    cached: bool
    seconds: float
    peak: Any
    #: the stages computed by this job (a cached or shared fit computes none)
    computed: list[str] = field(default_factory=list)
    #: seconds the fit took when it was computed (by this job or an earlier one)
    fitted_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    shared: bool = False
    #: optimiser steps the training left out (non-finite gradients); None: not trained here
    skipped_steps: int | None = None


def clear_fitted_state(workdir: Path) -> None:
    """Removes a fit's state and checkpoint, so that it is fitted from scratch (``--force``)."""
    for name in (FITTED_STATE, CHECKPOINT_NAME, FIT_INFO):
        (workdir / name).unlink(missing_ok=True)


def load_fitted(detector: Detector, workdir: Path) -> bool:
    """Loads a fit's cached state; False when there is none or it is unreadable (named)."""
    state_file = workdir / FITTED_STATE
    if not state_file.is_file():
        return False
    try:
        detector.load_state(state_file)
        return True
    except UnreadableState as err:  # a cache: named, then fitted again
        console.print(f"[yellow]  {escape(str(err))}; fitting again[/]", soft_wrap=True)
        state_file.unlink(missing_ok=True)
        return False


def fit_or_load(
    detector: Detector,
    fit: Fit,
    store: ResultStore,
    device: torch.device,
    num_workers: int = 0,
    logger_for: Any = None,
) -> FitResult:
    """Brings ``detector`` to the state of ``fit``: loads the cached state of the fit, or of the
    nearest stage before it, and computes the stages after that, saving each stage's state.
    ``logger_for(fit, resuming)`` gives a trained stage's step logger (live training curves;
    ``resuming``: a checkpoint exists, so the training continues an earlier one)."""
    chain = fit_chain(fit)
    result = FitResult(cached=False, seconds=0.0, peak=None)
    with track_peak_memory(device) as peak:
        start = time.perf_counter()
        todo = cached_stages(detector, chain, store)
        for stage in reversed(todo):
            workdir = store.fit_dir(stage)
            detector.workdir = workdir
            trainable = isinstance(detector, TrainableDetector) and stage.stage == "fit"
            sets, loader = open_fit_data(stage, trainable, device, num_workers)
            result.warnings += [w for ds in sets for w in getattr(ds, "warnings", [])]
            if trainable and logger_for is not None:
                resuming = (workdir / CHECKPOINT_NAME).is_file()
                detector.step_logger = logger_for(stage, resuming)
            t0 = time.perf_counter()
            try:
                (detector.fit if stage.stage == "fit" else detector.fit_references)(loader)
            finally:
                loader.close()
                if trainable:
                    detector.step_logger = None
            _sync(device)
            detector.save_state(workdir / FITTED_STATE)
            seconds = time.perf_counter() - t0
            write_json(workdir / FIT_INFO, {"seconds": seconds,
                                            "fit": stage.config(), "name": stage.name})  # fmt: skip
            log_fit(store, stage, seconds, device)
            result.computed.append(stage.stage)
        result.seconds = time.perf_counter() - start
    detector.workdir = store.fit_dir(fit)
    result.cached, result.peak = not todo, peak
    result.fitted_seconds = fitted_seconds(store, fit)
    return result


def log_fit(store: ResultStore, stage: Fit, seconds: float, device: torch.device) -> None:
    """Appends the computation of ``stage`` to the store's fit log (:data:`FIT_LOG`): one
    ``write`` of one line in append mode, which local filesystems keep whole between
    processes (NFS does not promise it: :func:`fit_log` skips a garbled line)."""
    line = json.dumps(
        {
            "name": stage.name,
            "hash": stage.hash,
            "stage": stage.stage,
            "seconds": round(seconds, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": device_description(device),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        sort_keys=True,
    )
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / FIT_LOG, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def fit_log(store: ResultStore) -> list[dict[str, Any]]:
    """Every fit computation the store's log holds, oldest first."""
    path = store.root / FIT_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def cached_stages(detector: Detector, chain: list[Fit], store: ResultStore) -> list[Fit]:
    """Loads the cached state ``chain`` (the job's own fit first) can start from and returns
    the stages still to compute, the job's own last. Self-contained stage states: the nearest
    cached stage is enough. Incremental ones (``Detector.incremental_stages``: a later stage
    saves only what it adds): each stage is loaded on top of its parent, from the first."""
    if not detector.incremental_stages:
        todo = []
        for stage in chain:
            if load_fitted(detector, store.fit_dir(stage)):
                break
            todo.append(stage)
        return todo
    first_stages = list(reversed(chain))
    for i, stage in enumerate(first_stages):
        if not load_fitted(detector, store.fit_dir(stage)):
            return list(reversed(first_stages[i:]))
    return []


def fitted_seconds(store: ResultStore, fit: Fit) -> float | None:
    """Seconds all stages of ``fit`` took when they were computed (None if unrecorded)."""
    total = 0.0
    stage: Fit | None = fit
    while stage is not None:
        info = read_record(store.fit_dir(stage) / FIT_INFO)
        if isinstance(info, str):
            return None
        total += float(info.get("seconds", 0.0))
        stage = stage.parent
    return total


class LiveFit:
    """The detector of the last fit, kept in memory for the next job that shares the fit (the
    jobs of a unified or train_on fit run one after the other)."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.detector: Detector | None = None

    def take(self, fit: Fit, params: dict[str, Any]) -> Detector | None:
        """The kept detector when it holds ``fit`` and was built with ``params`` (entries that
        differ only in test parameters share a fit, not a detector)."""
        if self.key != (fit.name, fit.hash) or self.detector.get_params() != params:
            return None
        return self.detector

    def keep(self, fit: Fit, detector: Detector) -> None:
        self.key, self.detector = (fit.name, fit.hash), detector

    def drop(self) -> None:
        self.key = self.detector = None


@dataclass
class Predictions:
    """Everything prediction produced: the evaluator holding every map or point score, the
    overlay figure's picks, the defective images for type discovery, timings and memory."""

    evaluator: Evaluator | PointEvaluator
    overlays: OverlayCollector
    defective: dict[str, list] = field(default_factory=dict)
    model_seconds: float = 0.0
    predict_seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int = 0
    resumed: bool = False


def new_evaluator(job: Job, modality: str, export_maps: str | None):
    export = None
    if export_maps is not None:
        export = Path(export_maps) / job.detector.display / job.dataset.name / f"seed{job.seed}"
    if modality == "points":
        return PointEvaluator(export_dir=export)
    return Evaluator(job.protocol, export_dir=export)


def predict_all(
    detector: Detector,
    job: Job,
    data: JobData,
    device: torch.device,
    evaluator,
    keep_defective: bool,
) -> Predictions:
    """Predicts every test batch and streams it into the evaluator."""
    out = Predictions(evaluator, OverlayCollector(), {"images": [], "maps": [], "defects": []})
    dtype = amp_dtype(device, "auto") if detector.inference_amp else None
    with (
        track_peak_memory(device) as peak,
        progress_bar(f"predict {job.run_name}", len(data.test)) as bar,
    ):
        start = time.perf_counter()
        detector.start_test()
        for batch in data.test:
            batch = batch.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                prediction = detector.predict(batch)
            _sync(device)
            out.model_seconds += time.perf_counter() - t0
            evaluator.update(prediction, batch)
            out.overlays.update(prediction, batch)
            if keep_defective:
                keep = batch.label.cpu().bool()
                out.defective["images"].append(batch.image.cpu()[keep])
                out.defective["maps"].append(prediction.anomaly_map.float().cpu()[keep])
                out.defective["defects"] += [m["defect"] for m, k in zip(batch.meta, keep) if k]
            bar.advance(1)
        final = detector.test_scores()
        if final is not None:
            evaluator.replace_scores(final)
        out.predict_seconds = time.perf_counter() - start
    out.peak_host_bytes, out.peak_gpu_bytes = peak.host_bytes, peak.gpu_bytes
    return out


def pending_path(store: ResultStore, job: Job) -> Path:
    """Where the predictions of a job that failed after predicting are kept."""
    return store.state_dir(job) / f"predictions-{job.config_hash}.pt"


def keep_predictions(path: Path, predictions: Predictions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(predictions, tmp)
    tmp.replace(path)


def load_predictions(path: Path, export_dir: Path | None) -> Predictions | None:
    """Predictions kept by an earlier run of the same job, or None when there are none, they
    are unreadable, or they were exported elsewhere (the maps must reach the new folder).
    They stay on the host, where the evaluator and the overlays work."""
    if not path.is_file():
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        console.print(
            f"[yellow]  kept predictions {escape(str(path))} are unreadable ({escape(str(err))}); "
            "predicting again[/]",
            soft_wrap=True,
        )
        return None
    if kept.evaluator.export_dir != export_dir:
        return None
    kept.resumed = True
    return kept


def drop_kept_predictions(state_dir: Path) -> None:
    """Removes every kept prediction file of a job's state folder (older configurations'
    too: each can be hundreds of MB), and the folder when nothing else is in it."""
    for path in state_dir.glob("predictions-*.pt"):
        path.unlink(missing_ok=True)
    try:
        state_dir.rmdir()  # a job of a shared fit keeps nothing else there
    except OSError:
        pass


class FailedAfterPrediction(RuntimeError):
    """A job failed after its predictions were made; they are kept for the next run."""


def score(pred: Predictions) -> dict[str, Any]:
    """Every metric from the collected predictions, with its time."""
    start = time.perf_counter()
    metrics = pred.evaluator.compute()
    return {"metrics": metrics, "eval_seconds": time.perf_counter() - start, "discovery": None}


def discover(detector: Detector, pred: Predictions, seed: int) -> dict[str, Any] | None:
    """Anomaly-type discovery on the defective test images, for detectors that support it."""
    found = pred.defective
    if not (found and found.get("defects")):
        return None
    start = time.perf_counter()
    out = discover_types(
        torch.cat(found["images"]),
        torch.cat(found["maps"]),
        found["defects"],
        detector.describe_regions,
        n_types=getattr(detector, "n_types", None),
        seed=seed,
    )
    out["seconds"] = time.perf_counter() - start
    return out


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
    n_test = len(data.test_set)
    warnings = [*fit.warnings, *getattr(data.test_set, "warnings", [])]
    if fit.skipped_steps:
        warnings.append(
            f"{fit.skipped_steps} optimiser steps of the training were skipped: their gradients "
            "held NaN or inf"
        )
    return {
        "run_name": job.run_name,
        "config_hash": job.config_hash,
        "fit_hash": job.fit_hash,
        "detector": job.detector.display,
        "detector_name": job.detector.name,
        "modality": modality,
        "params": job.params,
        "substitutes": get_detector_class(job.detector.name).substitutes(job.params),
        "transductive": get_detector_class(job.detector.name).transductive(job.params),
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
        "curves": evaluator.curves,
        "discovery": scored["discovery"],
        "warnings": warnings + evaluator.warnings,
        "maps_exported_to": None if evaluator.export_dir is None else str(evaluator.export_dir),
        "n_train": fit_size(job.fit),
        "n_test": n_test,
        "fit_cached": fit.cached,
        "fit_shared": fit.shared,
        "skipped_steps": fit.skipped_steps,
        "predictions_resumed": pred.resumed,
        "timings": {
            "fit_seconds": fit.seconds,
            "fitted_seconds": fit.fitted_seconds,
            "predict_seconds": pred.predict_seconds,
            "predict_images_per_second": n_test / pred.predict_seconds
            if pred.predict_seconds
            else None,
            "model_images_per_second": n_test / pred.model_seconds if pred.model_seconds else None,
            "eval_seconds": scored["eval_seconds"],
        },
        "memory": {
            "fit_peak_host_mb": fit.peak.host_bytes / 2**20,
            "predict_peak_host_mb": pred.peak_host_bytes / 2**20,
            "fit_peak_gpu_mb": fit.peak.gpu_bytes / 2**20,
            "predict_peak_gpu_mb": pred.peak_gpu_bytes / 2**20,
        },
        "device": device_description(device),
        #: the process that ran the job (with the Ray executor, any node of the cluster)
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "data_fingerprint": hashlib.sha256(
            f"{job.train_data}|{job.test_data}".encode()
        ).hexdigest()[:16],
        "train_fingerprint": job.train_data,
        "test_fingerprint": job.test_data,
        "versions": {
            "adbench": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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


def run_job(
    job: Job,
    store: ResultStore,
    device: torch.device,
    num_workers: int = 0,
    export_maps: str | None = None,
    refit: Collection[str] = (),
    fresh: bool = False,
    live: LiveFit | None = None,
    logger_for: Any = None,
    log_every: int = 1,
) -> dict[str, Any]:
    """Brings a detector to the job's fit (shared in memory through ``live``, loaded from the
    fit's cached state, or fitted) and scores one category.

    ``refit`` holds the state folders of the fit stages whose cached state and checkpoint are
    discarded first, and ``fresh`` discards predictions kept from an earlier failed run
    (``--force``).
    """
    seed_everything(job.seed)
    kept_at = pending_path(store, job)
    if fresh:
        kept_at.unlink(missing_ok=True)
    if refit:
        for stage in fit_chain(job.fit):
            if str(store.fit_dir(stage)) in refit:
                clear_fitted_state(store.fit_dir(stage))
        if live is not None:
            live.drop()
    detector = live.take(job.fit, job.params) if live is not None else None
    if detector is None:
        if live is not None:
            live.drop()  # the last fit's detector is released before this one is built
        detector = create_detector(job.detector.name, **job.params)
        detector.to(device)
        if isinstance(detector, TrainableDetector):
            detector.log_every = log_every
        fit = fit_or_load(detector, job.fit, store, device, num_workers, logger_for)
        if live is not None:
            live.keep(job.fit, detector)
    else:
        fit = FitResult(True, 0.0, PeakMemory(), shared=True)
        fit.fitted_seconds = fitted_seconds(store, job.fit)
    skipped = getattr(detector, "skipped_steps_", None)
    fit.skipped_steps = None if skipped is None else len(skipped)
    data = open_data(job, device, num_workers)

    modality = job_modality(detector, data.spec)
    evaluator = new_evaluator(job, modality, export_maps)
    pred = load_predictions(kept_at, evaluator.export_dir)
    if pred is None:
        want_types = getattr(detector, "discover_types", False) and hasattr(
            detector, "describe_regions"
        )
        pred = predict_all(detector, job, data, device, evaluator, want_types)
    scored = None
    try:
        scored = score(pred)
        scored["discovery"] = discover(detector, pred, job.seed)
        record = job_record(job, data, modality, fit, pred, scored, device)
        overlays = pred.overlays.save(store.root / "figures" / f"{job.slug}.png", job.run_name)
        record["overlays"] = None if overlays is None else str(overlays)
        store.save(record)
    except BaseException as err:
        kept = pred.resumed or _keep(kept_at, pred)
        if not isinstance(err, Exception):  # Ctrl-C: the predictions are kept all the same
            raise
        if scored is not None:  # metrics computed before the failure are at least shown
            console.print(f"  computed before the failure:{headline(scored['metrics']['all'])}")
        outcome = (
            f"the predictions are kept in {kept_at}; re-running the same command scores them "
            "without predicting again"
            if kept
            else "the predictions could not be kept either"
        )
        raise FailedAfterPrediction(f"{short_error(err)} (after prediction: {outcome})") from err
    drop_kept_predictions(store.state_dir(job))
    _check_unchanged(job, data, record)
    return record


def _keep(path: Path, pred: Predictions) -> bool:
    """Keeps the predictions of a failed job; False (with a message) when that fails too."""
    try:
        keep_predictions(path, pred)
        return True
    except Exception as err:
        path.with_suffix(".tmp").unlink(missing_ok=True)
        console.print(f"[red]  cannot keep the predictions in {escape(str(path))}: {err}[/]")
        return False


def current_train_fingerprint(fit: Fit) -> str:
    """The fingerprint of a fit's training files as they are now (not as planned)."""
    sets = [
        select(
            get_dataset(p.dataset).open(
                p.category, "train", p.root, image_size=None, **json.loads(p.options)
            ),
            p.files,
        )
        for p in fit.parts
    ]
    return data_fingerprint(*sets)


def _check_unchanged(job: Job, data: JobData, record: dict[str, Any]) -> None:
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


def fit_chain(fit: Fit) -> list[Fit]:
    """A fit and the stages it starts from."""
    chain = [fit]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    return chain


def check_writable(*folders: Path) -> None:
    """Fails before any job starts when a folder the run writes to cannot be written."""
    for folder in folders:
        probe = folder / f".write-test-{time.time_ns()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"cannot write to {folder} ({err.strerror or err}); choose another folder "
                "(--output, --export-maps) or fix its permissions"
            ) from err


def run_benchmark(
    cfg: BenchConfig, force: bool = False, track: bool = True
) -> tuple[list[dict], list[str]]:
    """Runs every planned job not already finished; returns (records, failed run names).
    ``cfg.executor`` "ray" hands the jobs to Ray (bench.executors.ray_executor); "local" runs
    them here, one after the other."""
    if cfg.executor == "ray":
        from bench.executors.ray_executor import run_on_ray

        return run_on_ray(cfg, force=force, track=track)
    from bench.tracking import Tracker

    device = resolve_device(cfg.device)  # before planning: a wrong device fails at once
    jobs = plan_jobs(cfg)
    store = ResultStore(cfg.output, cfg.name)
    folders = [store.root / sub for sub in ("jobs", "state", "figures", "failed")]
    check_writable(*folders, *([Path(cfg.export_maps)] if cfg.export_maps else []))
    console.print(f"[bold]{cfg.name}[/]: {len(jobs)} job(s) on {device_description(device)}")
    records, failed = [], []
    refitted: set[str] = set()  # under --force, a fit shared by several jobs is refitted once
    tracker = Tracker.from_config(cfg) if track else None
    live = LiveFit()
    logger_for = None if tracker is None else tracker.fit_logger
    with tracker if tracker is not None else nullcontext():
        for i, job in enumerate(jobs, 1):
            if live.take(job.fit, job.params) is None:
                live.drop()  # kept only for the jobs right after it that share its fit
            record = None if force else store.load(job)
            if record is not None:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: done before, skipped")
            else:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: running")
                chain = {str(store.fit_dir(f)) for f in fit_chain(job.fit)}
                refit = chain - refitted if force else set()
                refitted |= refit
                try:
                    record = run_job(
                        job,
                        store,
                        device,
                        cfg.num_workers,
                        cfg.export_maps,
                        refit=refit,
                        fresh=force,
                        live=live,
                        logger_for=logger_for,
                        log_every=cfg.train_log_every,
                    )
                except KeyboardInterrupt:
                    raise
                except Exception as err:
                    path = store.save_failure(job, err)
                    console.print(f"[red]  failed: {short_error(err)}[/] (traceback in {path})")
                    failed.append(job.run_name)
                    continue
                report_job(record)
            if tracker is not None and not record.get("mlflow_run_id"):
                run_id = tracker.log_job(record)
                if run_id:
                    record["mlflow_run_id"] = run_id
                    store.save(record)
            records.append(record)
        if tracker is not None:
            tracker.log_summary(records)
    return records, failed


def report_job(record: dict[str, Any]) -> None:
    """The console lines of a finished job: warnings, headline metrics, discovery."""
    for warning in record["warnings"]:
        console.print(f"[yellow]  {warning}[/]")
    console.print(summary_line(record))
    found = record.get("discovery") or {}
    if "nmi" in found:
        console.print(
            f"  anomaly types: NMI {found['nmi']:.3f}  ARI {found['ari']:.3f}  "
            f"F1 {found['f1']:.3f}  ({found['n_images']} defective images, "
            f"{found['n_types']} clusters)"
        )
