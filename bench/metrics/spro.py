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

import numpy as np
import torch

from bench.metrics.events import Positives, event_blocks
from bench.metrics.pixel import CHUNK, count_events, minus_positives
from bench.metrics.sweep import Sweep, at_equal_events, block_negatives

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
    positives = _union_pixels(maps, masks, groups)
    u = positives.u
    gains, per_group = _channel_gains(maps, masks, channels, groups, u, n_groups)
    pixels = sum(m.numel() for m in maps)
    neg = minus_positives(positives, np.arange(n_groups), n_groups, pixels)
    del positives  # only the distinct scores are needed from here on
    count_events(neg, maps, groups, u, chunk)
    out = {}
    for name, members in subsets.items():
        chosen = sorted(set(members))
        d_spro = np.zeros(u.numel())
        for g, k, gain in gains:
            if g in chosen:
                d_spro[k] += gain  # k: distinct within a channel
        negatives = sum(int(neg[g].sum(dtype=np.int64)) for g in chosen)
        sweep = Sweep(0, negatives, int(per_group[chosen].sum()), limits, roc=False)
        for k0, k1, a, b in event_blocks(u.numel()):
            sweep.add(
                block_negatives(neg, chosen, a, b), None, at_equal_events(d_spro[k0:k1], a, b)
            )
        out[name] = sweep.overlap_areas()
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


def _flat_scores(amap: torch.Tensor, pixels: np.ndarray) -> torch.Tensor:
    """float32 scores (host) of the flat ``pixels`` of one map."""
    where = torch.from_numpy(pixels.astype(np.int64, copy=False)).to(amap.device)
    return amap.reshape(-1).index_select(0, where).float().cpu()


def _union_pixels(maps, masks, groups) -> Positives:
    """The defective pixels (of the union masks) sorted by score, each with its group."""

    def parts():
        for amap, mask, g in zip(maps, masks, groups):
            pixels = np.flatnonzero(mask.cpu().numpy())
            if pixels.size:
                yield _flat_scores(amap, pixels).numpy(), np.full(pixels.size, g)

    return Positives(parts(), sum(int(np.count_nonzero(m.cpu().numpy())) for m in masks))


def _channel_gains(maps, masks, channels, groups, u, n_groups):
    """(per channel: its group, the indices of its distinct scores among ``u`` and the sPRO
    each adds; channels per group), every mask checked to be the union of its channels."""
    gains = []
    for i, (amap, mask, mine, g) in enumerate(zip(maps, masks, channels, groups)):
        union = np.zeros(amap.numel(), dtype=bool)
        for pixels, s in mine:
            if pixels.size == 0 or int(s) < 1:
                raise ValueError(f"image {i}: a channel has no pixel or a saturation area below 1")
            union[pixels] = True
            scores = np.sort(_flat_scores(amap, pixels).numpy())[::-1]
            k = np.searchsorted(u.numpy(), scores)  # sorted: the search stays in cache
            gains.append((g, *_gains(k, min(int(s), pixels.size))))
        if not np.array_equal(union, mask.cpu().numpy().reshape(-1)):
            raise ValueError(f"image {i}: its mask is not the union of its ground-truth channels")
    per_group = np.bincount([g for g, _, _ in gains], minlength=n_groups)
    return gains, per_group


def _gains(k: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct score indices, sPRO added) of one channel whose pixels have score indices
    ``k`` (descending), saturated at ``s`` pixels: the n pixels reaching a score after its K
    higher ones add (min(K + n, s) - min(K, s)) / s, nothing once K >= s."""
    last = np.flatnonzero(np.append(k[1:] != k[:-1], True))  # each score's last pixel
    distinct, reached = k[last], last + 1
    size = np.diff(reached, prepend=0)
    live = reached - size < s
    reached, size = reached[live], size[live]
    gain = (np.minimum(reached, s) - np.minimum(reached - size, s)) / s
    return distinct[live].astype(np.int32), gain
