"""bench.metrics.significance against independent computations: DeLong against the O(m n)
placement-value definition and scikit-learn's AUC, its calibration on simulated detectors with
known AUCs, the bootstrap against numpy, Holm against hand-worked values and the step-down
procedure, Wilcoxon against scipy and the exact sign-flip distribution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom, norm, rankdata, wilcoxon
from sklearn.metrics import roc_auc_score

from bench.metrics.significance import (
    auc_interval,
    auc_variance,
    bootstrap_difference,
    combine_delong,
    combine_mean_differences,
    delong,
    holm,
    percentile_interval,
    wilcoxon_paired,
)


def brute_delong(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs [k], covariance [k, k]) by DeLong's definition: the kernel psi over every
    (positive, negative) pair (1 if the positive scores higher, 1/2 on a tie), structural
    components V10 (mean over negatives) and V01 (mean over positives), S10/m + S01/n."""
    x, y = scores[:, labels == 1], scores[:, labels == 0]
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    m, n = x.shape[1], y.shape[1]
    s10, s01 = np.atleast_2d(np.cov(v10)), np.atleast_2d(np.cov(v01))
    return psi.mean(axis=(1, 2)), s10 / m + s01 / n


def correlated_pair(rng, n_pos, n_neg, shift_a, shift_b, rho):
    """Binormal scores of two detectors on the same samples: normal N(0, 1), anomalous shifted,
    the two detectors' noise correlated ``rho``. True AUC: Phi(shift / sqrt(2))."""
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    e1, e2 = rng.standard_normal((2, labels.size))
    e2 = rho * e1 + math.sqrt(1 - rho**2) * e2
    return e1 + shift_a * labels, e2 + shift_b * labels, labels


def binomial_bounds(n: int, p: float, tail: float = 5e-4) -> tuple[float, float]:
    """Counts outside these fall with probability < 2 * tail when the true rate is ``p``."""
    return binom.ppf(tail, n, p), binom.isf(tail, n, p)


@pytest.mark.parametrize("seed", range(4))
def test_delong_matches_the_placement_definition_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 90))
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2], labels[2:4] = 1, 0
    # coarse scores: many ties within and across classes
    a = np.round(rng.normal(size=n) + labels, 1 if seed % 2 else 0)
    b = np.round(0.6 * a + rng.normal(size=n) + 0.5 * labels, 1)
    aucs, cov = brute_delong(np.stack([a, b]), labels)
    result = delong(a, b, labels)
    assert result.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert result.auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert result.diff == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert result.variance == pytest.approx(variance, rel=1e-9)
    z = (aucs[0] - aucs[1]) / math.sqrt(variance)
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(2 * norm.cdf(-abs(z)), rel=1e-9)
    half = norm.ppf(0.95) * math.sqrt(variance)
    low = delong(a, b, labels, level=0.9)
    assert (low.ci_low, low.ci_high) == pytest.approx((low.diff - half, low.diff + half))
    assert auc_variance(a, labels) == pytest.approx(cov[0, 0], rel=1e-9)
    assert auc_variance(b, labels.astype(bool)) == pytest.approx(cov[1, 1], rel=1e-9)


