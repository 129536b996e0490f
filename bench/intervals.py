"""Intervals and paired tests of the leaderboard's cells, from the jobs' per-image files.

A cell is a row (detector x fit scope), a dataset and a column (a category, or ``mean``, the
unweighted mean over the dataset's categories). Its value is the mean over replicates (seeds x
few-shot draws) as in the leaderboard. Its test-set interval is the percentile interval of the
same mean on the bootstrap resamples: the replicates of a category share their test images and
so their resamples (same seed, same labels), which are averaged resample by resample; categories
are independent test sets, resampled independently, and averaged resample by resample for the
mean. This is the uncertainty from the finite test set; the spread over seeds and draws is the
leaderboard's ``±`` (the sample standard deviation over replicates).

Two rows are compared on the same test images: image AUROC by DeLong's test (one replicate per
category; over categories, the z test of the mean difference), AUPIMO of one category by the
Wilcoxon signed-rank test of the per-image values, everything else by the paired bootstrap of
the difference (resample b of both rows takes the same images). p-values are Holm-adjusted over
the comparisons of one cell (one dataset and column).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics.significance import (
    bootstrap_difference,
    combine_delong,
    delong,
    holm,
    percentile_interval,
    wilcoxon_paired,
)
from bench.per_image import PerImage, load
from bench.progress import console
from bench.results import dataset_labels, row_name

MEAN = "mean"
INDEX = ["detector", "fit", "dataset", "column"]


@lru_cache(maxsize=4096)
def _load(path: str, mtime: float) -> PerImage | None:
    try:
        return load(Path(path))
    except ValueError as err:
        console.print(f"[yellow]skipped {err}[/]", soft_wrap=True)
        return None


def load_per_image(root: Path, record: dict) -> PerImage | None:
    """A record's per-image data, or None (an old record, bootstrap off, a missing or
    unreadable file: that cell has no interval)."""
    rel = record.get("per_image")
    if not rel:
        return None
    path = Path(root) / rel
    return _load(str(path), path.stat().st_mtime) if path.is_file() else None


def _cells(records: list[dict[str, Any]]) -> dict[tuple, dict[str, list[dict]]]:
    """(detector, fit, dataset) -> category -> the replicates' records."""
    out: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r, dataset in zip(records, dataset_labels(records)):
        out[(row_name(r), r.get("fit_label", "per-category"), dataset)][r["category"]].append(r)
    return out


def _value(reps: list[dict], metric: str) -> float:
    values = [r["metrics"]["all"].get(metric, math.nan) for r in reps]
    return float(np.mean(values)) if values else math.nan


class _Cell:
    """One category of one row: its replicates, their per-image data and resampled values."""

    def __init__(self, root: Path, reps: list[dict], metric: str) -> None:
        self.reps, self.metric = reps, metric
        self.value = _value(reps, metric)
        self.data = [load_per_image(root, r) for r in reps]

    def boot(self) -> np.ndarray | None:
        """The mean over replicates of the metric on each resample; None when a replicate
        lacks it or the replicates were resampled differently."""
        if any(d is None or d.boot_of(self.metric) is None for d in self.data):
            return None
        first = self.data[0]
        if any(
            d.boot.shape[0] != first.boot.shape[0] or d.boot_seed != first.boot_seed
            for d in self.data
        ):
            return None
        return np.mean([d.boot_of(self.metric) for d in self.data], axis=0)

    def single(self) -> PerImage | None:
        return self.data[0] if len(self.data) == 1 else None


def _paired(a: _Cell, b: _Cell) -> bool:
    """Whether two cells were scored on the same test images with the same resamples."""
    da, db = a.data[0], b.data[0]
    return (
        da is not None
        and db is not None
        and np.array_equal(da.ids, db.ids)
        and np.array_equal(da.labels, db.labels)
        and da.boot_seed == db.boot_seed
        and da.boot.shape[0] == db.boot.shape[0]
    )


