"""AUPIMO (bench.metrics.aupimo) against a brute-force computation of its definition: every
distinct score of every pixel a threshold, the shared FPR and each TPR counted over all pixels,
the curve integrated piece by piece in log10 FPR with the values interpolated at the bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.metrics.aupimo import AupimoUndefined, aupimo_scores

WIDE = (1e-2, 0.3)  # bounds that small maps can resolve


def brute_aupimo(maps, masks, labels, bounds=(1e-5, 1e-4)) -> np.ndarray:
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(m).astype(bool) for m in masks]
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]

    def at_or_above(values):  # how many of ``values`` score >= each threshold
        return values.size - np.searchsorted(np.sort(values), thresholds, side="left")

    normal = [m.ravel() for m, y in zip(maps, labels) if y == 0]
    fpr = np.mean([at_or_above(v) / v.size for v in normal], axis=0)
    with np.errstate(divide="ignore"):
        x = np.log10(fpr)
    lo, hi = math.log10(bounds[0]), math.log10(bounds[1])
    out = np.full(len(maps), np.nan)
    for i, (m, k, y) in enumerate(zip(maps, masks, labels)):
        if y == 0 or not k.any():
            continue
        tpr = at_or_above(m[k]) / k.sum()
        x0, x1, y0, y1 = x[:-1], x[1:], tpr[:-1], tpr[1:]
        part = (x1 > x0) & (x1 > lo) & (x0 < hi)
        assert np.isfinite(x0[part]).all(), "test data must resolve the lower bound"
        x0, x1, y0, y1 = x0[part], x1[part], y0[part], y1[part]
        a, b = np.maximum(x0, lo), np.minimum(x1, hi)
        ya = y0 + (y1 - y0) * (a - x0) / (x1 - x0)
        yb = y0 + (y1 - y0) * (b - x0) / (x1 - x0)
        out[i] = np.sum((b - a) * (ya + yb) / 2) / (hi - lo)
    return out


def make_data(seed: int, n_normal: int, n_anomalous: int, side: int, step: float):
    """Maps of several sizes (about ``side`` px a side), Gaussian scores rounded to ``step``
    (ties), blob defects scoring higher, some defective scores copied from normal ones (ties
    across images); the top normal score is unique so that low FPRs are resolved."""
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for i in range(n_normal + n_anomalous):
        h, w = (int(side * f) for f in rng.uniform(0.8, 1.2, 2))
        z = np.round(rng.standard_normal((h, w)) / step) * step
        mask = np.zeros((h, w), dtype=bool)
        if i >= n_normal:
            yy, xx = np.ogrid[:h, :w]
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, side / 8
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            z[mask] += np.round(rng.uniform(2.5, 4.5) / step) * step
        maps.append(z.astype(np.float32))
        masks.append(mask)
        labels.append(int(i >= n_normal))
    normal_top = np.sort(np.concatenate([m.ravel() for m in maps[:n_normal]]))[-200:]
    for m, k in zip(maps[n_normal:], masks[n_normal:]):
        idx = np.flatnonzero(k)
        chosen = rng.choice(idx, size=min(40, idx.size), replace=False)
        m.ravel()[chosen] = rng.choice(normal_top[:-1], size=chosen.size)
    maps[0][0, 0] = normal_top[-1] + 1.0
    return maps, masks, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_at_the_paper_bounds(seed):
    maps, masks, labels = make_data(seed, n_normal=4, n_anomalous=4, side=180, step=1e-3)
    got = aupimo_scores(maps, masks, labels)
    want = brute_aupimo(maps, masks, labels)
    assert np.isnan(got.aupimo[:4]).all()
    assert np.nanmax(want) > 0.05 and np.nanmin(want) < 0.95  # curves cross the range
    np.testing.assert_allclose(got.aupimo, want, rtol=0, atol=1e-12)
    assert got.num_normal == 4 and got.num_anomalous == 4


@pytest.mark.parametrize(("seed", "n_normal"), [(3, 1), (4, 3), (5, 6)])
def test_matches_brute_force_with_heavy_ties(seed, n_normal):
    """Coarse scores: many pixels share each score, defective and normal alike, and the
    partial selection's cut falls inside runs of equal scores."""
    maps, masks, labels = make_data(seed, n_normal, n_anomalous=3, side=24, step=0.25)
    got = aupimo_scores(
        [torch.from_numpy(m) for m in maps], [k.astype(np.uint8) for k in masks], labels, WIDE
    )
    np.testing.assert_allclose(got.aupimo, brute_aupimo(maps, masks, labels, WIDE), atol=1e-12)


