"""Per-image sufficient statistics of the curve metrics, from which the metrics of any weighting
of the test images (a bootstrap resample: image i taken w_i times) follow exactly.

The thresholds are the events of :mod:`bench.metrics.events` (for image scores: the distinct
scores). Each event holds negative entries (image, defect-free count) and positive entries
(image, defective count, PRO weight: the defective pixels' 1 / their region's size, summed). A
resample with weights w sums ``w[image] * count`` per event and sweeps the events from the
highest score down (:mod:`bench.metrics.resample_sweep`): the curves the plain metrics sweep on
the resampled set, where an image taken twice counts its pixels and its regions twice. An event a
resample leaves empty only splits a curve segment, which changes no area, AP step or F1 point, so
the result equals the plain metric on the resampled images.

Memory: 12 bytes per negative entry (one per image and event holding its defect-free pixels) and
20 per positive entry (one per image and distinct defective score); empty events are dropped.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch

from bench.metrics.events import Positives, Scratch, _binning, _events
from bench.metrics.pixel import _positive_pixels


@dataclass
class EntryList:
    """Entries grouped by event, events in descending score order: event e holds entries
    ``start[e]:start[e+1]``."""

    start: np.ndarray  # int64 [E + 1]
    image: np.ndarray  # int32 [M]
    count: np.ndarray  # float64 [M]
    overlap: np.ndarray  # float64 [M] (zeros for negative entries)


@dataclass
class CurveStats:
    """Negative and positive entries on the same events; totals per image: defect-free and
    defective counts, ground-truth regions."""

    negatives: EntryList
    positives: EntryList
    image_negatives: np.ndarray  # float64 [N]
    image_positives: np.ndarray  # float64 [N]
    image_regions: np.ndarray  # float64 [N]

    @property
    def n_images(self) -> int:
        return self.image_negatives.size

    @property
    def n_entries(self) -> int:
        return self.negatives.image.size + self.positives.image.size

    @property
    def n_events(self) -> int:
        return self.negatives.start.size - 1


@numba.njit(cache=True, nogil=True)
def _group(event, image, count, overlap, kept):
    """Counting sort of entries by event id, descending, over the events in ``kept`` (ascending
    ids of the events any entry has): (start, image, count, overlap)."""
    n_events = kept.size
    rank = np.full(kept[-1] + 1 if kept.size else 0, -1, dtype=np.int64)
    for r in range(n_events):
        rank[kept[r]] = n_events - 1 - r  # descending
    start = np.zeros(n_events + 1, dtype=np.int64)
    for j in range(event.size):
        start[rank[event[j]] + 1] += 1
    for e in range(n_events):
        start[e + 1] += start[e]
    at = start[:-1].copy()
    out_image = np.empty(event.size, dtype=np.int32)
    out_count = np.empty(event.size, dtype=np.float64)
    out_overlap = np.empty(event.size, dtype=np.float64)
    for j in range(event.size):
        e = rank[event[j]]
        out_image[at[e]] = image[j]
        out_count[at[e]] = count[j]
        out_overlap[at[e]] = overlap[j]
        at[e] += 1
    return start, out_image, out_count, out_overlap


@numba.njit(cache=True, nogil=True)
def _count_per_event(events, buffer):
    """(events, counts) of one image's event ids, without sorting: ``buffer`` (zeros, one slot
    per event) is used and left zeroed."""
    touched = np.empty(events.size, dtype=np.int64)
    n = 0
    for ev in events:
        if buffer[ev] == 0:
            touched[n] = ev
            n += 1
        buffer[ev] += 1
    counts = np.empty(n, dtype=np.float64)
    for t in range(n):
        counts[t] = buffer[touched[t]]
        buffer[touched[t]] = 0
    return touched[:n], counts


def _entries(parts: list[tuple], kept: np.ndarray) -> EntryList:
    dtypes = (np.int64, np.int32, np.float64, np.float64)
    event, image, count, overlap = (
        np.concatenate([p[k] for p in parts], dtype=t) if parts else np.zeros(0, dtype=t)
        for k, t in enumerate(dtypes)
    )
    return EntryList(*_group(event, image, count, overlap, kept))


def _stats(neg_parts, pos_parts, n: int, neg_total, regions) -> CurveStats:
    present = np.zeros(
        1 + max((int(p[0].max()) for p in neg_parts + pos_parts if p[0].size), default=-1),
        dtype=bool,
    )
    for part in neg_parts + pos_parts:
        present[part[0]] = True
    kept = np.flatnonzero(present)
    negatives, positives = _entries(neg_parts, kept), _entries(pos_parts, kept)
    pos_total = np.bincount(positives.image, weights=positives.count, minlength=n)
    return CurveStats(
        negatives,
        positives,
        np.asarray(neg_total, dtype=np.float64),
        pos_total.astype(np.float64),
        np.asarray(regions, dtype=np.float64),
    )


def image_curve_stats(scores: np.ndarray, labels: np.ndarray) -> CurveStats:
    """One entry per image at its score (image-level AUROC, AP, F1-max; no overlap)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    _, event = np.unique(scores, return_inverse=True)
    event, index, n = event.reshape(-1), np.arange(scores.size), scores.size
    part = [(event[m], index[m], np.ones(m.sum()), np.zeros(m.sum())) for m in (~labels, labels)]
    return _stats([part[0]], [part[1]], n, (~labels).astype(float), np.zeros(n))


