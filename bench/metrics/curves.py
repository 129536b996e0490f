"""ROC and precision-recall curves from per-threshold increments: image- and point-level
AUROC, AP and F1-max, the bounded trapezoid of AU-PRO, and curves thinned for plotting."""

from __future__ import annotations

import math

import torch


def _roc_pr(d_pos: torch.Tensor, d_neg: torch.Tensor) -> tuple[float, float, float, torch.Tensor]:
    """(AUROC, AP, F1-max, cumulative FP) from the positives and negatives that each threshold
    adds, thresholds in descending order (float64). Undefined values are NaN."""
    positives, negatives = float(d_pos.sum()), float(d_neg.sum())
    zero = torch.zeros(1, dtype=torch.float64, device=d_pos.device)
    tp = torch.cat([zero, torch.cumsum(d_pos, 0)])
    fp = torch.cat([zero, torch.cumsum(d_neg, 0)])
    auroc = ap = f1 = math.nan
    if positives > 0:
        step = d_pos > 0  # AP and the F1 maximum only move where positives are added
        tp_s, fp_s = tp[1:][step], fp[1:][step]
        ap = float(torch.sum(d_pos[step] / positives * tp_s / (tp_s + fp_s)))
        f1 = float((2 * tp_s / (tp_s + fp_s + positives)).max())
        if negatives > 0:
            auroc = float(torch.trapezoid(tp / positives, fp / negatives))
    return auroc, ap, f1, fp


def _increments(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives added at each distinct score, scores descending."""
    _, inverse = torch.unique(scores.reshape(-1), sorted=True, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    pos = target.reshape(-1).to(torch.float64)
    d_pos = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, pos)
    d_neg = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, 1.0 - pos)
    return d_pos.flip(0), d_neg.flip(0)


def image_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    auroc_, ap, f1, _ = _roc_pr(*_increments(scores.to(torch.float64).cpu(), labels.cpu()))
    return {"image_auroc": auroc_, "image_ap": ap, "image_f1max": f1}


def point_metrics(
    scores: list[torch.Tensor], labels: list[torch.Tensor], curves: dict | None = None
) -> dict[str, float]:
    """Point-level AUROC, AP and F1-max over every point of unorganised clouds (one score and
    one bool label per point), as Real3D-AD and Anomaly-ShapeNet report them. AU-PRO is not
    defined here: regions of unorganised clouds are not the 8-connected pixel regions of the
    MVTec definition. ``curves`` receives the thinned ROC curve (fpr, tpr)."""
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64).cpu() for s in scores])
    d_pos, d_neg = _increments(flat, torch.cat([y.reshape(-1).cpu() for y in labels]))
    auroc_, ap, f1, _ = _roc_pr(d_pos, d_neg)
    if curves is not None:
        curves.update(_curve_points(d_pos, d_neg))
    return {"point_auroc": auroc_, "point_ap": ap, "point_f1max": f1}


def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    return image_metrics(scores, target)["image_auroc"]


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return image_metrics(scores, target)["image_ap"]


def f1_max(scores: torch.Tensor, target: torch.Tensor) -> float:
    return image_metrics(scores, target)["image_f1max"]


def trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Area under y(x) for x in [0, x_max]; y linearly interpolated at x_max (official rule)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    correction = 0.0
    if not bool((x == x_max).any()):
        ins = int(torch.searchsorted(x, torch.tensor(x_max, dtype=x.dtype, device=x.device)))
        if 0 < ins < x.numel():
            x0, x1, y0, y1 = float(x[ins - 1]), float(x[ins]), float(y[ins - 1]), float(y[ins])
            correction = 0.5 * (y0 + y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction


CURVE_POINTS = 512


def _curve_points(d_pos, d_neg, d_pro=None, regions: int = 0) -> dict[str, list[float]]:
    """The ROC (and PRO) curves from (0,0), every threshold, thinned evenly for plotting."""
    zero = torch.zeros(1, dtype=torch.float64, device=d_pos.device)
    fp, tp = (torch.cat([zero, torch.cumsum(d, 0)]) for d in (d_neg, d_pos))
    named = {"fpr": fp / fp[-1].clamp_min(1), "tpr": tp / tp[-1].clamp_min(1)}
    if d_pro is not None:
        pro = torch.cat([zero, torch.cumsum(d_pro, 0)])
        named["pro"] = (pro / max(regions, 1)).clamp(0, 1)
    keep = evenly_spaced(len(named["fpr"]), CURVE_POINTS).to(fp.device)
    return {k: [round(float(v), 6) for v in t[keep].cpu()] for k, t in named.items()}


def evenly_spaced(n: int, m: int) -> torch.Tensor:
    """At most ``m`` indices spread evenly over ``range(n)``, first and last included, in exact
    integer arithmetic (a float32 ``linspace`` rounds past 2^24 and can index past the end)."""
    m = min(m, n)
    if m <= 1:
        return torch.zeros(m, dtype=torch.long)
    i = torch.arange(m, dtype=torch.long)
    return torch.unique((2 * i * (n - 1) + (m - 1)) // (2 * (m - 1)))
