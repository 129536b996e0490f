"""AU-sPRO, the saturated per-region overlap of MVTec LOCO AD (Bergmann et al., IJCV 2022),
exactly and streaming.

The definition of MVTec's evaluation code (``mvtec_loco_ad_evaluation``: ``src/image.py``,
``src/metrics.py``, ``src/util.py``, ``evaluate_experiment.py``): each ground-truth channel (one
PNG, one defect, however many connected components) of area A with saturation area s has, at a
threshold, sPRO = min(TP, s) / s; the curve's y is the mean sPRO over every channel of the
images evaluated, its x the false-positive rate over every pixel outside all channels of those
images (defect-free and anomalous images alike). The curve runs from (0, 0) to (1, 1); its
area up to each FPR limit (y interpolated linearly there) is divided by the limit. The official
code samples thresholds (50 score quantiles, refined until adjacent curve points are 0.01
apart); here every distinct score is a threshold, the limit of that refinement.

As for AU-PRO (:mod:`bench.metrics.pixel`), only the defective pixels are sorted; every other
pixel is counted into its event. A channel's pixels, by descending score, add 1/s each up to
its s-th and nothing after (ties resolved per distinct score: the k pixels reaching a score
together add (min(K + k, s) - min(K, s)) / s after K higher ones).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.metrics.pixel import CHUNK, _count_events

#: metric name -> FPR integration limit: the official ``MAX_FPRS`` (0.05 is the paper's headline)
SPRO_LIMITS = {
    "au_spro_01": 0.01,
    "au_spro_05": 0.05,
    "au_spro_10": 0.1,
    "au_spro_30": 0.3,
    "au_spro_100": 1.0,
}

#: one ground-truth channel: flat pixel indices into its image's map, and its saturation area
Channel = tuple[np.ndarray, int]


def spro_metrics(
    maps: list[torch.Tensor],
    masks: list[torch.Tensor],
    channels: list[list[Channel]],
    groups: list[int],
    subsets: dict[str, list[int]],
    limits: dict[str, float] = SPRO_LIMITS,
    chunk: int = CHUNK,
) -> dict[str, dict[str, float]]:
    """AU-sPRO at each limit of ``limits`` for image subsets, exactly.

    ``maps``/``masks``: one [H,W] pair per image, each mask the union of the image's
    ``channels`` (empty for a defect-free image); ``groups``: an int per image; ``subsets``:
    name -> the groups it contains. An undefined value (no channel or no defect-free pixel in a
    subset) is NaN.
    """
    if not len(maps) == len(masks) == len(channels) == len(groups):
        raise ValueError("maps, masks, channels and groups must have one entry per image")
    n_groups = max(groups) + 1
    u, pos = _union_events(maps, masks, groups, n_groups)
    every = _count_events(maps, groups, u.to(maps[0].device), n_groups, chunk).cpu()
    neg = every - pos  # integer counts in float64: exact
    spro, counts = _spro_events(maps, masks, channels, groups, u, n_groups)
    out = {}
    for name, members in subsets.items():
        idx = torch.tensor(sorted(set(members)), dtype=torch.long)
        d_neg, d_spro = neg[idx].sum(0).flip(0), spro[idx].sum(0).flip(0)
        out[name] = _areas(d_neg, d_spro, int(counts[idx].sum()), limits)
    return out


def au_spro(maps: torch.Tensor, channels: list[list[Channel]], limit: float = 0.05) -> float:
    """AU-sPRO of maps [N,H,W] up to FPR ``limit``, every image's mask the union of its
    channels."""
    masks = []
    for amap, mine in zip(maps, channels):
        mask = np.zeros(amap.numel(), dtype=bool)
        for pixels, _ in mine:
            mask[pixels] = True
        masks.append(torch.from_numpy(mask.reshape(amap.shape)))
    n = len(masks)
    limits = {"au_spro": limit}
    return spro_metrics(list(maps), masks, channels, [0] * n, {"all": [0]}, limits)["all"][
        "au_spro"
    ]


def _areas(d_neg, d_spro, count: int, limits: dict[str, float]) -> dict[str, float]:
    """Normalised areas under the sPRO curve from per-event increments (descending scores):
    trapezoids up to each limit, sPRO interpolated there (the official rule, as
    :func:`bench.metrics.curves.trapezoid_to`), from one cumulative sum for all limits."""
    negatives = float(d_neg.sum())
    if count == 0 or negatives == 0:
        return {name: math.nan for name in limits}
    zero = torch.zeros(1, dtype=torch.float64)
    x = (torch.cat([zero, torch.cumsum(d_neg, 0)]) / negatives).clamp(0, 1)
    y = (torch.cat([zero, torch.cumsum(d_spro, 0)]) / count).clamp(0, 1)
    area = torch.cat([zero, torch.cumsum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]), 0)])
    out = {}
    for name, limit in limits.items():
        j = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype), right=True)) - 1
        total = float(area[j])
        if float(x[j]) < limit and j + 1 < x.numel():  # the segment crossing the limit, cut
            x0, x1, y0, y1 = float(x[j]), float(x[j + 1]), float(y[j]), float(y[j + 1])
            total += 0.5 * (y0 + y0 + (y1 - y0) * (limit - x0) / (x1 - x0)) * (limit - x0)
        out[name] = total / limit
    return out


def _flat_scores(amap: torch.Tensor, pixels: np.ndarray) -> torch.Tensor:
    """float32 scores (host) of the flat ``pixels`` of one map."""
    where = torch.from_numpy(pixels.astype(np.int64, copy=False)).to(amap.device)
    return amap.reshape(-1).index_select(0, where).float().cpu()


def _union_events(maps, masks, groups, n_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct scores u of the defective pixels, defective pixels per group and
    event [group, event]), on the host."""
    scores, owner = [], []
    for amap, mask, g in zip(maps, masks, groups):
        pixels = np.flatnonzero(mask.cpu().numpy())
        if pixels.size:
            scores.append(_flat_scores(amap, pixels))
            owner.append(torch.full((pixels.size,), g, dtype=torch.long))
    if not scores:
        return torch.zeros(0), torch.zeros(n_groups, 1, dtype=torch.float64)
    u, k = torch.unique(torch.cat(scores), sorted=True, return_inverse=True)
    n_events = 2 * u.numel() + 1
    event = torch.cat(owner) * n_events + 2 * k + 1
    pos = torch.bincount(event, minlength=n_groups * n_events).to(torch.float64)
    return u, pos.view(n_groups, n_events)