def _mean_boot(cells: list[_Cell]) -> np.ndarray | None:
    boots = [c.boot() for c in cells]
    if not cells or any(b is None for b in boots) or len({b.size for b in boots}) != 1:
        return None
    return np.mean(boots, axis=0)


def _columns(records, root, metric):
    """(detector, fit, dataset) -> column -> the cells it averages (one for a category, every
    category of the dataset for ``mean``; None where the row lacks a category)."""
    cells = _cells(records)
    categories: dict[str, set[str]] = defaultdict(set)
    for (_, _, dataset), per in cells.items():
        categories[dataset].update(per)
    out = {}
    for key, per in cells.items():
        by_column = {c: [_Cell(root, reps, metric)] for c, reps in sorted(per.items())}
        complete = set(per) == categories[key[2]]
        by_column[MEAN] = [by_column[c][0] for c in sorted(per)] if complete else None
        out[key] = by_column
    return out


def row_intervals(
    records: list[dict[str, Any]], root: Path, metric: str, level: float = 0.95
) -> pd.DataFrame:
    """Per (detector, fit, dataset, column): ``value`` and its test-set interval ``low``,
    ``high`` (NaN where the per-image data are missing)."""
    rows = []
    for (detector, fit, dataset), by_column in _columns(records, Path(root), metric).items():
        for column, cells in by_column.items():
            if cells is None:
                rows.append((detector, fit, dataset, column, math.nan, math.nan, math.nan))
                continue
            value = float(np.mean([c.value for c in cells]))
            boot = _mean_boot(cells)
            low, high = percentile_interval(boot, level) if boot is not None else (math.nan,) * 2
            rows.append((detector, fit, dataset, column, value, low, high))
    frame = pd.DataFrame(rows, columns=[*INDEX, "value", "low", "high"])
    return frame.set_index(INDEX).sort_index()


def mean_intervals(records: list[dict[str, Any]], root: Path) -> pd.DataFrame:
    """Per (detector, fit, dataset): ``<metric>_ci_low`` and ``_ci_high`` of the mean over
    categories, for every metric some job has an interval of."""
    metrics = sorted({m for r in records for m in ((r.get("ci") or {}).get("metrics") or {})})
    parts = []
    for metric in metrics:
        frame = row_intervals(records, root, metric).xs(MEAN, level="column")
        named = {"low": f"{metric}_ci_low", "high": f"{metric}_ci_high"}
        parts.append(frame[["low", "high"]].rename(columns=named))
    if not parts:  # no intervals (bootstrap = 0): no columns, the summary's index
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=INDEX[:-1]))
    return pd.concat(parts, axis=1)


def pair_test(a: list[_Cell], b: list[_Cell], metric: str, level: float = 0.95) -> dict:
    """``a - b`` of one column (one cell per category: several for the mean), paired on the
    same test images: diff, low, high, p, test. NaN where the two were not scored on the same
    images or lack per-image data."""
    nan = {"diff": math.nan, "low": math.nan, "high": math.nan, "p": math.nan, "test": "none"}
    if len(a) != len(b) or not all(_paired(x, y) for x, y in zip(a, b)):
        return nan
    singles = all(x.single() is not None and y.single() is not None for x, y in zip(a, b))
    if metric == "image_auroc" and singles:
        tests = [
            delong(x.single().scores, y.single().scores, x.single().labels, level)
            for x, y in zip(a, b)
        ]
        t = tests[0] if len(tests) == 1 else combine_delong(tests, level)
        return {
            "diff": t.diff,
            "low": t.ci_low,
            "high": t.ci_high,
            "p": t.p_value,
            "test": "delong",
        }
    boot_a, boot_b = _mean_boot(a), _mean_boot(b)
    if boot_a is None or boot_b is None:
        return nan
    value_a = float(np.mean([c.value for c in a]))
    value_b = float(np.mean([c.value for c in b]))
    t = bootstrap_difference(boot_a, boot_b, value_a, value_b, level)
    out = {"diff": t.diff, "low": t.ci_low, "high": t.ci_high, "p": t.p_value, "test": "bootstrap"}
    if metric == "aupimo" and len(a) == 1 and singles:  # per-image values: the authors' test
        x, y = a[0].single(), b[0].single()
        if x.aupimo is not None and y.aupimo is not None:
            out.update(p=wilcoxon_paired(x.aupimo, y.aupimo).p_value, test="wilcoxon")
    return out


