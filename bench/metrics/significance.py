"""Paired comparisons of detectors scored on the same test images: DeLong's test of two
correlated ROC AUCs, its combination over categories, the paired bootstrap, Holm's adjustment
and the Wilcoxon signed-rank test of per-image values.

Pure numpy/scipy on 1-D arrays; the callers (``bench compare``, the leaderboard marks) gather the
scores. Every interval is two-sided at ``level`` (default 0.95), every p-value two-sided.

- :func:`delong`, :func:`auc_variance`, :func:`auc_interval`: DeLong, DeLong & Clarke-Pearson
  (1988, Biometrics 44:837), computed with the midrank algorithm of Sun & Xu (2014, IEEE Signal
  Processing Letters 21:1389, "Fast implementation of DeLong's algorithm"). Ties count 1/2, so
  each AUC equals scikit-learn's ``roc_auc_score`` and the harness's ``image_auroc``; Z, p and
  the interval match pROC's ``roc.test`` (paired, two-sided) and ``ci.auc`` (checked on pROC's aSAH
  example during development).
- :func:`combine_mean_differences`, :func:`combine_delong`: the mean over categories of
  per-category differences (independent test sets) as a z test.
- :func:`percentile_interval`, :func:`bootstrap_difference`: the paired percentile bootstrap.
- :func:`holm`: Holm's (1979) step-down adjusted p-values.
- :func:`wilcoxon_paired`: the Wilcoxon signed-rank test of per-image values (e.g. AUPIMO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm, rankdata, wilcoxon

__all__ = [
    "BootstrapDifference",
    "DeLong",
    "Wilcoxon",
    "ZTest",
    "auc_interval",
    "auc_variance",
    "bootstrap_difference",
    "combine_delong",
    "combine_mean_differences",
    "delong",
    "holm",
    "percentile_interval",
    "wilcoxon_paired",
]


@dataclass(frozen=True)
class ZTest:
    """A difference tested against 0 with a normal approximation: ``z = diff / sqrt(variance)``,
    ``p_value`` two-sided, ``[ci_low, ci_high]`` the normal interval of ``diff`` at ``level``.
    A zero variance gives ``z = 0, p = 1`` when ``diff == 0`` (identical detectors) and
    ``z = +-inf, p = 0`` otherwise, with the interval collapsed to ``diff``."""

    diff: float
    variance: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    level: float


@dataclass(frozen=True)
class DeLong(ZTest):
    """DeLong's test of ``auc_a - auc_b`` (``diff``) for two detectors on the same samples; for
    a combination over categories, ``auc_a`` and ``auc_b`` are the means over categories."""

    auc_a: float = math.nan
    auc_b: float = math.nan


@dataclass(frozen=True)
class BootstrapDifference:
    """The paired bootstrap of ``value_a - value_b``: ``diff`` the observed difference,
    ``[ci_low, ci_high]`` the percentile interval of the resampled differences at ``level``,
    ``p_value`` as in :func:`bootstrap_difference`; ``n_resamples`` resamples on which both
    metrics are defined, ``n_dropped`` those left out because one is NaN."""

    value_a: float
    value_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    level: float
    n_resamples: int
    n_dropped: int


@dataclass(frozen=True)
class Wilcoxon:
    """The Wilcoxon signed-rank test of paired values: scipy's ``statistic`` (two-sided: the
    smaller of the positive and negative rank sums), ``p_value``, ``n`` pairs where both values
    are defined, ``n_dropped`` pairs left out (a NaN), ``median_difference`` of ``a - b``."""

    statistic: float
    p_value: float
    n: int
    n_dropped: int
    median_difference: float


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")
    return float(level)


def _vector(values: ArrayLike, name: str, finite: bool = True) -> np.ndarray:
    """``values`` as a 1-D float64 array; ``finite`` rejects NaN and infinity."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if finite and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers (no NaN or infinity)")
    return array


def _positives(labels: ArrayLike, n: int) -> np.ndarray:
    """Binary labels (bool, or numbers 0 and 1) as a bool mask; both classes, twice each."""
    raw = np.asarray(labels)
    if raw.shape != (n,):
        raise ValueError(
            f"labels must be a 1-D array of {n} values (one per score), got {raw.shape}"
        )
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise ValueError("labels must be binary: bool, or 0 (normal) and 1 (anomalous)")
    positive = raw.astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(
            f"labels need both classes for an AUC, got {n_pos} anomalous and {n - n_pos} normal"
        )
    if n_pos < 2 or n - n_pos < 2:
        raise ValueError(
            "DeLong's variance needs at least 2 anomalous and 2 normal samples, "
            f"got {n_pos} anomalous and {n - n_pos} normal"
        )
    return positive