def test_matches_brute_force_with_many_normal_images():
    """Twenty normal images: the pool of top normal scores is cut several times as it grows."""
    maps, masks, labels = make_data(11, n_normal=20, n_anomalous=3, side=120, step=1e-3)
    bounds = (3e-3, 3e-2)
    got = aupimo_scores(maps, masks, labels, bounds)
    np.testing.assert_allclose(got.aupimo, brute_aupimo(maps, masks, labels, bounds), atol=1e-12)


def test_thresholds_are_where_the_shared_fpr_reaches_the_bounds():
    maps, masks, labels = make_data(6, n_normal=3, n_anomalous=2, side=20, step=0.1)
    got = aupimo_scores(maps, masks, labels, WIDE)
    normal = np.concatenate([m.ravel() for m, y in zip(maps, labels) if y == 0])

    def fpr(t, strict=False):
        per = [(m > t if strict else m >= t).mean() for m, y in zip(maps, labels) if y == 0]
        return float(np.mean(per))

    for t, f, bound in zip(got.thresholds, got.shared_fpr_at_thresholds, WIDE):
        assert t in normal and f == pytest.approx(fpr(t), abs=1e-15)
        assert fpr(t, strict=True) < bound <= fpr(t) + 1e-15


def test_perfect_and_hopeless_detectors():
    maps, masks, labels = make_data(7, n_normal=4, n_anomalous=3, side=180, step=1e-3)
    top = max(float(m.max()) for m, y in zip(maps, labels) if y == 0)
    low = min(float(m.min()) for m, y in zip(maps, labels) if y == 0)
    perfect = [np.where(k, top + 1 + m, m) for m, k in zip(maps, masks)]
    hopeless = [np.where(k, low - 1 - m * m, m) for m, k in zip(maps, masks)]
    np.testing.assert_allclose(aupimo_scores(perfect, masks, labels).aupimo[4:], 1.0, atol=1e-12)
    assert (aupimo_scores(hopeless, masks, labels).aupimo[4:] == 0).all()


def test_maps_constant_on_each_image():
    """Ten normal images scoring 0..9 put the shared FPR on multiples of 0.1; an anomalous
    image scoring c has TPR 1 at thresholds <= c, else 0: its curve steps at F(> c), or slopes
    linearly in log10 F from F(> c) to F(>= c) when c ties a normal score."""
    normal = [np.full((4, 5), float(c)) for c in range(10)]
    anomalous = {
        9.5: 1.0,
        7.5: math.log10(1 / 0.2),
        6.0: 0.5 * math.log10(0.4 / 0.3) + math.log10(1 / 0.4),
        0.5: math.log10(1 / 0.9),
        -1.0: 0.0,
    }
    maps = normal + [np.full((3, 3), c) for c in anomalous]
    masks = [np.zeros(m.shape, bool) for m in normal] + [np.ones((3, 3), bool)] * len(anomalous)
    labels = [0] * 10 + [1] * len(anomalous)
    got = aupimo_scores(maps, masks, labels, (0.1, 1.0)).aupimo[10:]
    np.testing.assert_allclose(got, list(anomalous.values()), atol=1e-12)