def pixel_curve_stats(
    maps: list[torch.Tensor],
    masks: list[torch.Tensor],
    regions: bool = True,
    channels: list | None = None,
) -> CurveStats:
    """Every pixel of every image: defective pixels per (image, distinct score) with their
    overlap weight (1 / the size of their 8-connected region, when ``regions``), the others per
    (image, event). Maps and masks: one pair per image, [H, W] (any shape without ``regions``),
    on the host. With ``channels`` (MVTec LOCO's ground-truth channels per image,
    :mod:`bench.metrics.spro`) the overlap is the saturated per-region overlap instead: each
    channel's sPRO gains, one "region" per channel."""
    n = len(maps)
    if channels is not None:
        regions = False
    if regions:
        positives, region_image, region_size = _positive_pixels(maps, masks, list(range(n)))
        region_count = np.bincount(region_image, minlength=n)
    else:
        positives, region_image, region_size = _flat_positives(maps, masks)
        region_count = np.zeros(n)
    u = positives.u
    pos_parts = []
    if u.numel():
        k, payload = positives.block(0, u.numel())
        weight = 1.0 / region_size[payload] if regions else np.zeros(k.size)
        key = k * n + region_image[payload]  # non-decreasing in k: ties of k sort in place
        order = np.argsort(key, kind="stable")
        first = np.append(True, key[order][1:] != key[order][:-1])
        uniq = key[order][first]
        inverse = np.empty(key.size, dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        pos_parts.append(
            (
                2 * (uniq // n) + 1,
                uniq % n,
                np.bincount(inverse, minlength=uniq.size).astype(np.float64),
                np.bincount(inverse, weights=weight, minlength=uniq.size),
            )
        )
    if channels is not None:
        from bench.metrics.spro import _channel_gains

        gains, region_count = _channel_gains(maps, masks, channels, list(range(n)), u, n)
        for image, k, gain in gains:
            zero = np.zeros(k.size)
            pos_parts.append((2 * k.astype(np.int64) + 1, np.full(k.size, image), zero, gain))
    bins, local = _binning(u), threading.local()
    neg_total = np.zeros(n)

    def negatives(i: int):
        """(events, image, counts, overlap) of image i's defect-free pixels, or None."""
        flat = maps[i].detach().reshape(-1).float().cpu().numpy()
        free = np.ascontiguousarray(flat[~masks[i].reshape(-1).cpu().numpy().astype(bool)])
        neg_total[i] = free.size
        if not free.size:
            return None
        if not hasattr(local, "scratch"):  # per thread: work buffers and a zeroed count table
            local.scratch = Scratch()
            local.buffer = np.zeros(2 * u.numel() + 1, dtype=np.int32)
        ev = _events(torch.from_numpy(free), u, bins, local.scratch).numpy()
        where, counts = _count_per_event(ev, local.buffer)
        return where, np.full(where.size, i, np.int32), counts, np.zeros(where.size)

    # images in parallel: NumPy, torch's searchsorted and the compiled counting release the GIL
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        neg_parts = [p for p in pool.map(negatives, range(n)) if p is not None]
    return _stats(neg_parts, pos_parts, n, neg_total, region_count)


def _flat_positives(scores: list[torch.Tensor], labels: list[torch.Tensor]):
    """The positives of unorganised clouds (no regions), their payload the cloud's index; the
    cloud of each payload; unit "region sizes"."""
    parts = []
    for i, (s, y) in enumerate(zip(scores, labels)):
        y = y.reshape(-1).cpu().numpy().astype(bool)
        pos = s.detach().reshape(-1).float().cpu().numpy()[y]
        parts.append((pos, np.full(pos.size, i, dtype=np.int64)))
    positives = Positives(iter(parts), sum(p.size for p, _ in parts))
    return positives, np.arange(len(scores), dtype=np.int64), np.ones(len(scores))
