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
from collections import deque
from concurrent.futures import ThreadPoolExecutor

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
_LOCAL_STEPS = 2  # positives compared directly per ambiguous pixel before a binary search
_BINS_PER_POSITIVE = 4
_MAX_BINS = 1 << 22  # a larger table costs more in cache misses than it saves


def _bin_of(x: torch.Tensor, offset: float, scale: float, nbins: int) -> torch.Tensor:
    """Monotone (non-decreasing) int32 bin index in [0, nbins + 2] of float32 scores: a
    multiply, an add, clamping and truncation of non-negatives each preserve order under IEEE
    rounding. The same arithmetic bins the positives and every other pixel (NumPy on the CPU,
    where its element-wise kernels are several times faster than torch's)."""
    if x.device.type == "cpu":
        y = x.numpy() * np.float32(scale)
        y += np.float32(offset)
        np.clip(y, 0, nbins + 2, out=y)
        return torch.from_numpy(y.astype(np.int32))
    y = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
    y += torch.tensor(offset, dtype=x.dtype, device=x.device)
    return y.clamp_(0, nbins + 2).to(torch.int32)


def _binning(u: torch.Tensor):
    """A linear binning of the positives' range (a few bins per distinct positive score) and,
    per bin, the event of any score falling in it (>= 0), or ``-1 - k`` where the bin holds
    positive scores, u_k being the first of them."""
    k = u.numel()
    if k < 64:
        return None
    lo, hi = float(u[0]), float(u[-1])
    nbins = int(min(_MAX_BINS, _BINS_PER_POSITIVE * k))
    scale = nbins / (hi - lo) if hi > lo else 1.0
    if not scale < 1e37:  # the range is too narrow for float32 bins: binary search only
        return None
    scale = float(np.float32(scale))
    offset = float(np.float32(1.5 - lo * scale))  # u_0 near 1.5: scores far below it in bin 0
    per_bin = torch.bincount(_bin_of(u, offset, scale, nbins), minlength=nbins + 3)
    first = per_bin.cumsum(0) - per_bin  # number of u_k in lower bins
    table = torch.where(per_bin == 0, 2 * first, -1 - first).to(torch.int32)
    inf = torch.full((_LOCAL_STEPS + 1,), math.inf, dtype=u.dtype, device=u.device)
    return offset, scale, nbins, table, torch.cat([u, inf])


