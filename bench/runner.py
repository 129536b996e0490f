"""Runs jobs: fit, predict, evaluate; measures time and memory; writes and tracks results."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch

from bench import __version__
from bench.config import BenchConfig
from bench.datasets import get_dataset
from bench.discovery import discover_types
from bench.evaluation import Evaluator, PointEvaluator
from bench.loading import EpochLoader
from bench.metrics import METRIC_VERSION
from bench.overlays import OverlayCollector
from bench.plan import Job, plan_jobs
from bench.progress import console, progress_bar
from bench.registry import create_detector
from bench.results import ResultStore
from bench.system import device_description, resolve_device, seed_everything, track_peak_memory
from bench.training import TrainableDetector, amp_dtype

FITTED_STATE = "fitted.pt"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_fingerprint(*datasets) -> str:
    """A hash of every input file of the job (path below the root, size, modification time):
    results can be traced to the exact data they came from."""
    digest = hashlib.sha256()
    for ds in datasets:
        for item in ds.items:
            for key in ("path", "gt_path", "rgb_path"):
                path = item.get(key)
                if path is not None:
                    stat = Path(path).stat()
                    rel = (
                        Path(path).relative_to(ds.root)
                        if Path(path).is_relative_to(ds.root)
                        else path
                    )
                    digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def job_modality(detector, spec) -> str:
    """The input a job feeds the detector: the first modality it accepts that the dataset
    serves by default, else the first the dataset can provide."""
    accepted = detector.accepted_modalities()
    for pool in (spec.modalities, spec.feeds):
        for modality in accepted:
            if modality in pool:
                return modality
    raise ValueError(
        f"{type(detector).__name__} accepts {accepted}; {spec.name} feeds {spec.feeds}"
    )


def summary_line(record: dict[str, Any]) -> str:
    """One line of headline metrics for the console: image ones, then pixel or point ones."""
    m, t = record["metrics"]["all"], record["timings"]
    shown = [("image AUROC", "image_auroc")]
    if "point_auroc" in m:
        shown += [("point AUROC", "point_auroc"), ("point AP", "point_ap")]
    else:
        shown += [("pixel AUROC", "pixel_auroc"), ("AU-PRO", "au_pro")]
    values = "  ".join(f"{label} {m[key]:.4f}" for label, key in shown)
    return (
        f"  {values}  ({t['fit_seconds']:.1f}s fit, {t['predict_images_per_second']:.1f} samples/s)"
    )


def run_job(
    job: Job,
    store: ResultStore,
    device: torch.device,
    num_workers: int = 0,
    export_maps: str | None = None,
) -> dict[str, Any]:
    """Fits (or loads the cached fitted state of) one detector and scores one category."""
    seed_everything(job.seed)
    spec = get_dataset(job.dataset.name)
    opts = {"image_size": job.image_size, "crop_size": job.crop_size, **job.dataset.options}
    train_set = spec.open(job.category, "train", job.root, **opts)
    test_set = spec.open(job.category, "test", job.root, **opts)
    detector = create_detector(job.detector.name, **job.params)
    trainable = isinstance(detector, TrainableDetector)
    pin = device.type == "cuda"
    train = EpochLoader(
        train_set,
        job.batch_size,
        shuffle=trainable,
        seed=job.seed,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=trainable and len(train_set) >= job.batch_size,
    )
    test = EpochLoader(test_set, job.batch_size, num_workers=num_workers, pin_memory=pin)
    detector.workdir = store.state_dir(job)
    detector.to(device)

    state_file = detector.workdir / FITTED_STATE
    with track_peak_memory(device) as fit_mem:
        start = time.perf_counter()
        cached = state_file.is_file()
        if cached:
            detector.load_state(state_file)
        else:
            detector.fit(train)
            _sync(device)
            detector.save_state(state_file)
        fit_seconds = time.perf_counter() - start

    export = None
    if export_maps is not None:
        export = Path(export_maps) / job.detector.display / job.dataset.name / f"seed{job.seed}"
    modality = job_modality(detector, spec)
    if modality == "points":
        evaluator = PointEvaluator(export_dir=export)
    else:
        evaluator = Evaluator(job.protocol, export_dir=export)
    dtype = amp_dtype(device, "auto") if detector.inference_amp else None
    discover = getattr(detector, "discover_types", False) and hasattr(detector, "describe_regions")
    defective: dict[str, list] = {"images": [], "maps": [], "defects": []}
    overlays = OverlayCollector()
    model_seconds = 0.0
    with (
        track_peak_memory(device) as predict_mem,
        progress_bar(f"predict {job.run_name}", len(test)) as bar,
    ):
        start = time.perf_counter()
        for batch in test:
            batch = batch.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                prediction = detector.predict(batch)
            _sync(device)
            model_seconds += time.perf_counter() - t0
            evaluator.update(prediction, batch)
            overlays.update(prediction, batch)
            if discover:
                keep = batch.label.cpu().bool()
                defective["images"].append(batch.image.cpu()[keep])
                defective["maps"].append(prediction.anomaly_map.float().cpu()[keep])
                defective["defects"] += [m["defect"] for m, k in zip(batch.meta, keep) if k]
            bar.advance(1)
        predict_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.compute()
    eval_seconds = time.perf_counter() - start
    discovery = None
    if discover and defective["defects"]:
        start = time.perf_counter()
        discovery = discover_types(
            torch.cat(defective["images"]),
            torch.cat(defective["maps"]),
            defective["defects"],
            detector.describe_regions,
            n_types=getattr(detector, "n_types", None),
            seed=job.seed,
        )
        discovery["seconds"] = time.perf_counter() - start

    overlay_path = overlays.save(store.root / "figures" / f"{job.slug}.png", job.run_name)
    return {
        "run_name": job.run_name,
        "overlays": None if overlay_path is None else str(overlay_path),
        "config_hash": job.config_hash,
        "fit_hash": job.fit_hash,
        "detector": job.detector.display,
        "detector_name": job.detector.name,
        "modality": modality,
        "params": job.params,
        "dataset": job.dataset.name,
        "root": job.root,
        "category": job.category,
        "seed": job.seed,
        "image_size": job.image_size,
        "crop_size": job.crop_size,
        "batch_size": job.batch_size,
        "protocol": evaluator.protocol_label,
        "metric_version": METRIC_VERSION,
        "metrics": metrics,
        "curves": evaluator.curves,
        "discovery": discovery,
        "warnings": evaluator.warnings,
        "maps_exported_to": None if export is None else str(export),
        "n_train": len(train_set),
        "n_test": len(test_set),
        "fit_cached": cached,
        "timings": {
            "fit_seconds": fit_seconds,
            "predict_seconds": predict_seconds,
            "predict_images_per_second": len(test_set) / predict_seconds
            if predict_seconds
            else None,
            "model_images_per_second": len(test_set) / model_seconds if model_seconds else None,
            "eval_seconds": eval_seconds,
        },
        "memory": {
            "fit_peak_host_mb": fit_mem.host_bytes / 2**20,
            "predict_peak_host_mb": predict_mem.host_bytes / 2**20,
            "fit_peak_gpu_mb": fit_mem.gpu_bytes / 2**20,
            "predict_peak_gpu_mb": predict_mem.gpu_bytes / 2**20,
        },
        "device": device_description(device),
        "data_fingerprint": data_fingerprint(train_set, test_set),
        "versions": {
            "adbench": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def run_benchmark(
    cfg: BenchConfig, force: bool = False, track: bool = True
) -> tuple[list[dict], list[str]]:
    """Runs every planned job not already finished; returns (records, failed run names)."""
    from bench.tracking import Tracker

    jobs = plan_jobs(cfg)
    store = ResultStore(cfg.output, cfg.name)
    device = resolve_device(cfg.device)
    console.print(f"[bold]{cfg.name}[/]: {len(jobs)} job(s) on {device_description(device)}")
    records, failed = [], []
    tracker = Tracker.from_config(cfg) if track else None
    with tracker if tracker is not None else nullcontext():
        for i, job in enumerate(jobs, 1):
            record = None if force else store.load(job)
            if record is not None:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: done before, skipped")
            else:
                console.print(f"[{i}/{len(jobs)}] {job.run_name}: running")
                try:
                    record = run_job(job, store, device, cfg.num_workers, cfg.export_maps)
                except KeyboardInterrupt:
                    raise
                except Exception as err:
                    path = store.save_failure(job, err)
                    console.print(
                        f"[red]  failed: {type(err).__name__}: {err}[/] (traceback in {path})"
                    )
                    failed.append(job.run_name)
                    continue
                store.save(record)
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
            if tracker is not None and not record.get("mlflow_run_id"):
                run_id = tracker.log_job(record)
                if run_id:
                    record["mlflow_run_id"] = run_id
                    store.save(record)
            records.append(record)
        if tracker is not None:
            tracker.log_summary(records)
    return records, failed