def compare(
    records: list[dict[str, Any]],
    root: Path,
    metric: str,
    baseline: str | None = None,
    dataset: str | None = None,
    level: float = 0.95,
) -> pd.DataFrame:
    """Every pair of rows (or every row against ``baseline``, a detector name as the
    leaderboard shows it, marks included or not) in every dataset and column: ``diff`` = a - b,
    its interval, p and Holm's ``p_adj`` over the comparisons of that dataset and column."""
    columns = _columns(records, Path(root), metric)
    out = []
    for data in sorted({k[2] for k in columns}):
        if dataset is not None and data != dataset:
            continue
        rows = sorted(k for k in columns if k[2] == data)
        pairs = _pairs(rows, baseline)
        names = sorted({c for k in rows for c in columns[k]}, key=lambda c: (c == MEAN, c))
        for column in names:
            found = []
            for ka, kb in pairs:
                ca, cb = columns[ka].get(column), columns[kb].get(column)
                if ca is None or cb is None:
                    continue
                test = pair_test(ca, cb, metric, level)
                found.append(
                    {"dataset": data, "column": column, "a": _label(ka), "b": _label(kb), **test}
                )
            adjusted = holm([f["p"] for f in found]) if found else []
            for f, p_adj in zip(found, adjusted):
                out.append({**f, "p_adj": float(p_adj)})
    return pd.DataFrame(
        out, columns=["dataset", "column", "a", "b", "diff", "low", "high", "p", "p_adj", "test"]
    )


def _label(key: tuple) -> str:
    detector, fit, _ = key
    return detector if fit == "per-category" else f"{detector} [{fit}]"


def _pairs(rows: list[tuple], baseline: str | None) -> list[tuple[tuple, tuple]]:
    if baseline is None:
        return [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]
    chosen = [k for k in rows if baseline in (k[0], k[0].split(" ")[0], _label(k))]
    return [(k, base) for base in chosen for k in rows if k not in chosen]


def significance_marks(
    records: list[dict[str, Any]], root: Path, metric: str, alpha: float = 0.05
) -> pd.DataFrame:
    """Per (detector, fit, dataset, column): ``best`` (the highest value of that dataset and
    column), ``tied`` (not significantly different from the best at ``alpha`` after Holm over
    the other rows; the best itself counts as tied) and ``p_adj`` against the best."""
    columns = _columns(records, Path(root), metric)
    out = []
    for data in sorted({k[2] for k in columns}):
        rows = [k for k in columns if k[2] == data]
        names = {c for k in rows for c in columns[k] if columns[k][c] is not None}
        for column in names:
            present = [k for k in rows if columns[k].get(column) is not None]
            values = {k: float(np.mean([c.value for c in columns[k][column]])) for k in present}
            finite = [k for k in present if not math.isnan(values[k])]
            if not finite:
                continue
            top = max(values[k] for k in finite)
            best = next(k for k in finite if values[k] == top)
            others = [k for k in finite if k != best]
            tests = [pair_test(columns[best][column], columns[k][column], metric) for k in others]
            adjusted = holm([t["p"] for t in tests]) if tests else []
            out.append((*best[:2], data, column, True, True, math.nan))
            for k, p_adj in zip(others, adjusted):
                tied = values[k] == top or (not math.isnan(p_adj) and p_adj > alpha)
                out.append((*k[:2], data, column, values[k] == top, tied, float(p_adj)))
    frame = pd.DataFrame(out, columns=[*INDEX, "best", "tied", "p_adj"])
    return frame.set_index(INDEX).sort_index()