def _exact_events(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """2 * (number of u_k below x) + (x equals some u_k), by binary search."""
    k = u.numel()
    below = torch.searchsorted(u, x)
    equal = u[below.clamp(max=k - 1)] == x
    return 2 * below + equal


def _events(x: torch.Tensor, u: torch.Tensor, bins: tuple | None) -> torch.Tensor:
    """Event id of each float32 score in ``x`` against the sorted distinct positive scores
    ``u``: 2k+1 if equal to u_k, else 2 * (number of u_k below it)."""
    if u.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    if bins is None:
        return _exact_events(x, u)
    offset, scale, nbins, table, u_padded = bins
    events = table.index_select(0, _bin_of(x, offset, scale, nbins))
    if x.device.type == "cpu":
        _resolve_numpy(x.numpy(), events.numpy(), u, u_padded)
    else:
        _resolve_torch(x, events, u, u_padded)
    return events


# A score in a bin holding u_k, u_k+1, ... lies below every positive of the higher bins, so
# comparing it with the next few positives counts it exactly unless the bin holds more of them
# (then a binary search does). Both versions overwrite the negative (ambiguous) events in place.
def _resolve_torch(x, events, u, u_padded) -> None:
    ambiguous = torch.nonzero(events < 0).reshape(-1)
    if ambiguous.numel() == 0:
        return
    xa = x.index_select(0, ambiguous)
    first = -1 - events.index_select(0, ambiguous).long()
    exact = 2 * first
    for j in range(_LOCAL_STEPS):
        uj = u_padded.index_select(0, first + j)
        exact += (xa >= uj).long() + (xa > uj).long()
    crowded = torch.nonzero(xa >= u_padded.index_select(0, first + _LOCAL_STEPS)).reshape(-1)
    if crowded.numel():
        exact.index_copy_(0, crowded, _exact_events(xa.index_select(0, crowded), u))
    events.index_copy_(0, ambiguous, exact.to(events.dtype))


def _resolve_numpy(x: np.ndarray, events: np.ndarray, u, u_padded) -> None:
    ambiguous = np.flatnonzero(events < 0)
    if ambiguous.size == 0:
        return
    xa = x[ambiguous]
    first = -1 - events[ambiguous].astype(np.int64)
    exact = 2 * first
    for j in range(_LOCAL_STEPS):
        uj = u_padded.index_select(0, torch.from_numpy(first + j)).numpy()
        exact += xa >= uj
        exact += xa > uj
    beyond = u_padded.index_select(0, torch.from_numpy(first + _LOCAL_STEPS)).numpy()
    crowded = np.flatnonzero(xa >= beyond)
    if crowded.size:
        exact[crowded] = _exact_events(torch.from_numpy(xa[crowded]), u).numpy()
    events[ambiguous] = exact


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


def _defect_pixels(amap: torch.Tensor, mask: torch.Tensor):
    """(float32 scores, int32 region labels 1..count, count) of one image's defective pixels,
    or None for a defect-free mask. Regions are labelled inside the mask's bounding box only."""
    m = mask.cpu().numpy().astype(bool, copy=False)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels, count = label_regions(m[box])
    flat = labels.reshape(-1)
    where = np.flatnonzero(flat)
    if amap.device.type == "cpu":
        scores = torch.from_numpy(amap[box].numpy().reshape(-1)[where]).float()
    else:
        scores = amap[box].reshape(-1)[torch.from_numpy(where).to(amap.device)].float()
    return scores, flat[where], count


def score_metrics(
    maps: list[torch.Tensor],
    masks: list[torch.Tensor],
    groups: list[int],
    subsets: dict[str, list[int]],
    limit: float = 0.3,
    chunk: int = CHUNK,
    curves: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Pixel AUROC, AP, F1-max and AU-PRO of image subsets, exactly.

    ``curves``: a dict that receives, for the subset "all", the ROC and PRO curves (false
    positive rate, true positive rate, PRO) thinned to at most ``CURVE_POINTS`` points.

    ``maps``/``masks``: one [H,W] pair per image (sizes may differ between images); ``groups``:
    an int per image (e.g. its defect type); ``subsets``: name -> the groups it contains.
    Only the defective pixels are sorted; every pixel is then counted into its event, group by
    group, ``chunk`` pixels at a time.
    """
    device = maps[0].device
    n_groups = max(groups) + 1
    pos_scores, pos_region, region_group = [], [], []
    for amap, mask, g in zip(maps, masks, groups):
        found = _defect_pixels(amap, mask)
        if found is not None:
            scores, labels, count = found
            pos_scores.append(scores)
            pos_region.append(labels + len(region_group) - 1)  # region index over the category
            region_group += [g] * count
    regions_per_group = np.bincount(region_group, minlength=n_groups).tolist()
    if pos_scores:
        region = torch.from_numpy(np.concatenate(pos_region).astype(np.int64)).to(device)
        sizes = torch.bincount(region).to(torch.float64)
        pos_weight = 1.0 / sizes[region]
        pos_group = torch.tensor(region_group, dtype=torch.int64, device=device)[region]
        u, k_of_pos = torch.unique(torch.cat(pos_scores), sorted=True, return_inverse=True)
    else:
        u = torch.zeros(0, dtype=torch.float32, device=device)
    n_events = 2 * u.numel() + 1
    pos = torch.zeros(n_groups * n_events, dtype=torch.float64, device=device)
    pro = torch.zeros(n_groups * n_events, dtype=torch.float64, device=device)
    if pos_scores:
        event = pos_group * n_events + 2 * k_of_pos + 1
        pos += torch.bincount(event, minlength=pos.numel()).to(torch.float64)
        pro += torch.bincount(event, weights=pos_weight, minlength=pro.numel())
    bins = _binning(u)
    every = torch.zeros(n_groups, n_events, dtype=torch.float64, device=device)

    def count(part: torch.Tensor) -> torch.Tensor:
        return torch.bincount(_events(part.float(), u, bins), minlength=n_events)

    # Counting is partly single-threaded in torch (bincount, nonzero): on the CPU, chunks are
    # counted concurrently (torch releases the GIL), at most two chunks in flight per worker.
    workers = 1 if device.type != "cpu" else max(1, torch.get_num_threads())
    with ThreadPoolExecutor(workers) as pool:
        for g in sorted(set(groups)):
            members = [m.reshape(-1) for m, gm in zip(maps, groups) if gm == g]
            pending: deque = deque()
            for part in _chunks(members, chunk):
                pending.append(pool.submit(count, part))
                if len(pending) >= 2 * workers:
                    every[g] += pending.popleft().result()
            while pending:
                every[g] += pending.popleft().result()
    neg = every.reshape(-1) - pos  # integer counts in float64: exact
    pos, pro, neg = (t.view(n_groups, n_events) for t in (pos, pro, neg))
    out = {}
    for name, members in subsets.items():
        idx = torch.tensor(sorted(set(members)), dtype=torch.long, device=device)
        d_pos, d_pro, d_neg = (t[idx].sum(0).flip(0) for t in (pos, pro, neg))
        regions = sum(regions_per_group[m] for m in set(members))
        out[name] = _curve_metrics(d_pos, d_neg, d_pro, regions, limit)
        if curves is not None and name == "all":
            curves.update(_curve_points(d_pos, d_neg, d_pro, regions))
    return out


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
