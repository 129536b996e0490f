"""The curve metrics of many weightings of the test images at once, from :class:`CurveStats`:
AUROC, AP, F1-max and the normalised overlap (PRO) areas up to FPR limits, per resample exactly
as :class:`bench.metrics.sweep.Sweep` computes them on the resampled set.

Hand-written (numba) because it is the hot loop of the bootstrap: every entry of every event,
for every resample. Resamples are swept ``BLOCK`` at a time, so each entry is read once per
block from memory, and blocks run in parallel on numba's threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from bench.metrics.curve_stats import CurveStats

# numba's own thread pool, not OpenMP: an OpenMP runtime it shared with torch could change the
# threads (and so the float summation order) of the detectors' computations after a bootstrap
numba.config.THREADING_LAYER = "workqueue"

#: resamples swept together over one pass of the entries: reading the entries is most of the
#: sweep's time, so each is read once per block (on bottle, 64 lanes: 2.7x faster than 16)
BLOCK = 64
#: the columns of :func:`sweep_resamples` before the overlap areas
ROC_COLUMNS = ("auroc", "ap", "f1max")


@numba.njit(cache=True)
def _weighted(start, image, count, e, wt, out):
    """``out[r]`` = sum over the entries of event e of wt[image, r] * count."""
    out[:] = 0.0
    for j in range(start[e], start[e + 1]):
        c = count[j]
        row = wt[image[j]]
        for r in range(BLOCK):
            out[r] += row[r] * c


@numba.njit(parallel=True, cache=True)
def _sweep(neg, pos, wt, totals, limits, out):
    """``neg``/``pos``: (start, image, count, overlap) entry lists; ``wt`` [blocks, N, BLOCK]
    weights; ``totals`` [3, N]: negatives, positives, regions per image."""
    n_blocks, n_images, _ = wt.shape
    n_limits, n_events = limits.size, neg[0].size - 1
    for blk in numba.prange(n_blocks):
        w = wt[blk]
        big_n, big_p, regions = np.zeros(BLOCK), np.zeros(BLOCK), np.zeros(BLOCK)
        for i in range(n_images):
            for r in range(BLOCK):
                big_n[r] += w[i, r] * totals[0, i]
                big_p[r] += w[i, r] * totals[1, i]
                regions[r] += w[i, r] * totals[2, i]
        inv_n = 1.0 / np.maximum(big_n, 1e-300)
        inv_reg = 1.0 / np.maximum(regions, 1e-300)
        tp, fp, cov = np.zeros(BLOCK), np.zeros(BLOCK), np.zeros(BLOCK)
        roc, ap, f1 = np.zeros(BLOCK), np.zeros(BLOCK), np.zeros(BLOCK)
        xa, ya = np.zeros(BLOCK), np.zeros(BLOCK)
        area = np.zeros((n_limits, BLOCK))
        dn, dp, dw = np.zeros(BLOCK), np.zeros(BLOCK), np.zeros(BLOCK)
        reach = limits.max() if n_limits else -1.0
        overlap_open = n_limits > 0
        x, y = np.zeros(BLOCK), np.zeros(BLOCK)
        for e in range(n_events):
            _weighted(neg[0], neg[1], neg[2], e, w, dn)
            if pos[0][e + 1] > pos[0][e]:
                _weighted(pos[0], pos[1], pos[2], e, w, dp)
                _weighted(pos[0], pos[1], pos[3], e, w, dw)
                for r in range(BLOCK):  # AP and F1 move only where positives are added
                    roc[r] += dn[r] * (2.0 * tp[r] + dp[r])
                    tp[r] += dp[r]
                    fp[r] += dn[r]
                    cov[r] += dw[r]
                    seen = max(tp[r] + fp[r], 1e-300)
                    ap[r] += dp[r] * tp[r] / seen
                    f1[r] = max(f1[r], 2.0 * tp[r] / (seen + big_p[r]))
            else:
                for r in range(BLOCK):
                    roc[r] += dn[r] * 2.0 * tp[r]
                    fp[r] += dn[r]
            if not overlap_open:
                continue
            for r in range(BLOCK):
                x[r] = min(fp[r] * inv_n[r], 1.0)
                y[r] = min(cov[r] * inv_reg[r], 1.0)
            past = True
            for m in range(n_limits):
                lim = limits[m]
                crossing = False
                for r in range(BLOCK):  # the trapezoids below the limit (branch-free)
                    inside = 1.0 if x[r] <= lim else 0.0
                    area[m, r] += inside * 0.5 * (ya[r] + y[r]) * (x[r] - xa[r])
                    crossing |= x[r] > lim and xa[r] < lim
                if crossing:  # a segment crossing the limit, cut there
                    for r in range(BLOCK):
                        if x[r] > lim and xa[r] < lim:
                            y_at = ya[r] + (y[r] - ya[r]) * (lim - xa[r]) / (x[r] - xa[r])
                            area[m, r] += 0.5 * (ya[r] + y_at) * (lim - xa[r])
            for r in range(BLOCK):
                past = past and (x[r] > reach or big_n[r] == 0)
                xa[r], ya[r] = x[r], y[r]
            overlap_open = not past
        for r in range(BLOCK):
            b = blk * BLOCK + r
            if b >= out.shape[0]:
                break
            has_p, has_n = big_p[r] > 0, big_n[r] > 0
            out[b, 0] = roc[r] / (2.0 * big_p[r] * big_n[r]) if has_p and has_n else math.nan
            out[b, 1] = ap[r] / big_p[r] if has_p else math.nan
            out[b, 2] = f1[r] if has_p else math.nan
            for m in range(n_limits):
                defined = regions[r] > 0 and has_n
                out[b, 3 + m] = area[m, r] / limits[m] if defined else math.nan


def sweep_resamples(
    stats: CurveStats, weights: np.ndarray, limits: tuple[float, ...] = ()
) -> np.ndarray:
    """[B, 3 + len(limits)]: AUROC, AP, F1-max and the overlap area to each FPR limit of each
    weighting (``weights`` [B, n_images], e.g. how often a resample takes each image); NaN where
    a value is undefined (no positive, no negative, no region)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != stats.n_images:
        raise ValueError(f"weights must be [B, {stats.n_images}], got {weights.shape}")
    n = weights.shape[0]
    blocks = -(-n // BLOCK)
    padded = np.zeros((blocks * BLOCK, stats.n_images))
    padded[:n] = weights
    wt = np.ascontiguousarray(padded.reshape(blocks, BLOCK, -1).transpose(0, 2, 1))
    out = np.empty((n, 3 + len(limits)))
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    lists = [(x.start, x.image, x.count, x.overlap) for x in (stats.negatives, stats.positives)]
    totals = np.stack([stats.image_negatives, stats.image_positives, stats.image_regions])
    _sweep(*lists, wt, totals, np.asarray(limits, dtype=np.float64), out)
    return out