def test_delong_degenerate_cases_and_bad_input():
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(10, int), np.zeros(15, int)]
    a = rng.normal(size=25) + labels
    same = delong(a, a.copy(), labels)
    assert (same.diff, same.variance, same.z, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (same.ci_low, same.ci_high) == (0.0, 0.0)
    # a perfect detector against a constant one: AUC 1 vs 1/2, every component certain
    sure = delong(labels.astype(float), np.zeros(25), labels)
    assert (sure.auc_a, sure.auc_b, sure.variance) == (1.0, 0.5, 0.0)
    assert sure.z == math.inf and sure.p_value == 0.0
    with pytest.raises(ValueError, match="both classes"):
        delong(a, a, np.ones(25))
    with pytest.raises(ValueError, match="at least 2 anomalous"):
        auc_variance(a, np.r_[1, np.zeros(24)])
    with pytest.raises(ValueError, match="binary"):
        delong(a, a, labels * 2)
    with pytest.raises(ValueError, match="same samples"):
        delong(a, a[:-1], labels)
    with pytest.raises(ValueError, match="finite"):
        delong(np.r_[np.nan, a[1:]], a, labels)
    with pytest.raises(ValueError, match="level"):
        delong(a, a, labels, level=95)


def test_delong_rejects_at_its_nominal_rate_when_the_true_aucs_are_equal():
    rng = np.random.default_rng(2024)
    p_values = [delong(*correlated_pair(rng, 80, 120, 1.0, 1.0, 0.6)).p_value for _ in range(200)]
    rejections = int(np.sum(np.array(p_values) < 0.05))
    low, high = binomial_bounds(200, 0.05)
    assert low <= rejections <= high, rejections
    # and power where they differ (0.76 vs 0.87): about 97% here, about 43% were the variance
    # 4x too large (z halved), so more than 80% of 50 rejections fails by chance ~1e-7 either way
    p_far = [delong(*correlated_pair(rng, 80, 120, 1.0, 1.6, 0.6)).p_value for _ in range(50)]
    assert np.mean(np.array(p_far) < 0.05) > 0.8


def test_delong_interval_of_one_auc_covers_the_true_binormal_auc():
    rng = np.random.default_rng(11)
    shift = 1.0
    truth = norm.cdf(shift / math.sqrt(2))
    covered = 0  # DeLong's interval undercovers a little in small sets (94.5% at 70 + 130)
    for _ in range(200):
        a, _, labels = correlated_pair(rng, 150, 150, shift, shift, 0.0)
        auc, low, high = auc_interval(a, labels)
        assert auc == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
        half = 1.959963984540054 * math.sqrt(auc_variance(a, labels))
        assert (low, high) == pytest.approx((auc - half, min(1.0, auc + half)))
        covered += low <= truth <= high
    low_count, high_count = binomial_bounds(200, 0.95)
    assert low_count <= covered <= high_count, covered


def test_auc_interval_is_clipped_to_the_unit_interval():
    labels = np.r_[np.ones(5, int), np.zeros(5, int)]
    scores = np.r_[3.5, 5, 6, 7, 8, np.arange(5)]  # one swapped pair (3.5 < 4): AUC 24/25
    auc, low, high = auc_interval(scores, labels)
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    assert high == 1.0 and 0 < low < auc


def test_combined_mean_difference_is_a_calibrated_z_test():
    rng = np.random.default_rng(5)
    shifts = [0.5, 1.0, 1.5, 2.0, 2.5]  # categories of different difficulty, equal detectors
    p_values = []
    for _ in range(200):
        results = [delong(*correlated_pair(rng, 40, 60, s, s, 0.5)) for s in shifts]
        combined = combine_delong(results)
        diffs = np.array([r.diff for r in results])
        variance = np.sum([r.variance for r in results]) / len(shifts) ** 2
        assert combined.diff == pytest.approx(diffs.mean())
        assert combined.variance == pytest.approx(variance)
        assert combined.auc_a == pytest.approx(np.mean([r.auc_a for r in results]))
        assert combined.p_value == pytest.approx(
            2 * norm.sf(abs(diffs.mean()) / math.sqrt(variance))
        )
        p_values.append(combined.p_value)
    low, high = binomial_bounds(200, 0.05)
    assert low <= int(np.sum(np.array(p_values) < 0.05)) <= high


def test_combine_mean_differences_edge_cases():
    test = combine_mean_differences([0.02, -0.01, 0.05], [1e-4, 4e-4, 4e-4], level=0.9)
    se = math.sqrt(9e-4 / 9)
    assert test.diff == pytest.approx(0.02) and test.z == pytest.approx(0.02 / se)
    assert test.ci_low == pytest.approx(0.02 - norm.ppf(0.95) * se)
    assert math.isnan(combine_mean_differences([0.1, np.nan], [1e-3, 1e-3]).p_value)
    assert combine_mean_differences([0.0, 0.0], [0.0, 0.0]).p_value == 1.0
    with pytest.raises(ValueError, match="one value per category"):
        combine_mean_differences([0.1], [1e-3, 1e-3])
    with pytest.raises(ValueError, match=">= 0"):
        combine_mean_differences([0.1], [-1e-3])


def fast_aucs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row of ``scores`` [B, N] with ``labels`` [B, N] (NaN without
    both classes), for many bootstrap resamples at once."""
    ranks = rankdata(scores, axis=1)
    m = labels.sum(axis=1)
    n = labels.shape[1] - m
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(axis=1) - m * (m + 1) / 2) / (m * n)


def paired_resamples(rng, a, b, labels, count):
    """AUCs of detectors a and b on the same ``count`` resamples of the test set."""
    index = rng.integers(0, labels.size, size=(count, labels.size))
    return fast_aucs(a[index], labels[index]), fast_aucs(b[index], labels[index])


def test_bootstrap_difference_matches_numpy_and_drops_undefined_resamples():
    rng = np.random.default_rng(3)
    a, b, labels = correlated_pair(
        rng, 4, 16, 1.5, 0.5, 0.5
    )  # few anomalies: some resamples lack one
    boot_a, boot_b = paired_resamples(rng, a, b, labels, 999)
    nan = np.isnan(boot_a)
    assert 0 < nan.sum() < 100
    observed_a, observed_b = roc_auc_score(labels, a), roc_auc_score(labels, b)
    result = bootstrap_difference(boot_a, boot_b, observed_a, observed_b, level=0.9)
    d = (boot_a - boot_b)[~nan]
    assert (result.n_resamples, result.n_dropped) == (d.size, nan.sum())
    assert result.diff == pytest.approx(observed_a - observed_b)
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.percentile(d, [5, 95])))
    tails = min(np.sum(d <= 0), np.sum(d >= 0))
    assert result.p_value == pytest.approx(min(1.0, 2 * (tails + 1) / (d.size + 1)))
    assert percentile_interval(np.r_[boot_a, np.nan], 0.5) == pytest.approx(
        tuple(np.nanpercentile(boot_a, [25, 75]))
    )


def test_bootstrap_p_value_bounds():
    ones = np.ones(99)
    certain = bootstrap_difference(ones, np.zeros(99), 1.0, 0.0)
    assert certain.p_value == pytest.approx(2 / 100) and certain.p_value > 0
    assert bootstrap_difference(ones, ones, 1.0, 1.0).p_value == 1.0
    undefined = bootstrap_difference(np.full(5, np.nan), ones[:5], np.nan, 1.0)
    assert math.isnan(undefined.p_value) and undefined.n_dropped == 5
    assert math.isnan(percentile_interval([np.nan, np.nan])[0])
    with pytest.raises(ValueError, match="same ones"):
        bootstrap_difference(ones, ones[:-1], 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one value"):
        percentile_interval([])


def test_bootstrap_and_delong_agree_on_the_interval_of_a_difference():
    rng = np.random.default_rng(17)
    a, b, labels = correlated_pair(rng, 100, 100, 1.2, 0.9, 0.5)
    test = delong(a, b, labels)
    boot = bootstrap_difference(*paired_resamples(rng, a, b, labels, 2000), test.auc_a, test.auc_b)
    se = math.sqrt(test.variance)
    assert abs(boot.ci_low - test.ci_low) < 0.3 * se
    assert abs(boot.ci_high - test.ci_high) < 0.3 * se


def test_holm_on_hand_worked_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN stays NaN and m = 3: 0.01 -> 0.03, 0.2 -> 0.4, 0.5 -> 0.5
    assert holm([0.5, np.nan, 0.2, 0.01]) == pytest.approx([0.5, np.nan, 0.4, 0.03], nan_ok=True)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # 1.2 capped, then the running max
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])
    assert holm([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def step_down_rejections(p: np.ndarray, alpha: float) -> set[int]:
    """Holm's procedure itself: walk the sorted p-values, reject while p_(i) <= alpha/(m-i+1)."""
    order = np.argsort(p, kind="stable")
    rejected = set()
    for i, index in enumerate(order):
        if p[index] > alpha / (p.size - i):
            break
        rejected.add(int(index))
    return rejected


def test_holm_properties_and_the_step_down_procedure():
    rng = np.random.default_rng(9)
    for _ in range(50):
        p = np.r_[rng.random(8) * 0.1, rng.random(4)]
        adjusted = holm(p)
        assert np.all(adjusted >= p) and np.all(adjusted <= 1)
        order = np.argsort(p)
        assert np.all(np.diff(adjusted[order]) >= 0)  # monotone in p
        for alpha in (0.01, 0.05, 0.1):
            assert set(np.flatnonzero(adjusted <= alpha)) == step_down_rejections(p, alpha)


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(1).random(12) ** 3
    assert holm(p) == pytest.approx(multitest.multipletests(p, method="holm")[1])


def test_wilcoxon_paired_matches_scipy_without_the_undefined_pairs():
    rng = np.random.default_rng(4)
    a = rng.random(40)
    b = np.clip(a - 0.05 + 0.1 * rng.normal(size=40), 0, 1)
    a[[3, 9]], b[[9, 20]] = np.nan, np.nan
    keep = ~(np.isnan(a) | np.isnan(b))
    result = wilcoxon_paired(a, b)
    expected = wilcoxon(a[keep], b[keep])
    assert (result.n, result.n_dropped) == (37, 3)
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.median_difference == pytest.approx(np.median(a[keep] - b[keep]))


def test_wilcoxon_paired_against_the_exact_sign_flip_distribution():
    d = np.array([0.3, -0.1, 0.7, 0.55, 0.2, -0.45, 0.9, 0.05, 0.62, 0.81])
    ranks = np.arange(1, 11)[np.argsort(np.argsort(np.abs(d)))]
    w_plus = ranks[d > 0].sum()
    # every sign assignment is equally likely under the null
    sums = np.array([ranks[np.array(s, bool)].sum() for s in itertools.product((0, 1), repeat=10)])
    p = min(1.0, 2 * min(np.mean(sums <= w_plus), np.mean(sums >= w_plus)))
    result = wilcoxon_paired(d + 1.0, np.ones(10))
    assert result.p_value == pytest.approx(p)
    assert result.statistic == min(w_plus, ranks.sum() - w_plus)


def test_wilcoxon_paired_degenerate_cases():
    values = np.array([0.5, 0.7, np.nan, 0.9])
    same = wilcoxon_paired(values, values.copy())
    assert (same.statistic, same.p_value, same.n, same.n_dropped) == (0.0, 1.0, 3, 1)
    assert same.median_difference == 0.0
    empty = wilcoxon_paired([np.nan], [1.0])
    assert math.isnan(empty.p_value) and empty.n == 0
    with pytest.raises(ValueError, match="same images"):
        wilcoxon_paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="infinity"):
        wilcoxon_paired([np.inf], [1.0])
