"""Pixel AUROC, AP, F1-max and AU-PRO, exactly: only the defective pixels are sorted, every
other pixel is counted into its event (:mod:`bench.metrics.events`), group by group."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage

from bench.metrics.curves import _curve_points, _roc_pr, trapezoid_to
from bench.metrics.events import _binning, _events

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CHUNK = 1 << 22


def label_regions(mask: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 labels, 1..count; count)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    labels, count = ndimage.label(m.astype(bool), structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


def _curve_metrics(d_pos, d_neg, d_pro, regions, limit, more_limits=None) -> dict[str, float]:
    """Pixel metrics from per-event increments given in descending score order (float64);
    ``more_limits``: further AU-PRO integration limits, metric name -> limit."""
    auroc_, ap, f1, fp = _roc_pr(d_pos, d_neg)
    out = {"pixel_auroc": auroc_, "pixel_ap": ap, "pixel_f1max": f1}
    limits = {"au_pro": limit, **(more_limits or {})}
    out.update(dict.fromkeys(limits, math.nan))
    negatives = float(fp[-1])
    if regions > 0 and negatives > 0:
        zero = torch.zeros(1, dtype=torch.float64, device=d_pro.device)
        pro = torch.cat([zero, torch.cumsum(d_pro, 0) / regions]).clamp(0, 1)
        for name, to in limits.items():
            out[name] = trapezoid_to((fp / negatives).clamp(0, 1), pro, to) / to
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
    more_limits: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Pixel AUROC, AP, F1-max and AU-PRO of image subsets, exactly; ``more_limits`` adds the
    AU-PRO to further FPR limits from the same curve (metric name -> limit, e.g.
    ``{"au_pro_05": 0.05}``).

    ``curves``: a dict that receives, for the subset "all", the ROC and PRO curves (false
    positive rate, true positive rate, PRO) thinned to at most ``CURVE_POINTS`` points.

    ``maps``/``masks``: one [H,W] pair per image (sizes may differ between images); ``groups``:
    an int per image (e.g. its defect type); ``subsets``: name -> the groups it contains.
    Only the defective pixels are sorted; every pixel is then counted into its event, group by
    group, ``chunk`` pixels at a time.
    """
    device = maps[0].device
    n_groups = max(groups) + 1
    u, pos, pro, regions_per_group = _positive_events(maps, masks, groups, n_groups)
    n_events = 2 * u.numel() + 1
    every = _count_events(maps, groups, u, n_groups, chunk)
    neg = every.reshape(-1) - pos  # integer counts in float64: exact
    pos, pro, neg = (t.view(n_groups, n_events) for t in (pos, pro, neg))
    out = {}
    for name, members in subsets.items():
        idx = torch.tensor(sorted(set(members)), dtype=torch.long, device=device)
        d_pos, d_pro, d_neg = (t[idx].sum(0).flip(0) for t in (pos, pro, neg))
        regions = sum(regions_per_group[m] for m in set(members))
        out[name] = _curve_metrics(d_pos, d_neg, d_pro, regions, limit, more_limits)
        if curves is not None and name == "all":
            curves.update(_curve_points(d_pos, d_neg, d_pro, regions))
    return out


def _positive_events(
    maps: list[torch.Tensor], masks: list[torch.Tensor], groups: list[int], n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The defective pixels as events: (sorted distinct positive scores u, positives and
    PRO weight (1 / region size) per group and event, flat [group * event], regions per
    group)."""
    device = maps[0].device
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
    return u, pos, pro, regions_per_group


def _count_events(
    maps: list[torch.Tensor], groups: list[int], u: torch.Tensor, n_groups: int, chunk: int
) -> torch.Tensor:
    """Every pixel (defective or not) counted into its event: [group, event], float64."""
    device = maps[0].device
    n_events = 2 * u.numel() + 1
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
    return every


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
