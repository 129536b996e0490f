"""The bootstrap: stratified resamples, every metric recomputed exactly on each resample from
per-image counts, interval coverage, and the per-image file a job keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_metrics import au_pro, auroc, average_precision, f1_max
from scipy.stats import norm

from bench.metrics import score_metrics
from bench.metrics.bootstrap import bootstrap_metrics, resample_weights
from bench.metrics.curve_stats import image_curve_stats, pixel_curve_stats
from bench.metrics.resample_sweep import sweep_resamples
from bench.metrics.significance import percentile_interval


def _category(rng, n_good=5, n_bad=7, size=(14, 18), ties=True):
    maps, masks = [], []
    for i in range(n_good + n_bad):
        m = rng.normal(size=size)
        if ties:
            m = np.round(m, 1)  # many tied scores, also between defective and other pixels
        k = np.zeros(size, dtype=bool)
        if i >= n_good:
            y, x = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 5)
            k[y : y + rng.integers(2, 5), x : x + rng.integers(2, 6)] = True
            k[rng.integers(0, size[0]), rng.integers(0, size[1])] = True  # a one-pixel region
            m = m + k * rng.uniform(0.5, 1.5)
        maps.append(torch.from_numpy(m.astype(np.float32)))
        masks.append(torch.from_numpy(k))
    labels = np.array([0] * n_good + [1] * n_bad)
    return maps, masks, labels


def test_resamples_are_stratified_seeded_and_shared_by_equal_label_orders():
    labels = np.array([0, 1, 1, 0, 1, 0, 1])
    w = resample_weights(labels, 300, seed=3)
    assert w.shape == (300, 7)
    np.testing.assert_array_equal(w[:, labels == 0].sum(axis=1), 3)
    np.testing.assert_array_equal(w[:, labels == 1].sum(axis=1), 4)
    np.testing.assert_array_equal(w, resample_weights(labels, 300, seed=3))
    assert not np.array_equal(w, resample_weights(labels, 300, seed=4))
    # every image is drawn with probability 1/class size per draw: mean weight 1
    np.testing.assert_allclose(w.mean(axis=0), 1.0, atol=0.2)


def test_each_resample_equals_the_plain_metrics_on_the_resampled_images():
    """Against independent computations on the resampled set itself (an image taken twice is
    two images): scikit-learn for AUROC/AP/F1-max, the definition for AU-PRO."""
    rng = np.random.default_rng(0)
    maps, masks, labels = _category(rng)
    weights = resample_weights(labels, 4, seed=1)
    out = sweep_resamples(pixel_curve_stats(maps, masks), weights, (0.3, 0.05))
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(labels.size), w.astype(int))
        m = np.stack([maps[i].numpy() for i in idx])
        k = np.stack([masks[i].numpy() for i in idx])
        flat_y, flat_s = k.reshape(-1), m.reshape(-1)
        expected = [
            auroc(flat_y, flat_s),
            average_precision(flat_y, flat_s),
            f1_max(flat_y, flat_s),
            au_pro(m, k, 0.3),
            au_pro(m, k, 0.05),
        ]
        np.testing.assert_allclose(out[b], expected, rtol=0, atol=1e-9)


def test_images_of_different_sizes_and_the_identity_weighting():
    rng = np.random.default_rng(5)
    maps, masks, labels = _category(rng, 4, 6)
    extra_maps, extra_masks, _ = _category(rng, 2, 3, size=(9, 23))
    maps, masks = maps + extra_maps, masks + extra_masks
    labels = np.r_[labels, [0, 0, 1, 1, 1]]
    weights = np.vstack([np.ones(labels.size), resample_weights(labels, 3, seed=0)])
    out = sweep_resamples(pixel_curve_stats(maps, masks), weights, (0.3,))
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(labels.size), w.astype(int))
        ref = score_metrics(
            [maps[i] for i in idx], [masks[i] for i in idx], [0] * idx.size, {"all": [0]}
        )
        ref = ref["all"]
        expected = [ref["pixel_auroc"], ref["pixel_ap"], ref["pixel_f1max"], ref["au_pro"]]
        np.testing.assert_allclose(out[b], expected, rtol=0, atol=1e-12)


def test_image_and_point_level_resamples_match_scikit_learn():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 9 + [1] * 11)
    scores = np.round(rng.normal(size=20) + labels, 1)
    weights = resample_weights(labels, 5, seed=7)
    image = sweep_resamples(image_curve_stats(scores, labels), weights)
    clouds = [torch.from_numpy(np.round(rng.normal(size=rng.integers(20, 40)), 1)) for _ in labels]
    truth = [torch.from_numpy(rng.random(c.numel()) < 0.2 * y) for c, y in zip(clouds, labels)]
    points = sweep_resamples(pixel_curve_stats(clouds, truth, regions=False), weights)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(labels.size), w.astype(int))
        y, s = labels[idx], scores[idx]
        np.testing.assert_allclose(
            image[b], [auroc(y, s), average_precision(y, s), f1_max(y, s)], atol=1e-12
        )
        py = np.concatenate([truth[i].numpy() for i in idx])
        ps = np.concatenate([clouds[i].numpy() for i in idx])
        np.testing.assert_allclose(
            points[b], [auroc(py, ps), average_precision(py, ps), f1_max(py, ps)], atol=1e-12
        )


def test_undefined_metrics_are_nan_on_that_resample():
    scores, labels = np.array([0.1, 0.4, 0.2]), np.array([0, 0, 0])
    out = sweep_resamples(image_curve_stats(scores, labels), np.ones((2, 3)))
    assert np.isnan(out).all()


def test_bootstrap_metrics_names_and_mean_aupimo():
    rng = np.random.default_rng(4)
    maps, masks, labels = _category(rng)
    aupimo = np.where(labels == 1, rng.random(labels.size), np.nan)
    scores = np.array([float(m.max()) for m in maps])
    boot = bootstrap_metrics(
        scores, labels, 60, 0, maps, masks, {"au_pro": 0.3, "au_pro_05": 0.05}, aupimo=aupimo
    )
    assert boot.names == [
        "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
        "au_pro", "au_pro_05", "aupimo",
    ]  # fmt: skip
    w = resample_weights(labels, 60, 0)
    for b in (0, 17, 59):
        idx = np.repeat(np.arange(labels.size), w[b].astype(int))
        chosen = aupimo[idx][labels[idx] == 1]
        assert boot.values[b, -1] == pytest.approx(chosen.mean(), abs=1e-12)
    low, high = boot.intervals()["au_pro"]
    assert (low, high) == percentile_interval(boot.values[:, 6])
    assert low < high
    record = boot.record()
    assert record["resamples"] == 60 and record["level"] == 0.95


def test_interval_coverage_of_a_known_auroc():
    """200 simulated test sets (binormal scores, 40 good and 60 anomalous images, true AUROC
    Phi(d / sqrt 2)): the 95% intervals contain the true AUROC in about 95% of them (the
    binomial band of 200 draws; the percentile bootstrap runs slightly below its level at these
    sizes)."""
    d = 1.2
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(11)
    labels = np.array([0] * 40 + [1] * 60)
    weights = resample_weights(labels, 400, seed=0)
    hits = 0
    for _ in range(200):
        scores = rng.normal(size=100) + d * labels
        values = sweep_resamples(image_curve_stats(scores, labels), weights)[:, 0]
        low, high = percentile_interval(values)
        hits += low <= truth <= high
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_segf1_and_classf1_resamples_equal_the_metrics_on_the_resampled_images():
    from bench.metrics.segf1 import class_f1, seg_metrics
    from bench.per_image import threshold_replicates

    rng = np.random.default_rng(9)
    maps, masks, labels = _category(rng, 4, 6)
    weights = resample_weights(labels, 5, seed=2)
    names, out = threshold_replicates(maps, masks, labels, 0.9, weights)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(labels.size), w.astype(int))
        seg = seg_metrics([maps[i] for i in idx], [masks[i] for i in idx], 0.9)
        cls = class_f1([maps[i] for i in idx], labels[idx].tolist(), 0.9)
        expected = [seg["seg_f1"], seg["seg_precision"], seg["seg_recall"], cls]
        np.testing.assert_allclose(out[b], expected, atol=1e-12)
    assert names == ["seg_f1", "seg_precision", "seg_recall", "class_f1"]
    assert np.isnan(threshold_replicates(maps, masks, labels, math.nan, weights)[1]).all()


def test_spro_resamples_equal_the_metric_on_the_resampled_images():
    """MVTec LOCO's AU-sPRO: each ground-truth channel saturating at its own area."""
    from bench.metrics.spro import spro_metrics

    rng = np.random.default_rng(13)
    maps, masks, labels = _category(rng, 4, 6)
    channels = []
    for k in masks:
        flat = np.flatnonzero(k.numpy().reshape(-1)).astype(np.int32)
        parts = [flat[: flat.size // 2], flat[flat.size // 2 :]] if flat.size > 1 else [flat]
        channels.append([(p, max(1, p.size // 2)) for p in parts if p.size])
    limits = {"au_spro_05": 0.05, "au_spro_30": 0.3}
    weights = resample_weights(labels, 4, seed=5)
    stats = pixel_curve_stats(maps, masks, channels=channels)
    out = sweep_resamples(stats, weights, tuple(limits.values()))[:, 3:]
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(labels.size), w.astype(int))
        ref = spro_metrics(
            [maps[i] for i in idx],
            [masks[i] for i in idx],
            [channels[i] for i in idx],
            [0] * idx.size,
            {"all": [0]},
            limits,
        )["all"]
        np.testing.assert_allclose(out[b], [ref[m] for m in limits], atol=1e-12)
