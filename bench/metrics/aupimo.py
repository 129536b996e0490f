"""AUPIMO, the area under the per-image overlap curve (Bertoldo et al., "AUPIMO: Redefining
Visual Anomaly Detection Benchmarks with High Speed and Low Tolerance", 2024), exactly.

Definition (the paper; anomalib 2.7 ``anomalib.metrics.pimo``, from github.com/jpcbertoldo/aupimo).
A pixel is predicted anomalous at threshold ``t`` when its score is ``>= t``. The shared FPR is
measured on the normal images only: ``F(t)`` = the mean over normal images of each image's
fraction of pixels scoring ``>= t``. Each anomalous image ``i`` has ``T_i(t)`` = the fraction of
its defective pixels scoring ``>= t``. Its PIMO curve is ``(F(t), T_i(t))`` over the thresholds,
and AUPIMO_i = integral of ``T_i`` over ``log10 F`` from ``log10 L`` to ``log10 U``, divided by
``log10(U / L)`` (so it lies in [0, 1]; the log's base cancels). Normal images get NaN.

What is integrated here, exactly: every distinct score is a threshold, consecutive curve points
are joined by straight lines in (log10 F, T) (the trapezoid rule in log FPR), and the curve is
cut at exactly ``F = L`` and ``F = U``, ``T`` interpolated linearly in log10 F there. Between two
consecutive distinct normal scores ``F`` does not move, so the curve is a chain of segments, one
per distinct normal score ``s``: from ``(log10 F(>s), T_i(>s))`` to ``(log10 F(>=s), T_i(>=s))``
(defective pixels tied with ``s`` make it slope; vertical steps add no area). Only the normal
scores whose segment meets ``[L, U]`` matter, and they lie in each normal image's top
``U * n_normal`` fraction of pixels: each normal image is partially selected
(``np.partition``), never sorted; each anomalous image sorts only its defective scores and is
read with ``np.searchsorted``. Memory beyond the maps: one map's worth of work arrays, plus a
pool of the top normal scores (about ``U * n_normal`` normal pixels' worth, cut as it grows).

Where anomalib 2.7 differs numerically (``aupimo_scores`` there, 300,000 thresholds):
- it uses a linear grid of thresholds between the lowest and highest normal score, not every
  distinct score, so the curve is sampled: how many grid points fall in [L, U] depends on how
  far the top tail of the normal scores spreads (results/perf/aupimo.md);
- it snaps each bound to the grid threshold whose shared FPR is closest to it and integrates
  between those, without interpolating at ``L`` and ``U``, yet divides by ``log(U / L)``; it
  refuses a range holding 30 grid points or fewer and warns under 300;
- it tells images apart by their masks: an anomalous image whose mask is empty counts as a
  normal image (its pixels enter the shared FPR). Here labels decide: such an image gets NaN,
  stays out of the shared FPR and is listed in ``AupimoResult.empty_masks``;
- it needs maps of one size; here sizes may differ (each normal image's FPR uses its own pixel
  count, as the definition's per-image mean says).
Both use ``score >= t``, a mean of per-image FPRs, and clip the result to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

FPR_BOUNDS = (1e-5, 1e-4)


class AupimoUndefined(ValueError):
    """AUPIMO cannot be computed on these images (no normal or anomalous image, or the shared
    FPR never falls to the lower bound); the inputs themselves are well formed."""


@dataclass(frozen=True)
class AupimoResult:
    """Per-image AUPIMO and the shared-FPR curve it was integrated on."""

    #: float64 [N]: AUPIMO per image, NaN for normal images and anomalous ones without defect
    aupimo: np.ndarray
    fpr_bounds: tuple[float, float]
    #: the score thresholds where the shared FPR reaches the lower and the upper bound: the
    #: highest thresholds whose shared FPR is at least the bound
    thresholds: tuple[float, float]
    #: the shared FPR at those two thresholds (each at least its bound)
    shared_fpr_at_thresholds: tuple[float, float]
    #: the distinct normal scores from ``thresholds[0]`` down to ``thresholds[1]`` (descending)
    #: and the shared FPR at each (ascending): the curve's x-axis over the integration range
    curve_thresholds: np.ndarray = field(repr=False)
    curve_shared_fpr: np.ndarray = field(repr=False)
    num_normal: int = 0
    num_anomalous: int = 0
    #: indices of anomalous images whose mask has no defective pixel (their AUPIMO is NaN)
    empty_masks: tuple[int, ...] = ()

    @property
    def mean(self) -> float:
        """Mean AUPIMO over the anomalous images that have one (NaN if none)."""
        values = self.aupimo[~np.isnan(self.aupimo)]
        return float(values.mean()) if values.size else math.nan


def aupimo_scores(
    maps: Sequence,
    masks: Sequence,
    labels: Sequence,
    fpr_bounds: tuple[float, float] = FPR_BOUNDS,
) -> AupimoResult:
    """AUPIMO of every image (see the module docstring for the exact definition).

    ``maps``/``masks``: one [H, W] tensor or array per image (sizes may differ between images);
    masks are bool or 0/1. ``labels``: 1 = anomalous, 0 = normal; a normal image's mask must be
    empty. Raises ValueError naming the image for malformed input, and :class:`AupimoUndefined`
    (a ValueError) when the metric is undefined on the data."""
    lower, upper = _check_bounds(fpr_bounds)
    labels_ = _check_labels(labels, len(maps), len(masks))
    normal = [i for i, y in enumerate(labels_) if y == 0]
    anomalous = [i for i, y in enumerate(labels_) if y == 1]
    if not normal or not anomalous:
        missing = "normal" if not normal else "anomalous"
        raise AupimoUndefined(
            f"AUPIMO needs at least one {missing} image (label {int(bool(normal))}), got none"
        )
    values, fpr = _shared_fpr_tail(
        (_normal_scores(maps[i], masks[i], i) for i in normal),
        [math.prod(np.shape(maps[i])) for i in normal],
        upper,
    )
    if fpr[0] > lower:
        raise AupimoUndefined(
            f"the shared FPR never falls to the lower bound {lower:g}: its smallest non-zero value "
            f"is {fpr[0]:.3g} (the highest normal score, {values[0]:.6g}, alone); that needs more "
            f"normal pixels (at least 1/{lower:g} in all) or fewer normal pixels tied at the top"
        )
    s, w_gt, w_ge = _segment_weights(values, fpr, lower, upper)
    out = np.full(len(labels_), np.nan)
    empty = []
    for i in anomalous:
        area = _image_area(maps[i], masks[i], i, s, w_gt, w_ge)
        if area is None:
            empty.append(i)
        else:
            out[i] = min(max(area / math.log10(upper / lower), 0.0), 1.0)
    if len(empty) == len(anomalous):
        raise AupimoUndefined(f"no anomalous image has a defective pixel (images {empty})")
    lo, hi = (min(int(np.searchsorted(fpr, b)), fpr.size - 1) for b in (lower, upper))
    return AupimoResult(
        aupimo=out,
        fpr_bounds=(lower, upper),
        thresholds=(float(values[lo]), float(values[hi])),
        shared_fpr_at_thresholds=(float(fpr[lo]), float(fpr[hi])),
        curve_thresholds=values[lo : hi + 1].copy(),
        curve_shared_fpr=fpr[lo : hi + 1].copy(),
        num_normal=len(normal),
        num_anomalous=len(anomalous),
        empty_masks=tuple(empty),
    )


def _check_bounds(fpr_bounds: tuple[float, float]) -> tuple[float, float]:
    if len(fpr_bounds) != 2:
        raise ValueError(f"fpr_bounds must be (lower, upper), got {fpr_bounds!r}")
    lower, upper = float(fpr_bounds[0]), float(fpr_bounds[1])
    if not 0 < lower < upper <= 1:
        raise ValueError(f"fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds!r}")
    return lower, upper


def _check_labels(labels: Sequence, n_maps: int, n_masks: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if not n_maps == n_masks == arr.size or arr.ndim != 1:
        raise ValueError(
            f"maps, masks and labels must have one entry per image, got {n_maps} maps, "
            f"{n_masks} masks and labels of shape {arr.shape}"
        )
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {np.unique(arr)}")
    return arr.astype(np.int64)


def _scores(a, i: int) -> np.ndarray:
    """Image ``i``'s [H, W] scores as an array (a CPU tensor is viewed, not copied)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(
            f"map {i} must be a non-empty 2-D float [H, W] map, got {a.dtype} {a.shape}"
        )
    if not (np.isfinite(a.min()) and np.isfinite(a.max())):  # min/max propagate NaN
        raise ValueError(f"map {i} has NaN or infinite scores")
    return a


