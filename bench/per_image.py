"""What a job keeps per test image (``<benchmark>/per_image/<job>.npz``), written at scoring
time and read by the intervals, ``bench compare`` and the HTML report.

Format 1 (``numpy.savez_compressed``; every array in the order of ``ids``, sorted):

- ``format`` int64 [1]; ``ids`` str [N] "<defect>/<file stem>" (the relative path where two
  images share one); ``paths`` str [N] the test file, relative to the record's ``root`` where it
  lies under it; ``labels`` int8 [N] (1 = anomalous); ``defects`` str [N]; ``scores`` float64
  [N] image (object) scores;
- ``aupimo`` float64 [N] per-image AUPIMO, NaN for normal images (pixel maps only);
- ``thumbs`` uint8 [N, 96, 96] each anomaly map area-resized to 96 x 96 and quantised linearly
  over ``thumb_range`` float64 [2] (the job's lowest and highest map value: one colour scale per
  job); ``mask_thumbs`` bool [N, 96, 96] the ground truth (nearest); pixel maps only;
- ``boot_metrics`` str [M]; ``boot`` float64 [B, M] each metric on bootstrap resample b (NaN
  where undefined there); ``boot_seed`` int64 [1]. Resample b takes the same images for every
  job on the same test set with the same seed (:func:`bench.metrics.bootstrap.resample_weights`
  on ``labels``), so two jobs' rows are paired.

No maps and no per-pixel data are kept: 96 x 96 bytes per image for the report, and B x M
values. A bottle job (83 images, 1000 resamples) takes about 0.4 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.evaluation import Evaluator, PointEvaluator
from bench.evaluation_ad2 import AD2Evaluator
from bench.evaluation_loco import LocoEvaluator
from bench.metrics.bootstrap import Bootstrap, bootstrap_metrics, resample_weights

FORMAT = 1
THUMB = 96


@dataclass
class PerImage:
    """The arrays of a per-image file (``thumbs``/``mask_thumbs``/``aupimo``: None for clouds)."""

    ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    defects: np.ndarray
    scores: np.ndarray
    boot_metrics: list[str]
    boot: np.ndarray
    boot_seed: int
    aupimo: np.ndarray | None = None
    thumbs: np.ndarray | None = None
    mask_thumbs: np.ndarray | None = None
    thumb_range: np.ndarray | None = None

    def boot_of(self, metric: str) -> np.ndarray | None:
        """The resampled values [B] of ``metric``, or None when it was not resampled."""
        if metric not in self.boot_metrics:
            return None
        return self.boot[:, self.boot_metrics.index(metric)]


def collect(
    evaluator: Evaluator | PointEvaluator, root: str | None, resamples: int, seed: int
) -> tuple[PerImage, Bootstrap]:
    """The per-image data and the bootstrap of a scored evaluator (after ``compute``), images
    sorted by id."""
    names = list(evaluator.ids)
    if len(set(names)) != len(names):  # e.g. nested folders: the paths tell the images apart
        names = [_relative(p, root) for p in evaluator.paths]
    order = sorted(range(len(names)), key=lambda i: names[i])
    ids = np.array([names[i] for i in order], dtype=str)
    labels = np.array([evaluator.labels[i] for i in order], dtype=np.int8)
    scores = np.array([evaluator.scores[i] for i in order], dtype=np.float64)
    pixel = isinstance(evaluator, Evaluator)
    loco = isinstance(evaluator, LocoEvaluator)
    aupimo = None
    if pixel and evaluator.aupimo is not None:
        aupimo = np.asarray(evaluator.aupimo, dtype=np.float64)[order]
    boot = bootstrap_metrics(
        scores,
        labels,
        resamples,
        seed,
        maps=[evaluator.maps[i] for i in order] if pixel else None,
        masks=[evaluator.masks[i] for i in order] if pixel else None,
        pro_limits={"au_pro": evaluator.pro_limit, **evaluator.more_pro_limits} if pixel else None,
        point_scores=None if pixel else [evaluator.point_scores[i] for i in order],
        point_labels=None if pixel else [evaluator.point_labels[i] for i in order],
        aupimo=aupimo,
        channels=[evaluator.channels[i] for i in order] if loco else None,
        spro_limits=evaluator.spro_limits if loco else None,
    )
    if isinstance(evaluator, AD2Evaluator):  # MVTec AD 2's metrics at the chosen threshold
        names, values = threshold_replicates(
            [evaluator.maps[i] for i in order],
            [evaluator.masks[i] for i in order],
            labels,
            evaluator.threshold,
            resample_weights(labels, resamples, seed),
        )
        boot.names, boot.values = boot.names + names, np.hstack([boot.values, values])
    per_image = PerImage(
        ids=ids,
        paths=np.array([_relative(evaluator.paths[i], root) for i in order], dtype=str),
        labels=labels,
        defects=np.array([evaluator.defects[i] for i in order], dtype=str),
        scores=scores,
        boot_metrics=boot.names,
        boot=boot.values,
        boot_seed=seed,
        aupimo=aupimo,
    )
    if pixel:
        per_image.thumbs, per_image.thumb_range, per_image.mask_thumbs = thumbnails(
            [evaluator.maps[i] for i in order], [evaluator.masks[i] for i in order]
        )
    return per_image, boot


def threshold_replicates(maps, masks, labels, threshold: float, weights: np.ndarray):
    """SegF1, its precision and recall, and ClassF1 (:mod:`bench.metrics.segf1`) at a fixed
    threshold on each resample: pooled pixel counts and image counts are weighted sums of
    per-image counts, so each resample is exact."""
    names = ["seg_f1", "seg_precision", "seg_recall", "class_f1"]
    if math.isnan(threshold):
        return names, np.full((weights.shape[0], len(names)), np.nan)
    counts = np.zeros((len(maps), 4))  # per image: TP, FP, FN pixels; called anomalous
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        pred = amap > threshold
        gt = mask.to(pred.device, torch.bool)
        hit = int((pred & gt).sum())
        counts[i] = hit, int(pred.sum()) - hit, int(gt.sum()) - hit, bool(pred.any())
    tp, fp, fn = (weights @ counts[:, k] for k in range(3))
    y, called = labels.astype(bool), counts[:, 3].astype(bool)
    itp, ifp, ifn = (weights @ (a & b) for a, b in ((called, y), (called, ~y), (~called, y)))
    with np.errstate(invalid="ignore", divide="ignore"):
        defined = tp + fn > 0
        out = np.stack(
            [
                np.where(defined, 2 * tp / (2 * tp + fp + fn), np.nan),
                np.where(tp + fp > 0, tp / (tp + fp), 0.0),
                np.where(defined, tp / (tp + fn), np.nan),
                np.where(weights @ y > 0, 2 * itp / (2 * itp + ifp + ifn), np.nan),
            ],
            axis=1,
        )
    return names, out


def _relative(path: str, root: str | None) -> str:
    if root is None:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def thumbnails(maps: list[torch.Tensor], masks: list[torch.Tensor]):
    """(uint8 [N, 96, 96] maps on one linear scale, float64 [2] its range, bool masks)."""
    small = torch.stack(
        [
            F.interpolate(m.float().cpu()[None, None], size=(THUMB, THUMB), mode="area")[0, 0]
            for m in maps
        ]
    )
    low = float(min(m.min() for m in maps))
    high = float(max(m.max() for m in maps))
    scale = 255.0 / (high - low) if high > low else 0.0
    thumbs = ((small - low) * scale).round().clamp(0, 255).to(torch.uint8).numpy()
    mask_thumbs = torch.stack(
        [
            F.interpolate(m.float().cpu()[None, None], size=(THUMB, THUMB), mode="nearest")[0, 0]
            for m in masks
        ]
    ).bool()
    return thumbs, np.array([low, high]), mask_thumbs.numpy()


def save(path: Path, data: PerImage) -> None:
    """Writes a per-image file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "format": np.array([FORMAT]),
        "ids": data.ids,
        "paths": data.paths,
        "labels": data.labels,
        "defects": data.defects,
        "scores": data.scores,
        "boot_metrics": np.array(data.boot_metrics, dtype=str),
        "boot": data.boot,
        "boot_seed": np.array([data.boot_seed]),
    }
    for name in ("aupimo", "thumbs", "mask_thumbs", "thumb_range"):
        if getattr(data, name) is not None:
            arrays[name] = getattr(data, name)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load(path: Path) -> PerImage:
    """Reads a per-image file; ValueError naming it when it is not one of this format."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable per-image file ({err})") from err
    version = int(arrays.get("format", [0])[0])
    if version != FORMAT:
        raise ValueError(f"{path}: per-image format {version}, this version reads {FORMAT}")
    return PerImage(
        ids=arrays["ids"],
        paths=arrays["paths"],
        labels=arrays["labels"],
        defects=arrays["defects"],
        scores=arrays["scores"],
        boot_metrics=[str(m) for m in arrays["boot_metrics"]],
        boot=arrays["boot"],
        boot_seed=int(arrays["boot_seed"][0]),
        aupimo=arrays.get("aupimo"),
        thumbs=arrays.get("thumbs"),
        mask_thumbs=arrays.get("mask_thumbs"),
        thumb_range=arrays.get("thumb_range"),
    )
