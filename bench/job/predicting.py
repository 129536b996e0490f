"""Predicts a job's test split into its evaluator, and keeps the predictions of a job that
failed later, so that the next run scores them without predicting again."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench.capabilities import TransductiveScores, TypeDiscovery
from bench.detector import Detector
from bench.discovery import discover_types
from bench.errors import ConfigError
from bench.evaluation import Evaluator, PointEvaluator
from bench.evaluation_ad2 import AD2Evaluator
from bench.evaluation_loco import LocoEvaluator
from bench.job.data import JobData
from bench.overlays import OverlayCollector
from bench.per_image import collect
from bench.plan import Job
from bench.progress import console, progress_bar
from bench.results import ResultStore
from bench.system import synchronize, track_peak_memory
from bench.training import amp_dtype


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


#: the evaluator of each way a dataset's test split is scored (``DatasetSpec.metrics``)
EVALUATORS: dict[str, type[Evaluator]] = {
    "mvtec": Evaluator,
    "loco": LocoEvaluator,
    "mvtec_ad2": AD2Evaluator,
}


def new_evaluator(job: Job, modality: str, export_maps: str | None, metrics: str = "mvtec"):
    """The evaluator of a job: per point for unorganised clouds, else the one of the dataset's
    ``metrics``."""
    export = None
    if export_maps is not None:
        export = Path(export_maps) / job.detector.display / job.dataset.name / f"seed{job.seed}"
    if modality == "points":
        return PointEvaluator(export_dir=export)
    if metrics == "loco" and job.protocol != "official":
        raise ConfigError(
            f"{job.dataset.name}: MVTec LOCO AD is scored with the official protocol only "
            f"(sPRO's saturation areas are pixel counts at native resolution), got "
            f"protocol {job.protocol!r}"
        )
    return EVALUATORS[metrics](job.protocol, export_dir=export)


def predict_all(
    detector: Detector,
    job: Job,
    data: JobData,
    device: torch.device,
    evaluator: Evaluator | PointEvaluator,
) -> Predictions:
    """Predicts every test batch and streams it into the evaluator; keeps the defective images
    and their maps for a detector that discovers anomaly types."""
    out = Predictions(evaluator, OverlayCollector(), {"images": [], "maps": [], "defects": []})
    keep_defective = isinstance(detector, TypeDiscovery) and detector.discover_types
    transductive = isinstance(detector, TransductiveScores)
    dtype = amp_dtype(device, "auto") if detector.inference_amp else None
    with (
        track_peak_memory(device) as peak,
        progress_bar(f"predict {job.run_name}", len(data.test)) as bar,
    ):
        start = time.perf_counter()
        if transductive:
            detector.start_test()
        for batch in data.test:
            batch = batch.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                prediction = detector.predict(batch)
            synchronize(device)
            out.model_seconds += time.perf_counter() - t0
            evaluator.update(prediction, batch)
            out.overlays.update(prediction, batch)
            if keep_defective:
                keep = batch.label.cpu().bool()
                out.defective["images"].append(batch.image.cpu()[keep])
                out.defective["maps"].append(prediction.anomaly_map.float().cpu()[keep])
                out.defective["defects"] += [m["defect"] for m, k in zip(batch.meta, keep) if k]
            bar.advance(1)
        final = detector.test_scores() if transductive else None
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


def score(pred: Predictions, root: str | None, resamples: int, seed: int) -> dict[str, Any]:
    """Every metric from the collected predictions, then (``resamples`` > 0) the per-image
    data and the bootstrap intervals, with their times."""
    start = time.perf_counter()
    metrics = pred.evaluator.compute()
    scored = {"metrics": metrics, "eval_seconds": time.perf_counter() - start, "discovery": None}
    scored.update(per_image=None, ci=None, bootstrap_seconds=None)
    known = getattr(pred.evaluator, "ids", None)  # predictions kept by an older version: none
    if resamples > 0 and known is not None and len(known) == len(pred.evaluator.scores):
        start = time.perf_counter()
        per_image, boot = collect(pred.evaluator, root, resamples, seed)
        scored.update(per_image=per_image, ci=boot.record())
        scored["bootstrap_seconds"] = time.perf_counter() - start
    return scored


def discover(detector: Detector, pred: Predictions, seed: int) -> dict[str, Any] | None:
    """Anomaly-type discovery on the defective test images, for detectors that support it."""
    found = pred.defective
    if not (isinstance(detector, TypeDiscovery) and found and found.get("defects")):
        return None
    start = time.perf_counter()
    out = discover_types(
        torch.cat(found["images"]),
        torch.cat(found["maps"]),
        found["defects"],
        detector.describe_regions,
        n_types=detector.n_types,
        seed=seed,
    )
    out["seconds"] = time.perf_counter() - start
    return out