def _mask(m, scores: np.ndarray, i: int) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    if m.shape != scores.shape:
        raise ValueError(f"mask {i} has shape {m.shape} but its map has {scores.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"mask {i} must be bool or 0/1, got values {np.unique(m)[:5]}")
        m = m != 0
    return m


def _normal_scores(map_, mask, i: int) -> np.ndarray:
    """Normal image ``i``'s scores, flat, after checking that its mask is empty."""
    scores = _scores(map_, i)
    if _mask(mask, scores, i).any():
        raise ValueError(f"image {i} is labelled normal (0) but its mask has defective pixels")
    return scores.ravel()


def _shared_fpr_tail(
    normal: Iterable[np.ndarray], pixels: list[int], upper: float
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct normal scores, descending; shared FPR ``F(>= s)`` at each, ascending) for every
    distinct normal score ``s`` down to the first with ``F(>= s) >= upper``, exactly.

    A normal score whose segment meets ``[.., upper]`` has ``F(> s) < upper``, so fewer than
    ``upper * n * P_j`` pixels of image ``j`` above it: only each image's top ``k_j`` pixels
    (``np.partition``, never a sort) can be such scores. The pool of those (value, count,
    image size) is cut as it grows to the scores whose summed FPR stays below ``upper``."""
    n = len(pixels)
    sizes = sorted(set(pixels))  # each normal image's scores are read once, one at a time
    pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    kept = 0
    for a in normal:
        p = a.size
        k = min(p, int(upper * n * p) + 2)
        top = np.partition(a, p - k)[p - k :]
        kth = top[0]  # the k-th largest: every pixel above it is in ``top``, ties at it may not
        above = top[top > kth]
        vals = np.append(above, kth).astype(np.float64)
        cnts = np.ones(vals.size, dtype=np.int64)
        cnts[-1] = np.count_nonzero(a == kth)
        pool.append((vals, cnts, np.full(vals.size, sizes.index(p))))
        if sum(v.size for v, _, _ in pool) > 2 * kept + 65536:
            pool = [_cut(pool, sizes, n, upper)]
            kept = pool[0][0].size
    vals, cnts, grps = _cut(pool, sizes, n, upper)
    uniq, inv = np.unique(vals, return_inverse=True)  # ascending
    fpr = np.zeros(uniq.size)
    for g, p in enumerate(sizes):  # integer counts per image size: F exact to rounding
        sel = grps == g
        count = np.bincount(inv[sel], weights=cnts[sel], minlength=uniq.size)
        fpr += np.cumsum(count[::-1]) / (n * p)
    return uniq[::-1], fpr


def _cut(pool, sizes: list[int], n: int, upper: float):
    """The pooled (values, counts, size groups), keeping only scores ``>=`` the highest score
    whose pooled ``F(>= s)`` reaches ``upper``: lower scores have ``F(> s) >= upper``."""
    vals, cnts, grps = (np.concatenate(x) for x in zip(*pool))
    order = np.argsort(-vals, kind="stable")
    weight = cnts[order] / (n * np.asarray(sizes, dtype=np.float64)[grps[order]])
    reach = int(np.searchsorted(np.cumsum(weight), upper * (1 + 1e-9), side="left"))
    if reach >= vals.size:
        return vals, cnts, grps
    keep = vals >= vals[order[reach]]
    return vals[keep], cnts[keep], grps[keep]


def _segment_weights(
    values: np.ndarray, fpr: np.ndarray, lower: float, upper: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores ``s``, ``w_gt``, ``w_ge``) of the segments meeting ``[lower, upper]``, such that
    the integral over log10 F is ``sum(w_gt * T(> s) + w_ge * T(>= s))`` for any image."""
    prev = np.concatenate([[0.0], fpr[:-1]])
    meet = (prev < upper) & (fpr > lower)
    x0, x1 = np.log10(prev[meet]), np.log10(fpr[meet])  # prev > 0: fpr[0] <= lower
    a = np.maximum(x0, math.log10(lower))
    b = np.minimum(x1, math.log10(upper))
    mid = ((a - x0) + (b - x0)) / (2 * (x1 - x0))  # where the trapezoid's mean height sits
    return values[meet], (b - a) * (1 - mid), (b - a) * mid


def _image_area(map_, mask, i: int, s, w_gt, w_ge) -> float | None:
    """The integral over log10 F of image ``i``'s TPR (None when it has no defective pixel)."""
    scores = _scores(map_, i)
    defective = np.sort(scores[_mask(mask, scores, i)]).astype(np.float64)
    q = defective.size
    if q == 0:
        return None
    n_ge = q - np.searchsorted(defective, s, side="left")
    n_gt = q - np.searchsorted(defective, s, side="right")
    return float(w_gt @ n_gt + w_ge @ n_ge) / q
