"""The one independent reference implementation of each reported metric, for every test.

Not a test module, and not the harness's code (``bench.metrics``): tests compare the harness
against these. tests/conftest.py puts this folder on ``sys.path`` (pytest's importlib mode puts
no test folder there), so tests import it as ``from reference_metrics import ...``.

- AUROC and AP (image, pixel, point): scikit-learn's ``roc_auc_score`` and
  ``average_precision_score`` (tests may call scikit-learn directly: it is the same reference);
- F1-max (image, pixel, point): the largest F1 over scikit-learn's precision-recall curve;
- AU-PRO: the definition, every distinct score a threshold, its 8-connected regions found by a
  breadth-first search written here (no SciPy, which the harness uses).
- AU-sPRO (MVTec LOCO AD): the definition, every distinct score a threshold, on dense channel
  masks (one bool mask and saturation area per defect).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["au_pro", "au_spro", "auroc", "average_precision", "f1_max", "regions_8"]


def auroc(labels, scores) -> float:
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def average_precision(labels, scores) -> float:
    return float(average_precision_score(np.asarray(labels), np.asarray(scores)))


def f1_max(labels, scores) -> float:
    """The largest F1 over every threshold, from scikit-learn's precision-recall curve."""
    p, r, _ = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    return float(np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)))


def regions_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a 2D mask by breadth-first search (independent of SciPy)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        comp, queue = [], deque([(r, c)])
        seen[r, c] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if (
                        0 <= v < mask.shape[0]
                        and 0 <= u < mask.shape[1]
                        and mask[v, u]
                        and not seen[v, u]
                    ):
                        seen[v, u] = True
                        queue.append((v, u))
        out.append(comp)
    return out


def au_pro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """AU-PRO by its definition (float64): every distinct score t is a threshold; FPR(t) the
    share of all defect-free pixels scoring >= t, PRO(t) the mean over the 8-connected defect
    regions of each region's share scoring >= t; the curve starts at (0, 0); trapezoids up to
    FPR = ``limit``, PRO interpolated linearly there; the area divided by ``limit``."""
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    regions = [
        np.sort(np.array([amap[p] for p in comp]))
        for amap, mask in zip(maps, masks)
        for comp in regions_8(mask)
    ]
    thresholds = np.unique(maps)[::-1]

    def share_at_or_above(sorted_values: np.ndarray) -> np.ndarray:
        return 1 - np.searchsorted(sorted_values, thresholds, side="left") / len(sorted_values)

    fpr = np.r_[0.0, share_at_or_above(np.sort(maps[~masks]))]
    pro = np.r_[0.0, np.mean([share_at_or_above(r) for r in regions], axis=0)]
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], pro[:-1], fpr[1:], pro[1:]):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:  # the segment that crosses the limit, cut there
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (limit - x0)
    return float(area / limit)


def au_spro(maps, channels, limit: float = 0.05) -> float:
    """AU-sPRO by its definition (float64, dense): ``maps`` one [H,W] array per image (sizes may
    differ), ``channels`` per image a list of (bool mask [H,W], saturation area s). Every
    distinct score t is a threshold; sPRO(t) the mean over all channels of min(#pixels of the
    channel scoring >= t, s) / s; FPR(t) the share of the pixels outside every channel of their
    image (all images) scoring >= t; the curve starts at (0, 0); trapezoids up to ``limit``,
    sPRO interpolated linearly there; the area divided by ``limit``."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]

    def count_at_or_above(values: np.ndarray) -> np.ndarray:
        values = np.sort(values)
        return len(values) - np.searchsorted(values, thresholds, side="left")

    spros, negatives = [], []
    for amap, mine in zip(maps, channels):
        defect_free = np.ones(amap.shape, dtype=bool)
        for mask, s in mine:
            spros.append(np.minimum(count_at_or_above(amap[mask]), s) / s)
            defect_free &= ~mask
        negatives.append(amap[defect_free])
    negatives = np.concatenate(negatives)
    fpr = np.r_[0.0, count_at_or_above(negatives) / negatives.size]
    spro = np.r_[0.0, np.mean(spros, axis=0)]
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], spro[:-1], fpr[1:], spro[1:]):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:  # the segment that crosses the limit, cut there
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (limit - x0)
    return float(area / limit)