def _components(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components for each row of ``scores`` ([k, N]), by Sun & Xu's midranks:
    V10 [k, m] per positive, the share of negatives it outscores (ties 1/2); V01 [k, n] per
    negative, the share of positives that outscore it. Each AUC is the mean of either."""
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tz = rankdata(np.concatenate([x, y], axis=1), axis=1)  # midranks, ties averaged
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)
    return (tz[:, :m] - tx) / n, 1.0 - (tz[:, m:] - ty) / m


def _contrast_variance(v10: np.ndarray, v01: np.ndarray) -> float:
    """``S10/m + S01/n`` for one row of components: the variance of an AUC, or of a difference
    of AUCs when given the differences of two detectors' components (``L S L'``, never < 0)."""
    return float(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size)


def _z_test(diff: float, variance: float, level: float) -> dict[str, float]:
    """The fields of :class:`ZTest` but ``level``, zero variance handled as it says."""
    level = _check_level(level)
    if math.isnan(diff) or math.isnan(variance):
        nan = math.nan
        return dict(diff=diff, variance=variance, z=nan, p_value=nan, ci_low=nan, ci_high=nan)
    se = math.sqrt(variance)
    if se == 0.0:  # no variability: the difference is certain
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    else:
        z = diff / se
    half = float(norm.ppf(0.5 + level / 2)) * se
    p_value = 1.0 if z == 0.0 else float(2.0 * norm.sf(abs(z)))
    return dict(
        diff=diff, variance=variance, z=z, p_value=p_value, ci_low=diff - half, ci_high=diff + half
    )


def auc_variance(scores: ArrayLike, labels: ArrayLike) -> float:
    """DeLong's variance of one AUC (``S10/m + S01/n``; labels: 1 or True = anomalous)."""
    s = _vector(scores, "scores")
    v10, v01 = _components(s[None], _positives(labels, s.size))
    return _contrast_variance(v10[0], v01[0])


