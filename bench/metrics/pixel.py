"""Pixel AUROC, AP, F1-max and AU-PRO, exactly: only the defective pixels are sorted, every
other pixel is counted into its event (:mod:`bench.metrics.events`), group by group, and each
subset's curves are swept a block of events at a time (:mod:`bench.metrics.sweep`)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage

from bench.metrics.events import Positives, Scratch, _binning, _events, event_blocks
from bench.metrics.sweep import Sweep, at_equal_events, block_negatives

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CHUNK = 1 << 21


def label_regions(mask: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 labels, 1..count; count)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    labels, count = ndimage.label(m.astype(bool), structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


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
    group, ``chunk`` pixels at a time, and each subset's curves are swept block by block.
    """
    n_groups = max(groups) + 1
    positives, region_group, region_size = _positive_pixels(maps, masks, groups)
    neg = minus_positives(positives, region_group, n_groups, sum(m.numel() for m in maps))
    count_events(neg, maps, groups, positives.u, chunk)
    n_distinct = positives.u.numel()
    limits = {"au_pro": limit, **(more_limits or {})}
    out = {}
    for name, members in subsets.items():
        chosen = sorted(set(members))
        mine = np.isin(region_group, chosen)
        weight = mine / region_size  # 1 / its size per region of the subset, 0 for the others
        points = 2 * n_distinct + 2 if curves is not None and name == "all" else 0
        negatives = sum(int(neg[g].sum(dtype=np.int64)) for g in chosen)
        sweep = Sweep(
            int(region_size[mine].sum()), negatives, int(mine.sum()), limits, True, points
        )
        for k0, k1, a, b in event_blocks(n_distinct):
            k, region = positives.block(k0, k1)
            d_pos = np.bincount(k, weights=mine[region], minlength=k1 - k0)
            d_pro = np.bincount(k, weights=weight[region], minlength=k1 - k0)
            d_neg = block_negatives(neg, chosen, a, b)
            sweep.add(d_neg, at_equal_events(d_pos, a, b), at_equal_events(d_pro, a, b))
        out[name] = {**sweep.roc_metrics(), **sweep.overlap_areas()}
        if points:
            curves.update(sweep.curve)
    return out


def _positive_pixels(
    maps: list[torch.Tensor], masks: list[torch.Tensor], groups: list[int]
) -> tuple[Positives, np.ndarray, np.ndarray]:
    """The defective pixels sorted by score, each with its region (8-connected, numbered over
    all images), and per region its group and size."""
    region_group, region_size = [], []

    def parts():
        for amap, mask, g in zip(maps, masks, groups):
            found = _defect_pixels(amap, mask)
            if found is not None:
                scores, labels, count = found
                first = len(region_group)
                region_group.extend([g] * count)
                region_size.extend(np.bincount(labels, minlength=count + 1)[1:].tolist())
                yield scores.cpu().numpy(), labels + (first - 1)

    total = sum(int(np.count_nonzero(m.cpu().numpy())) for m in masks)
    positives = Positives(parts(), total)
    return positives, np.asarray(region_group, dtype=np.int64), np.asarray(region_size)


def minus_positives(
    positives: Positives, group_of: np.ndarray, n_groups: int, pixels: int
) -> np.ndarray:
    """Minus the positives per group and event [group, event] (``group_of``: the group of each
    payload), to which :func:`count_events` adds every pixel: int32, or int64 where a count
    could pass 2^31 (``pixels`` in all)."""
    n_distinct = positives.u.numel()
    dtype = np.int64 if pixels >= 2**31 else np.int32
    neg = np.zeros((n_groups, 2 * n_distinct + 1), dtype=dtype)
    for k0, k1, _, _ in event_blocks(n_distinct):
        k, payload = positives.block(k0, k1)
        width = k1 - k0
        counts = np.bincount(group_of[payload] * width + k, minlength=n_groups * width)
        neg[:, 2 * k0 + 1 : 2 * k1 : 2] -= counts.reshape(n_groups, width).astype(neg.dtype)
    return neg


def count_events(
    neg: np.ndarray, maps: list[torch.Tensor], groups: list[int], u: torch.Tensor, chunk: int
) -> None:
    """Adds every pixel (defective or not) to ``neg`` [group, event], group by group."""
    device = maps[0].device
    u = u.to(device)
    bins = _binning(u)
    local, lock = threading.local(), threading.Lock()

    def count(pieces: list[torch.Tensor], acc: torch.Tensor) -> None:
        n = sum(p.numel() for p in pieces)
        if device.type == "cpu":  # into this thread's buffers, reused from chunk to chunk
            local.scratch = getattr(local, "scratch", None) or Scratch(chunk)
            x = local.scratch.get("x", n, np.float32)
            _copy(pieces, x)
            events = _events(torch.from_numpy(x), u, bins, local.scratch)
        else:
            events = _events(torch.cat(pieces).float(), u, bins)
        with lock:
            acc.index_add_(0, events, torch.ones(1, dtype=acc.dtype, device=device).expand(n))

    # On the CPU, chunks are counted concurrently (torch and NumPy release the GIL), at most two
    # in flight per worker; adding a chunk's events to the group's counts takes the lock.
    workers = 1 if device.type != "cpu" else max(1, torch.get_num_threads())
    with ThreadPoolExecutor(workers) as pool:
        for g in sorted(set(groups)):
            acc = torch.from_numpy(neg[g]).to(device)  # on the CPU: neg[g] itself
            members = [m.reshape(-1) for m, gm in zip(maps, groups) if gm == g]
            pending: deque = deque()
            for pieces in _chunks(members, chunk):
                pending.append(pool.submit(count, pieces, acc))
                if len(pending) >= 2 * workers:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            if device.type != "cpu":
                neg[g] = acc.cpu().numpy()


def _copy(pieces: list[torch.Tensor], out: np.ndarray) -> None:
    """The (host) pieces one after another into ``out``, converted to its dtype."""
    at = 0
    for p in pieces:
        np.copyto(out[at : at + p.numel()], p.detach().numpy(), casting="same_kind")
        at += p.numel()


def _chunks(flat_maps: list[torch.Tensor], chunk: int):
    """Consecutive pieces of the flat maps, ``chunk`` pixels at a time (the last fewer)."""
    buffer, size = [], 0
    for m in flat_maps:
        at = 0
        while at < m.numel():
            take = min(chunk - size, m.numel() - at)
            buffer.append(m[at : at + take])
            size, at = size + take, at + take
            if size == chunk:
                yield buffer
                buffer, size = [], 0
    if buffer:
        yield buffer


def pixel_metrics(
    maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3, chunk: int = CHUNK
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AU-PRO of maps/masks [N,H,W]."""
    n = maps.shape[0]
    return score_metrics(list(maps), list(masks), [0] * n, {"all": [0]}, limit, chunk)["all"]


def au_pro(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``limit`` (official MVTec definition)."""
    return pixel_metrics(maps, masks, limit)["au_pro"]
