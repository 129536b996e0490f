"""Exact, sort-based anomaly-detection metrics.

All curves use every distinct score as a threshold (ties collapse to one point), as
scikit-learn and the official MVTec evaluation scripts do. AU-PRO follows the official MVTec AD /
MVTec 3D-AD definition: 8-connected ground-truth regions per image, false-positive rate over all
defect-free pixels of the category, PRO = mean over regions of the covered fraction, the curve
from (0,0), trapezoid up to ``limit`` with the PRO value linearly interpolated there, divided by
``limit``.

Pixel metrics sort only the defective pixels and count every other pixel into the interval of
defective scores it falls in (:func:`score_metrics`), which determines the ROC, precision-recall
and PRO curves exactly without sorting or copying all pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

METRIC_VERSION = "1.0"
PROTOCOLS = ("official", "fast")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "au_pro")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CHUNK = 1 << 22


# -- ROC and precision-recall from per-threshold increments ---------------------------------------
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


# -- regions ----------------------------------------------------------------------------------------
def label_regions(mask: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 labels, 1..count; count)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    labels, count = ndimage.label(m.astype(bool), structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


# -- pixel metrics ---------------------------------------------------------------------------------
# Every pixel curve (ROC, precision-recall, PRO) changes its slope only at the scores of defective
# pixels: between two consecutive distinct positive scores only defect-free pixels are passed, so
# TP and PRO stay constant and the trapezoids there are rectangles whatever the order of those
# pixels. The curves are therefore exact given, for each distinct positive score u_k, the
# positives at u_k and the defect-free pixels equal to u_k or strictly between u_k and the next.
# Event ids (ascending): 2k+1 = "equal to u_k", 2k = "strictly between u_(k-1) and u_k", and
# 2K = "above every positive". Only the positives are sorted; defect-free pixels are counted into
# events chunk by chunk, so memory stays O(positives + chunk) beyond the stored maps.


def _bin_of(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, nbins: int) -> torch.Tensor:
    """Monotone (non-decreasing) bin index in [0, nbins + 2] of float scores: a multiply-add,
    clamping and truncation of non-negatives each preserve order under IEEE rounding."""
    return torch.addcmul(offset, x, scale).clamp_(0, nbins + 2).to(torch.int32)


def _binning(u: torch.Tensor):
    """A linear binning of the positives' range (~16 bins per distinct positive score) and, per
    bin, the event of any score falling in it, or -1 where the bin holds a positive score."""
    k = u.numel()
    if k < 64:
        return None
    lo, hi = u[0], u[-1]
    nbins = int(min(1 << 22, 16 * k))  # a larger table costs more in cache misses than it saves
    scale = (
        (nbins / (hi - lo)).to(u.dtype)
        if hi > lo
        else torch.ones((), dtype=u.dtype, device=u.device)
    )
    offset = (1.5 - lo * scale).to(u.dtype)  # u_0 lands near 1.5: scores far below it in bin 0
    ub = _bin_of(u, offset, scale, nbins).long()
    per_bin = torch.bincount(ub, minlength=nbins + 3)
    first = torch.cat([per_bin.new_zeros(1), per_bin.cumsum(0)])  # number of u_k in lower bins
    table = torch.where(first[1:] == first[:-1], 2 * first[:-1], -1).to(torch.int32)
    return offset, scale, nbins, table


def _events(x: torch.Tensor, u: torch.Tensor, bins: tuple | None) -> torch.Tensor:
    """Event id of each score in ``x`` against the sorted distinct positive scores ``u``:
    2k+1 if equal to u_k, else 2 * (number of u_k below it)."""
    k = u.numel()
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    if bins is None:
        ambiguous, events = None, None
    else:  # only scores sharing a bin with some u_k need the binary search
        offset, scale, nbins, table = bins
        events = table[_bin_of(x, offset, scale, nbins)]
        ambiguous = torch.nonzero(events < 0).reshape(-1)
        if ambiguous.numel() == 0:
            return events
        x = x[ambiguous]
    below = torch.searchsorted(u, x)
    equal = below < k
    equal &= u[below.clamp(max=k - 1)] == x
    exact = 2 * below + equal
    if events is None:
        return exact
    events[ambiguous] = exact.to(events.dtype)
    return events


def _curve_metrics(d_pos, d_neg, d_pro, regions, limit) -> dict[str, float]:
    """Pixel metrics from per-event increments given in descending score order (float64)."""
    auroc_, ap, f1, fp = _roc_pr(d_pos, d_neg)
    out = {"pixel_auroc": auroc_, "pixel_ap": ap, "pixel_f1max": f1, "au_pro": math.nan}
    negatives = float(fp[-1])
    if regions > 0 and negatives > 0:
        zero = torch.zeros(1, dtype=torch.float64, device=d_pro.device)
        pro = torch.cat([zero, torch.cumsum(d_pro, 0) / regions]).clamp(0, 1)
        out["au_pro"] = trapezoid_to((fp / negatives).clamp(0, 1), pro, limit) / limit
    return out


def score_metrics(
    maps: list[torch.Tensor],
    masks: list[torch.Tensor],
    groups: list[int],
    subsets: dict[str, list[int]],
    limit: float = 0.3,
    chunk: int = CHUNK,
) -> dict[str, dict[str, float]]:
    """Pixel AUROC, AP, F1-max and AU-PRO of image subsets, exactly.

    ``maps``/``masks``: one [H,W] pair per image (sizes may differ between images); ``groups``:
    an int per image (e.g. its defect type); ``subsets``: name -> the groups it contains.
    Only the defective pixels are sorted; every pixel is then counted into its event, group by
    group, ``chunk`` pixels at a time.
    """
    device = maps[0].device
    n_groups = max(groups) + 1
    pos_scores, pos_weight, pos_group, regions_per_group = [], [], [], [0] * n_groups
    for amap, mask, g in zip(maps, masks, groups):
        labels, count = label_regions(mask)
        if count:
            flat = labels.reshape(-1)
            where = torch.from_numpy(np.flatnonzero(flat)).to(device)
            ids = torch.from_numpy(flat[where.cpu().numpy()].astype(np.int64)).to(device)
            sizes = torch.bincount(ids, minlength=count + 1).to(torch.float64)
            pos_scores.append(amap.reshape(-1)[where].float())
            pos_weight.append(1.0 / sizes[ids])
            pos_group.append(torch.full((ids.numel(),), g, dtype=torch.int64, device=device))
            regions_per_group[g] += count
    if pos_scores:
        u, k_of_pos = torch.unique(torch.cat(pos_scores), sorted=True, return_inverse=True)
    else:
        u = torch.zeros(0, dtype=torch.float32, device=device)
    n_events = 2 * u.numel() + 1
    pos = torch.zeros(n_groups * n_events, dtype=torch.float64, device=device)
    pro = torch.zeros(n_groups * n_events, dtype=torch.float64, device=device)
    if pos_scores:
        event = torch.cat(pos_group) * n_events + 2 * k_of_pos + 1
        pos += torch.bincount(event, minlength=pos.numel()).to(torch.float64)
        pro += torch.bincount(event, weights=torch.cat(pos_weight), minlength=pro.numel())
    bins = _binning(u)
    every = torch.zeros(n_groups, n_events, dtype=torch.float64, device=device)
    for g in sorted(set(groups)):
        members = [m.reshape(-1) for m, gm in zip(maps, groups) if gm == g]
        for part in _chunks(members, chunk):
            every[g] += torch.bincount(_events(part.float(), u, bins), minlength=n_events)
    neg = every.reshape(-1) - pos  # integer counts in float64: exact
    pos, pro, neg = (t.view(n_groups, n_events) for t in (pos, pro, neg))
    out = {}
    for name, members in subsets.items():
        idx = torch.tensor(sorted(set(members)), dtype=torch.long, device=device)
        d_pos, d_pro, d_neg = (t[idx].sum(0).flip(0) for t in (pos, pro, neg))
        regions = sum(regions_per_group[m] for m in set(members))
        out[name] = _curve_metrics(d_pos, d_neg, d_pro, regions, limit)
    return out


def _chunks(flat_maps: list[torch.Tensor], chunk: int):
    """Concatenations of consecutive flat maps of about ``chunk`` pixels (large maps split)."""
    buffer, size = [], 0
    for m in flat_maps:
        for piece in m.split(chunk):
            buffer.append(piece)
            size += piece.numel()
            if size >= chunk:
                yield torch.cat(buffer)
                buffer, size = [], 0
    if buffer:
        yield torch.cat(buffer)


def pixel_metrics(
    maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3, chunk: int = CHUNK
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AU-PRO of maps/masks [N,H,W]."""
    n = maps.shape[0]
    return score_metrics(list(maps), list(masks), [0] * n, {"all": [0]}, limit, chunk)["all"]


def au_pro(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``limit`` (official MVTec definition)."""
    return pixel_metrics(maps, masks, limit)["au_pro"]
