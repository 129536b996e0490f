"""Confidence intervals of every metric by a stratified bootstrap over test images.

Resample b takes as many good images as the test set has, drawn with replacement from the good
ones, and as many anomalous from the anomalous ones (:func:`resample_weights`: how often each
image is taken). The draws depend only on the seed and the labels in the order given, so every
job scored on the same test set (images in the same order: the per-image files sort them by id)
with the same seed sees the same resamples, and two jobs' values are paired resample by
resample. Each metric is recomputed exactly on each resample, pixel metrics and AU-PRO included,
from per-image counts (:mod:`bench.metrics.curve_stats`, :mod:`bench.metrics.resample_sweep`);
the interval is the percentile interval of the resampled values. The mean AUPIMO is the mean of
the resampled anomalous images' per-image AUPIMO (each image's value kept fixed, as its authors
treat per-image scores as samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.metrics.curve_stats import image_curve_stats, pixel_curve_stats
from bench.metrics.resample_sweep import sweep_resamples
from bench.metrics.significance import percentile_interval

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
METHOD = "stratified percentile bootstrap over test images"


def resample_weights(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, N] float64: how often resample b takes image i, drawn within each class."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    n = labels.size
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, n))
    for members in (np.flatnonzero(~labels), np.flatnonzero(labels)):
        if members.size == 0:
            continue
        drawn = members[rng.integers(0, members.size, size=(resamples, members.size))]
        rows = np.repeat(np.arange(resamples), members.size)
        np.add.at(weights, (rows, drawn.reshape(-1)), 1.0)
    return weights


@dataclass
class Bootstrap:
    """Each metric's value on every resample (``values`` [B, M], NaN where undefined)."""

    names: list[str]
    values: np.ndarray
    seed: int
    level: float = LEVEL

    @property
    def resamples(self) -> int:
        return self.values.shape[0]

    def intervals(self) -> dict[str, list[float]]:
        """name -> [low, high], the percentile interval at ``level`` (NaN when no resample
        defines the metric)."""
        return {
            name: [float(v) for v in percentile_interval(self.values[:, j], self.level)]
            for j, name in enumerate(self.names)
        }

    def record(self) -> dict:
        """The ``ci`` entry of a job record."""
        return {
            "method": METHOD,
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
            "metrics": self.intervals(),
        }


def bootstrap_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    maps: list[torch.Tensor] | None = None,
    masks: list[torch.Tensor] | None = None,
    pro_limits: dict[str, float] | None = None,
    point_scores: list[torch.Tensor] | None = None,
    point_labels: list[torch.Tensor] | None = None,
    aupimo: np.ndarray | None = None,
    level: float = LEVEL,
    channels: list | None = None,
    spro_limits: dict[str, float] | None = None,
) -> Bootstrap:
    """Every metric of the test set on ``resamples`` stratified resamples: image AUROC, AP and
    F1-max; with ``maps``/``masks`` the pixel ones and AU-PRO to each of ``pro_limits`` (name ->
    FPR limit); with ``point_scores``/``point_labels`` the point ones; with ``aupimo`` (per
    image, NaN for good images) its mean; with ``channels`` (MVTec LOCO) AU-sPRO to each of
    ``spro_limits``."""
    weights = resample_weights(labels, resamples, seed)
    names = ["image_auroc", "image_ap", "image_f1max"]
    columns = [sweep_resamples(image_curve_stats(scores, labels), weights)]
    if maps is not None:
        limits = pro_limits or {}
        stats = pixel_curve_stats(maps, masks)
        columns.append(sweep_resamples(stats, weights, tuple(limits.values())))
        names += ["pixel_auroc", "pixel_ap", "pixel_f1max", *limits]
    if channels is not None:  # MVTec LOCO: AU-sPRO to each limit (name -> FPR limit)
        stats = pixel_curve_stats(maps, masks, channels=channels)
        columns.append(sweep_resamples(stats, weights, tuple(spro_limits.values()))[:, 3:])
        names += list(spro_limits)
    if point_scores is not None:
        stats = pixel_curve_stats(point_scores, point_labels, regions=False)
        columns.append(sweep_resamples(stats, weights))
        names += ["point_auroc", "point_ap", "point_f1max"]
    if aupimo is not None:
        aupimo = np.asarray(aupimo, dtype=np.float64)
        valid = np.isfinite(aupimo)
        taken = weights @ valid
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (weights @ np.where(valid, aupimo, 0.0)) / taken
        columns.append(np.where(taken > 0, mean, np.nan)[:, None])
        names.append("aupimo")
    return Bootstrap(names, np.concatenate(columns, axis=1), seed, level)
