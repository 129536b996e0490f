"""AU-sPRO (MVTec LOCO AD) against its definition computed densely (reference_metrics.au_spro),
hand-computed curves, and MVTec's own finite-threshold procedure (how close exact is to it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_metrics import au_spro as reference_au_spro

from bench.metrics import SPRO_LIMITS, au_spro, spro_metrics

SHAPES = [(14, 21), (9, 30), (17, 12), (11, 11)]


def _saturation(area: int, threshold: float, relative: bool) -> int:
    """The official ``get_saturation_area``: int(threshold * area) or min(threshold, area)."""
    return int(threshold * area) if relative else min(int(threshold), area)


def _random_case(seed: int, ties: bool):
    """Maps of differing sizes, the last image defect-free; 1-3 rectangular channels per other
    image (the first image's two overlap) with absolute and relative saturation."""
    rng = np.random.default_rng(seed)
    maps, dense = [], []
    for i, (h, w) in enumerate(SHAPES):
        amap = rng.normal(0, 1, (h, w))
        mine = []
        count = 2 if i == 0 else 0 if i == len(SHAPES) - 1 else int(rng.integers(1, 4))
        for j in range(count):
            y, x = (2, 3) if i == j == 0 else (3, 5) if i == 0 else rng.integers(0, (h - 3, w - 3))
            mask = np.zeros((h, w), dtype=bool)
            mask[y : y + rng.integers(2, 7), x : x + rng.integers(3, 8)] = True
            relative = bool(rng.integers(2)) if i else j == 0
            threshold = rng.choice([0.3, 0.5, 1.0]) if relative else int(rng.integers(1, 25))
            mine.append((mask, _saturation(int(mask.sum()), threshold, relative)))
            amap[mask] += rng.uniform(0.5, 2.0)
        maps.append(np.round(amap, 1) if ties else amap)
        dense.append(mine)
    return maps, dense


def _ours(maps, dense, groups=None, subsets=None, chunk=1 << 22):
    tensors = [torch.tensor(m, dtype=torch.float32) for m in maps]
    masks = [
        torch.from_numpy(np.logical_or.reduce([np.zeros(m.shape, bool), *(c for c, _ in d)]))
        for m, d in zip(maps, dense)
    ]
    channels = [[(np.flatnonzero(c), s) for c, s in d] for d in dense]
    groups = groups or [0] * len(maps)
    subsets = subsets or {"all": [0]}
    return spro_metrics(tensors, masks, channels, groups, subsets, chunk=chunk)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_definition_with_ties_overlaps_and_both_saturations(seed, ties):
    maps, dense = _random_case(seed, ties)
    assert (dense[0][0][0] & dense[0][1][0]).any()  # overlapping channels
    f32 = [m.astype(np.float32) for m in maps]  # the harness scores float32 maps
    ours = _ours(maps, dense)["all"]
    assert set(ours) == set(SPRO_LIMITS)
    for name, limit in SPRO_LIMITS.items():
        assert ours[name] == pytest.approx(reference_au_spro(f32, dense, limit), abs=1e-9), name
    # streaming: tiny chunks give the same numbers
    assert _ours(maps, dense, chunk=7)["all"] == pytest.approx(ours, abs=1e-12)


def test_overlapping_channels_each_count_the_shared_pixels():
    amap = np.zeros((4, 5))
    amap[0, :3] = [3.0, 2.0, 1.0]
    a, b = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    a[0, :2], b[0, 1:3] = True, True  # share pixel (0, 1)
    dense = [[(a, 2), (b, 2)]]
    # thresholds 3, 2, 1, 0: sPRO (0.5+0)/2, (1+0.5)/2, 1; FPR 0 until t=0 (the 17 negatives)
    ours = _ours([amap], dense)["all"]
    assert ours["au_spro_100"] == pytest.approx(1.0)  # sPRO is 1 before the first false positive
    amap[3, 4] = 2.5  # a negative above the second threshold: FPR 1/17 while sPRO is 0.25
    ours = _ours([amap], dense)["all"]
    expected = reference_au_spro([amap], dense, 0.3)
    assert ours["au_spro_30"] == pytest.approx(expected, abs=1e-12)
    fpr1 = 1 / 17  # (0, 0) -> (0, 0.25) -> (1/17, 0.25) -> (1/17, 1) -> (1, 1)
    by_hand = (0.25 * fpr1 + (0.3 - fpr1)) / 0.3
    assert ours["au_spro_30"] == pytest.approx(by_hand, abs=1e-12)


def test_saturation_by_hand():
    """One channel of 4 pixels scoring 3, 3, 1, 1; 10 of 100 negatives score 2, the rest 0."""
    amap = np.zeros((13, 8))
    amap.flat[:4] = [3, 3, 1, 1]
    amap.flat[4:14] = 2
    mask = np.zeros(amap.shape, bool)
    mask.flat[:4] = True
    # saturated at 2 pixels: sPRO is 1 at t=3, before any false positive
    assert _ours([amap], [[(mask, 2)]])["all"]["au_spro_05"] == pytest.approx(1.0)
    # relative 1.0 (saturation = area 4): 0.5 until FPR 0.1, then 1
    full = _ours([amap], [[(mask, 4)]])["all"]
    assert full["au_spro_05"] == pytest.approx(0.5)
    assert full["au_spro_30"] == pytest.approx((0.5 * 0.1 + 1.0 * 0.2) / 0.3)
    assert full["au_spro_100"] == pytest.approx(0.5 * 0.1 + 0.9)
    # a tie across the saturation point: 3 of the 4 pixels at 3 saturate s=3 at once
    amap.flat[:4] = [3, 3, 3, 1]
    assert _ours([amap], [[(mask, 3)]])["all"]["au_spro_05"] == pytest.approx(1.0)


def test_subsets_use_their_own_images_and_every_defect_free_pixel():
    """FPR counts the defect-free pixels of the anomalous images too (official
    get_fp_tn_areas_per_image), only of the images in the subset."""
    maps, dense = _random_case(5, ties=True)
    groups = [1, 2, 1, 0]  # the last image is good
    subsets = {"all": [0, 1, 2], "one": [0, 1], "two": [0, 2]}
    ours = _ours(maps, dense, groups, subsets)
    f32 = [m.astype(np.float32) for m in maps]
    for name, members in subsets.items():
        idx = [i for i, g in enumerate(groups) if g in members]
        for metric, limit in SPRO_LIMITS.items():
            expected = reference_au_spro([f32[i] for i in idx], [dense[i] for i in idx], limit)
            assert ours[name][metric] == pytest.approx(expected, abs=1e-9), (name, metric)


def test_native_resolution_is_exact():
    """Two 800x1600 maps (the size of LOCO's juice_bottle) with many distinct positive scores
    (the binned event path) and a defect-free one."""
    rng = np.random.default_rng(3)
    maps, dense = [], []
    for i in range(3):
        amap = np.round(rng.random((800, 1600)), 3)
        mine = []
        if i < 2:
            a, b = np.zeros(amap.shape, bool), np.zeros(amap.shape, bool)
            a[100:400, 200:900], b[300:350, 800:1500] = True, True
            amap[a] = np.minimum(amap[a] + 0.3, 1.5)
            mine = [
                (a, _saturation(int(a.sum()), 16000, False)),
                (b, _saturation(int(b.sum()), 0.5, True)),
            ]
        maps.append(amap)
        dense.append(mine)
    ours = _ours(maps, dense)["all"]
    f32 = [m.astype(np.float32) for m in maps]
    for name in ("au_spro_05", "au_spro_30"):
        assert ours[name] == pytest.approx(
            reference_au_spro(f32, dense, SPRO_LIMITS[name]), abs=1e-9
        )


def _official(maps, dense, limit: float, max_distance: float) -> float:
    """MVTec's procedure (src/aggregation.py, src/util.py): 50 thresholds at equidistant
    quantiles of the scores plus max + eps and min - eps, positives ``score > t``, thresholds
    inserted midway wherever adjacent (sPRO, FPR) points lie more than ``max_distance`` apart
    (at most 10 rounds), then the official trapezoid to ``limit`` / ``limit``."""
    flat = np.sort(np.concatenate([m.ravel() for m in maps]))
    neg = np.concatenate(
        [
            m[~np.logical_or.reduce([np.zeros(m.shape, bool), *(c for c, _ in d)])]
            for m, d in zip(maps, dense)
        ]
    )
    chans = [(m[c], s) for m, d in zip(maps, dense) for c, s in d]

    def point(t):
        spro = np.mean([min(int((v > t).sum()), s) / s for v, s in chans])
        return np.array([spro, (neg > t).sum() / neg.size])

    idx = np.linspace(0, flat.size - 1, 50).astype(int)[1:-1]
    ts = [flat[-1] + 1e-6, *flat[idx][::-1], flat[0] - 1e-6]
    ts = sorted(set(ts), reverse=True)
    pts = {t: point(t) for t in ts}
    for _ in range(10):
        ts = sorted(pts, reverse=True)
        new = [
            (a + b) / 2
            for a, b in zip(ts[:-1], ts[1:])
            if np.linalg.norm(pts[a] - pts[b]) > max_distance
        ]
        if not new:
            break
        pts.update({t: point(t) for t in new})
    curve = np.array([pts[t] for t in sorted(pts, reverse=True)])
    spro, fpr = curve[:, 0], curve[:, 1]
    inside = fpr <= limit
    x, y = fpr[inside], spro[inside]
    j = int(np.argmax(fpr > limit))
    y_limit = y[-1] + (spro[j] - y[-1]) * (limit - x[-1]) / (fpr[j] - x[-1])
    x, y = np.r_[x, limit], np.r_[y, y_limit]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / limit)