def auc_interval(
    scores: ArrayLike, labels: ArrayLike, level: float = 0.95
) -> tuple[float, float, float]:
    """(AUC, low, high): the normal interval ``AUC +- z sqrt(var)`` with DeLong's variance,
    clipped to [0, 1] (as pROC's ``ci.auc(method="delong")``)."""
    s = _vector(scores, "scores")
    v10, v01 = _components(s[None], _positives(labels, s.size))
    auc = float(v10.mean())
    half = float(norm.ppf(0.5 + _check_level(level) / 2)) * math.sqrt(
        _contrast_variance(v10[0], v01[0])
    )
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong(
    scores_a: ArrayLike, scores_b: ArrayLike, labels: ArrayLike, level: float = 0.95
) -> DeLong:
    """DeLong's test of two correlated AUCs: detectors a and b scored the same samples
    (``labels``: 1 or True = anomalous). ``diff = auc_a - auc_b``, its variance
    ``Var(a) + Var(b) - 2 Cov(a, b)`` from the covariance ``S10/m + S01/n`` of the structural
    components, two-sided p-value and normal interval at ``level``. Identical scores give
    ``diff = 0``, variance 0 and ``p = 1``."""
    a, b = _vector(scores_a, "scores_a"), _vector(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must score the same samples: {a.size} vs {b.size}")
    v10, v01 = _components(np.stack([a, b]), _positives(labels, a.size))
    auc_a, auc_b = float(v10[0].mean()), float(v10[1].mean())
    variance = _contrast_variance(v10[0] - v10[1], v01[0] - v01[1])
    return DeLong(**_z_test(auc_a - auc_b, variance, level), level=level, auc_a=auc_a, auc_b=auc_b)


def combine_mean_differences(diffs: ArrayLike, variances: ArrayLike, level: float = 0.95) -> ZTest:
    """The mean over C categories of per-category differences (e.g. DeLong's ``diff``) as a z
    test: the categories are independent test sets, so the mean's variance is
    ``sum(variances) / C**2``. A NaN difference or variance makes the result NaN: leave
    undefined categories out first, as the leaderboard's mean does."""
    d = _vector(diffs, "diffs", finite=False)
    v = _vector(variances, "variances", finite=False)
    if d.size == 0 or d.shape != v.shape:
        raise ValueError(f"diffs and variances need one value per category: {d.size} vs {v.size}")
    if np.any(np.isinf(d)) or np.any(np.isinf(v)) or np.any(v < 0):
        raise ValueError("variances must be >= 0 and diffs and variances finite (or NaN)")
    return ZTest(**_z_test(float(d.mean()), float(v.sum() / d.size**2), level), level=level)


def combine_delong(results: list[DeLong], level: float = 0.95) -> DeLong:
    """:func:`combine_mean_differences` of per-category DeLong tests, with the mean AUCs."""
    if not results:
        raise ValueError("combine_delong needs at least one per-category DeLong result")
    test = combine_mean_differences([r.diff for r in results], [r.variance for r in results], level)
    return DeLong(
        **vars(test),
        auc_a=float(np.mean([r.auc_a for r in results])),
        auc_b=float(np.mean([r.auc_b for r in results])),
    )


def percentile_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The equal-tailed percentile interval: the ``(1 - level)/2`` and ``(1 + level)/2``
    quantiles of ``values`` (numpy's default linear interpolation). NaN values are left out;
    (NaN, NaN) when none is left."""
    v = _vector(values, "values", finite=False)
    level = _check_level(level)
    if v.size == 0:
        raise ValueError("percentile_interval needs at least one value")
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_difference(
    boot_a: ArrayLike,
    boot_b: ArrayLike,
    observed_a: float,
    observed_b: float,
    level: float = 0.95,
) -> BootstrapDifference:
    """The paired bootstrap of a metric difference: ``boot_a[i]`` and ``boot_b[i]`` are the two
    detectors' metric on the SAME resample i of the test set. Resamples where either is NaN (the
    metric undefined, e.g. one class missing) are dropped and counted.

    The interval is the percentile interval of ``d = boot_a - boot_b``. The two-sided p-value
    inverts it (the smallest ``1 - level`` whose interval excludes 0), with the Monte Carlo
    correction that keeps it above 0: ``p = min(1, 2 min((1 + #{d <= 0}) / (1 + B),
    (1 + #{d >= 0}) / (1 + B)))`` over the B kept resamples; 2/(B+1) is the smallest. This is
    the percentile-bootstrap p-value ``2 min(p*, 1 - p*)`` of Wilcox (Introduction to Robust
    Estimation and Hypothesis Testing), ties ``d = 0`` counted in both tails (conservative), with
    the ``(1 + r)/(1 + B)`` rule of Davison & Hinkley (1997, Bootstrap Methods and their
    Application, ch. 4) and North, Curtis & Sham (2002, Am. J. Hum. Genet. 71:439). Identical
    metrics (every d = 0) give p = 1."""
    a, b = _vector(boot_a, "boot_a", finite=False), _vector(boot_b, "boot_b", finite=False)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"boot_a and boot_b need one value per resample, the same ones: {a.size} vs {b.size}"
        )
    level = _check_level(level)
    d = a - b
    d = d[~np.isnan(d)]
    value_a, value_b = float(observed_a), float(observed_b)
    if d.size == 0:
        p_value = math.nan
    else:
        below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
        p_value = min(1.0, 2.0 * (1 + min(below, above)) / (1 + d.size))
    low, high = percentile_interval(d, level) if d.size else (math.nan, math.nan)
    return BootstrapDifference(
        value_a=value_a,
        value_b=value_b,
        diff=value_a - value_b,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        level=level,
        n_resamples=int(d.size),
        n_dropped=int(a.size - d.size),
    )


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, in the input order: with the m defined
    p-values sorted ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. Monotone
    in p, capped at 1; NaN entries stay NaN and do not count in m. Reject where adj <= alpha."""
    p = _vector(p_values, "p_values", finite=False)
    defined = ~np.isnan(p)
    q = p[defined]
    if np.any((q < 0) | (q > 1)):
        raise ValueError("p_values must lie in [0, 1] (or be NaN)")
    m = q.size
    order = np.argsort(q, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    out = np.full(p.shape, np.nan)
    out[defined] = adjusted
    return out


def wilcoxon_paired(a: ArrayLike, b: ArrayLike) -> Wilcoxon:
    """The Wilcoxon signed-rank test (two-sided, ``scipy.stats.wilcoxon`` with its defaults:
    zero differences dropped, exact null distribution for small samples without ties) of paired
    per-image values ``a[i]``, ``b[i]`` (e.g. AUPIMO). Pairs with a NaN are dropped and counted.
    All differences zero gives statistic 0 and p = 1; no pair left gives NaN."""
    x, y = _vector(a, "a", finite=False), _vector(b, "b", finite=False)
    if x.shape != y.shape:
        raise ValueError(f"a and b need one value per image, the same images: {x.size} vs {y.size}")
    if np.any(np.isinf(x)) or np.any(np.isinf(y)):
        raise ValueError("a and b must be finite numbers or NaN (undefined), not infinity")
    d = x - y
    d = d[~np.isnan(d)]
    dropped = x.size - d.size
    if d.size == 0:
        return Wilcoxon(math.nan, math.nan, 0, dropped, math.nan)
    median = float(np.median(d))
    if not np.any(d):  # scipy divides 0 by 0 here; identical values are no evidence of a shift
        return Wilcoxon(0.0, 1.0, int(d.size), dropped, median)
    result = wilcoxon(d)
    return Wilcoxon(float(result.statistic), float(result.pvalue), int(d.size), dropped, median)