def _spro_events(maps, masks, channels, groups, u, n_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum over channels of sPRO increments per group and event [group, event], channels
    per group)."""
    ids, ks, saturation, channel_group = [], [], [], []
    for i, (amap, mask, mine, g) in enumerate(zip(maps, masks, channels, groups)):
        union = np.zeros(amap.numel(), dtype=bool)
        for pixels, s in mine:
            if pixels.size == 0 or int(s) < 1:
                raise ValueError(f"image {i}: a channel has no pixel or a saturation area below 1")
            union[pixels] = True
            k = torch.searchsorted(u, _flat_scores(amap, pixels)).numpy()
            ids.append(np.full(pixels.size, len(saturation), dtype=np.int64))
            ks.append(k)
            saturation.append(min(int(s), pixels.size))
            channel_group.append(g)
        if not np.array_equal(union, mask.cpu().numpy().reshape(-1)):
            raise ValueError(f"image {i}: its mask is not the union of its ground-truth channels")
    n_events = 2 * u.numel() + 1
    counts = torch.bincount(torch.tensor(channel_group, dtype=torch.long), minlength=n_groups)
    if not ids:
        return torch.zeros(n_groups, n_events, dtype=torch.float64), counts
    channel, k, gain = _gains(np.concatenate(ids), np.concatenate(ks), saturation, u.numel())
    event = np.asarray(channel_group, dtype=np.int64)[channel] * n_events + 2 * k + 1
    spro = np.bincount(event, weights=gain, minlength=n_groups * n_events)
    return torch.from_numpy(spro).view(n_groups, n_events), counts


def _gains(ids: np.ndarray, ks: np.ndarray, saturation: list[int], n_distinct: int):
    """Per (channel, distinct score) of the channels' pixels (channel ids ``ids``, score index
    ``ks`` into the distinct scores): (channel, score index, the sPRO it adds), the k pixels of
    a channel reaching a score after its K higher ones adding (min(K + k, s) - min(K, s)) / s."""
    top = n_distinct - 1
    key, size = np.unique(ids * n_distinct + (top - ks), return_counts=True)  # scores descending
    channel, k = key // n_distinct, top - key % n_distinct
    reached = np.cumsum(size)  # pixels of this and every earlier group, of all channels
    first = np.searchsorted(channel, np.arange(len(saturation)))  # each channel's first group
    upto = reached - (reached - size)[first][channel]  # ... of this channel only
    s = np.asarray(saturation, dtype=np.int64)[channel]
    return channel, k, (np.minimum(upto, s) - np.minimum(upto - size, s)) / s