def test_invariant_to_a_monotone_transform_of_all_scores():
    maps, masks, labels = make_data(8, n_normal=4, n_anomalous=3, side=180, step=1e-3)
    bent = [np.exp(3 * m.astype(np.float64)) * 5 - 2 for m in maps]
    np.testing.assert_allclose(
        aupimo_scores(bent, masks, labels).aupimo,
        aupimo_scores(maps, masks, labels).aupimo,
        atol=1e-12,
    )


def test_anomalous_image_without_defect_is_nan_and_left_out():
    maps, masks, labels = make_data(9, n_normal=3, n_anomalous=3, side=24, step=0.25)
    empty = [*masks[:4], np.zeros_like(masks[4]), masks[5]]
    got = aupimo_scores(maps, empty, labels, WIDE)
    without = aupimo_scores(
        maps[:4] + maps[5:], masks[:4] + masks[5:], labels[:4] + labels[5:], WIDE
    )
    assert got.empty_masks == (4,) and np.isnan(got.aupimo[4])
    np.testing.assert_array_equal(got.aupimo[[3, 5]], without.aupimo[[3, 4]])
    assert got.mean == pytest.approx(np.nanmean(without.aupimo), abs=1e-15)


def _small():
    maps, masks, labels = make_data(10, n_normal=2, n_anomalous=2, side=24, step=0.25)
    return maps, masks, labels


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: (d[0], d[1], [1, 1, 1, 1]), AupimoUndefined, "at least one normal"),
        (lambda d: (d[0], d[1], [0, 0, 0, 0]), AupimoUndefined, "at least one anomalous"),
        (
            lambda d: ([*d[0][:3], np.where(d[1][3], np.nan, d[0][3])], d[1], d[2]),
            ValueError,
            "map 3 has NaN",
        ),
        (
            lambda d: ([np.full_like(d[0][0], np.inf), *d[0][1:]], d[1], d[2]),
            ValueError,
            "map 0 has NaN or infinite",
        ),
        (lambda d: (d[0], [d[1][0], d[1][1][1:], *d[1][2:]], d[2]), ValueError, "mask 1 has shape"),
        (lambda d: (d[0], d[1][:3], d[2]), ValueError, "one entry per image"),
        (lambda d: (d[0], d[1], [0, 0, 1, 2]), ValueError, "labels must be 0"),
        (
            lambda d: (d[0], [d[1][3], *d[1][1:]], d[2]),
            ValueError,
            "mask 0 has shape|image 0 is labelled normal",
        ),
        (
            lambda d: (d[0], [np.ones_like(d[1][0]), *d[1][1:]], d[2]),
            ValueError,
            "image 0 is labelled normal",
        ),
        (
            lambda d: (d[0], [d[1][0], d[1][1], *(np.zeros_like(k) for k in d[1][2:])], d[2]),
            AupimoUndefined,
            "no anomalous image has a defective",
        ),
        (
            lambda d: ([d[0][0][None], *d[0][1:]], d[1], d[2]),
            ValueError,
            "map 0 must be a non-empty 2-D",
        ),
        (
            lambda d: (d[0], [d[1][0], d[1][1], d[1][2] * 2, d[1][3]], d[2]),
            ValueError,
            "mask 2 must be bool or 0/1",
        ),
    ],
)
def test_bad_input_is_a_clear_error(change, error, match):
    maps, masks, labels = change(_small())
    with pytest.raises(error, match=match):
        aupimo_scores(maps, masks, labels, WIDE)


def test_lower_bound_out_of_reach_is_undefined():
    """About 1,200 normal pixels cannot resolve a shared FPR of 1e-5."""
    maps, masks, labels = _small()
    with pytest.raises(AupimoUndefined, match="never falls to the lower bound 1e-05"):
        aupimo_scores(maps, masks, labels)


@pytest.mark.parametrize("bounds", [(1e-4, 1e-5), (0.0, 0.1), (0.1, 1.5), (0.1,)])
def test_bad_bounds(bounds):
    with pytest.raises(ValueError, match="fpr_bounds"):
        aupimo_scores(*_small(), bounds)
