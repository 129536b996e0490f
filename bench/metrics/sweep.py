"""Pixel curve metrics accumulated over the events (:mod:`bench.metrics.events`) block by block,
in descending score order: the ROC (AUROC, AP, F1-max), the area under an overlap curve (PRO,
sPRO) up to false-positive-rate limits, and curve points for plotting. Only one block of
per-event increments is held at a time (float64), never arrays over every event."""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.metrics.curves import CURVE_POINTS, evenly_spaced


def _running(carry: float, d: np.ndarray) -> np.ndarray:
    """``carry`` plus the cumulative sum of ``d`` (torch's, several times NumPy's speed)."""
    return torch.cumsum(torch.from_numpy(np.concatenate([[carry], d])), 0).numpy()[1:]


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products by NumPy's own loop (BLAS's threads can stall on a busy machine)."""
    return float(np.einsum("i,i->", a, b))


class BoundedArea:
    """Area under y(x) for x in [0, ``limit``], y interpolated linearly at the limit (the
    official rule, as :func:`bench.metrics.curves.trapezoid_to`), fed a curve's points from
    (0, 0) on, block by block; x non-decreasing."""

    def __init__(self, limit: float) -> None:
        self.limit, self.area, self.x, self.y, self.done = limit, 0.0, 0.0, 0.0, False

    def feed(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.done:
            return
        n = int(np.searchsorted(x, self.limit, side="right"))  # points up to the limit
        if n:
            dx = np.diff(x[:n], prepend=self.x)
            ys = np.concatenate([[self.y], y[:n]])
            self.area += 0.5 * float(_dot(ys[1:], dx) + _dot(ys[:-1], dx))
            self.x, self.y = float(x[n - 1]), float(y[n - 1])
        if n < x.size:
            self.done = True
            if self.x < self.limit:  # the segment crossing the limit, cut there
                x0, y0, x1, y1, to = self.x, self.y, float(x[n]), float(y[n]), self.limit
                self.area += 0.5 * (y0 + y0 + (y1 - y0) * (to - x0) / (x1 - x0)) * (to - x0)

    def value(self) -> float:
        return self.area / self.limit


class Sweep:
    """Accumulates the curve metrics of one image subset from blocks of per-event increments
    (float64, descending scores): ``positives`` and ``negatives`` in all, ``weight`` what the
    overlap is divided by (regions, channels), ``limits`` metric name -> FPR limit of the
    overlap area, ``roc`` whether positives are fed (AUROC, AP, F1-max), ``points`` the number
    of curve points (events + 1) to thin for plotting (0: none)."""

    def __init__(
        self,
        positives: int,
        negatives: int,
        weight: float,
        limits: dict[str, float],
        roc: bool = True,
        points: int = 0,
    ) -> None:
        self.positives, self.negatives, self.weight = float(positives), float(negatives), weight
        self.tp = self.fp = self.w = 0.0
        self.ap, self.f1 = 0.0, -math.inf
        self.roc = roc and positives > 0 and negatives > 0
        self.roc_sum = 0.0  # twice the area under the ROC curve of counts (TP over FP)
        self.with_steps = roc and positives > 0
        defined = weight > 0 and negatives > 0
        self.areas = {name: BoundedArea(to) for name, to in limits.items()} if defined else {}
        self.nan = {name: math.nan for name in limits}
        self.keep = evenly_spaced(points, CURVE_POINTS).numpy() if points else np.zeros(0, int)
        self.fed = 0  # events so far
        start = [0.0] if self.keep.size else []  # the curves' first point: (0, 0), PRO 0
        self.curve = {name: list(start) for name in ("fpr", "tpr", "pro")}

    def add(self, d_neg: np.ndarray, d_pos: np.ndarray | None, d_w: np.ndarray) -> None:
        """One block of per-event increments (contiguous float64, descending scores)."""
        fp, w = _running(self.fp, d_neg), _running(self.w, d_w)
        tp = _running(self.tp, d_pos) if d_pos is not None else None
        if self.with_steps:
            step = d_pos > 0  # AP and the F1 maximum only move where positives are added
            tp_s, fp_s = tp[step], fp[step]
            self.ap += float(np.sum(d_pos[step] / self.positives * tp_s / (tp_s + fp_s)))
            if tp_s.size:
                f1 = 2 * tp_s / (tp_s + fp_s + self.positives)
                self.f1 = max(self.f1, float(f1.max()))
        if self.roc:  # each event's negatives times TP before it plus TP after it
            self.roc_sum += float(2 * _dot(d_neg, tp) - _dot(d_neg, d_pos))
        open_limits = [a.limit for a in self.areas.values() if not a.done]
        if open_limits:  # the points up to the largest open limit, and the one after it
            reach = max(open_limits) * self.negatives * (1 + 1e-9)
            n = int(np.searchsorted(fp, reach, side="right")) + 1
            x = np.clip(fp[:n] / self.negatives, 0, 1)
            y = np.clip(w[:n] / self.weight, 0, 1)
            for area in self.areas.values():
                area.feed(x, y)
        self._points(fp, tp, w)
        self.fed += d_neg.size
        self.fp, self.w = float(fp[-1]), float(w[-1])
        self.tp = float(tp[-1]) if tp is not None else 0.0

    def _points(self, fp, tp, w) -> None:
        lo, hi = np.searchsorted(self.keep, [self.fed + 1, self.fed + fp.size + 1])
        at = self.keep[lo:hi] - self.fed - 1
        if at.size:
            pro = np.clip(w[at] / max(self.weight, 1), 0, 1)
            for name, values in (
                ("fpr", fp[at] / max(self.negatives, 1)),
                ("tpr", tp[at] / max(self.positives, 1)),
                ("pro", pro),
            ):
                self.curve[name].extend(round(float(v), 6) for v in values)

    def roc_metrics(self) -> dict[str, float]:
        """Pixel AUROC, AP and F1-max; NaN where undefined."""
        auroc = self.roc_sum / (2 * self.positives * self.negatives) if self.roc else math.nan
        ap, f1 = (self.ap, self.f1) if self.with_steps else (math.nan, math.nan)
        return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1max": f1}

    def overlap_areas(self) -> dict[str, float]:
        """The normalised area up to each limit; NaN where undefined."""
        return {name: a.value() for name, a in self.areas.items()} if self.areas else self.nan


def block_negatives(neg: np.ndarray, chosen: list[int], a: int, b: int) -> np.ndarray:
    """The defect-free pixels of groups ``chosen`` in events a..b-1, descending (float64)."""
    total = np.zeros(b - a, dtype=np.int64)
    for g in chosen:
        total += neg[g, a:b]
    return total[::-1].astype(np.float64)


def at_equal_events(values: np.ndarray, a: int, b: int) -> np.ndarray:
    """Per-distinct-score ``values`` placed at the events "equal to u_k" of events a..b-1
    (ascending ids, ``a`` even), zero elsewhere, descending (float64)."""
    out = np.zeros(b - a)
    out[::-1][1::2] = values
    return out