def test_exact_is_the_limit_of_the_official_threshold_sampling():
    """On random maps the official finite-threshold value (curve points at most 0.01 apart, its
    default) is within 0.001 of the exact one, and closer with finer sampling."""
    rng = np.random.default_rng(7)
    maps, dense = [], []
    for i in range(6):
        amap = rng.normal(0, 1, (40, 60))
        mine = []
        if i % 3:
            for _ in range(2):
                mask = np.zeros(amap.shape, bool)
                y, x = rng.integers(0, 30, 2)
                mask[y : y + 10, x : x + 15] = True
                amap[mask] += rng.uniform(0.5, 1.5)
                mine.append((mask, _saturation(150, 0.6, True)))
        maps.append(amap.astype(np.float32))
        dense.append(mine)
    ours = _ours(maps, dense)["all"]
    for name in ("au_spro_05", "au_spro_30"):
        coarse = abs(_official(maps, dense, SPRO_LIMITS[name], 0.01) - ours[name])
        fine = abs(_official(maps, dense, SPRO_LIMITS[name], 0.002) - ours[name])
        assert coarse < 0.001 and fine < 1e-4 and fine <= coarse, (name, coarse, fine)


def test_undefined_and_inconsistent_inputs():
    amap = torch.zeros(3, 4)
    good = spro_metrics([amap], [torch.zeros(3, 4, dtype=torch.bool)], [[]], [0], {"all": [0]})
    assert all(math.isnan(v) for v in good["all"].values())
    full = np.ones((3, 4), bool)
    assert math.isnan(au_spro(amap[None], [[(np.flatnonzero(full), 12)]]))  # no negative
    half = torch.zeros(3, 4, dtype=torch.bool)
    half[0] = True
    with pytest.raises(ValueError, match="image 0: its mask is not the union"):
        spro_metrics([amap], [half], [[(np.array([0, 1]), 2)]], [0], {"all": [0]})
    with pytest.raises(ValueError, match="one entry per image"):
        spro_metrics([amap], [half], [], [0], {"all": [0]})


@pytest.mark.parametrize("block", [1, 4])
def test_sweeping_in_blocks_changes_no_value(monkeypatch, block):
    """The curve is swept a block of distinct defective scores at a time: tiny blocks give the
    values of one block, and the definition's, for every subset."""
    from bench.metrics import events

    maps, dense = _random_case(4, ties=True)
    groups, subsets = [1, 2, 1, 0], {"all": [0, 1, 2], "one": [0, 1], "two": [0, 2]}
    whole = _ours(maps, dense, groups, subsets)
    monkeypatch.setattr(events, "BLOCK", block)
    tiny = _ours(maps, dense, groups, subsets, chunk=5)
    f32 = [m.astype(np.float32) for m in maps]
    for name, members in subsets.items():
        assert tiny[name] == pytest.approx(whole[name], abs=1e-12), name
        idx = [i for i, g in enumerate(groups) if g in members]
        for metric, limit in SPRO_LIMITS.items():
            expected = reference_au_spro([f32[i] for i in idx], [dense[i] for i in idx], limit)
            assert tiny[name][metric] == pytest.approx(expected, abs=1e-9), (name, metric)
