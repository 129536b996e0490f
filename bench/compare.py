"""``bench compare``: paired differences between the detectors of one benchmark folder."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.errors import ConfigError
from bench.intervals import MEAN, compare
from bench.results import ResultStore

ALPHA = 0.05


def compare_table(
    folder: Path,
    metric: str,
    baseline: str | None = None,
    dataset: str | None = None,
    level: float = 0.95,
) -> pd.DataFrame:
    """Every comparison of a benchmark folder (see :func:`bench.intervals.compare`); a
    ConfigError names what is available when the metric, baseline or dataset is unknown."""
    folder = Path(folder)
    records = ResultStore(folder.parent, folder.name).records()
    if not records:
        raise ConfigError(f"no finished jobs under {folder / 'jobs'}")
    if not 0 < level < 1:
        raise ConfigError(f"--level must lie strictly between 0 and 1, got {level}")
    known = sorted({m for r in records for m in r["metrics"]["all"]})
    if metric not in known:
        raise ConfigError(f"unknown metric {metric!r}; the jobs have: {', '.join(known)}")
    table = compare(records, folder, metric, baseline, dataset, level)
    rows = {(r["detector"], r.get("fit_label")) for r in records}
    if len(rows) < 2:
        raise ConfigError(f"{folder} holds one detector only: nothing to compare")
    if baseline is not None and table.empty:
        names = sorted({r["detector"] for r in records})
        raise ConfigError(
            f"no detector {baseline!r} to compare with; there are: {', '.join(names)}"
        )
    if dataset is not None and table.empty:
        names = sorted({r["dataset"] for r in records})
        raise ConfigError(
            f"no dataset {dataset!r} with two detectors; there are: {', '.join(names)}"
        )
    return table


def _verdict(row) -> str:
    if math.isnan(row["p_adj"]):
        return "not comparable"
    if row["p_adj"] > ALPHA:
        return "no significant difference"
    return f"{row['a']} higher" if row["diff"] > 0 else f"{row['b']} higher"


def print_comparison(table: pd.DataFrame, metric: str, level: float) -> None:
    """The comparisons as a terminal table, then per dataset the matrix of mean differences."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    out = Table(
        title=f"{metric}: a - b on the same test images ({level:.0%} interval; p Holm-adjusted "
        f"per dataset and column, alpha {ALPHA})"
    )
    for col in (
        "dataset",
        "column",
        "a",
        "b",
        "a - b",
        "interval",
        "p",
        "p_adj",
        "test",
        "verdict",
    ):
        out.add_column(col, justify="right" if col in ("a - b", "p", "p_adj") else "left")
    for _, row in table.iterrows():
        out.add_row(
            escape(row["dataset"]),
            escape(row["column"]),
            escape(row["a"]),
            escape(row["b"]),
            f"{row['diff']:+.4f}",
            f"[{row['low']:+.4f}, {row['high']:+.4f}]",
            f"{row['p']:.3g}",
            f"{row['p_adj']:.3g}",
            row["test"],
            escape(_verdict(row)),
        )
    console.print(out)
    for dataset, part in table[table["column"] == MEAN].groupby("dataset"):
        names = sorted(set(part["a"]) | set(part["b"]))
        matrix = Table(title=f"{dataset}, mean over categories: row - column (* p_adj <= {ALPHA})")
        matrix.add_column("")
        for name in names:
            matrix.add_column(escape(name), justify="right")
        for a in names:
            cells = []
            for b in names:
                cells.append(_matrix_cell(part, a, b))
            matrix.add_row(escape(a), *cells)
        console.print(matrix)


def _matrix_cell(part: pd.DataFrame, a: str, b: str) -> str:
    if a == b:
        return "–"
    row = part[(part["a"] == a) & (part["b"] == b)]
    sign = 1.0
    if row.empty:
        row, sign = part[(part["a"] == b) & (part["b"] == a)], -1.0
    if row.empty:
        return ""
    r = row.iloc[0]
    star = "*" if r["p_adj"] <= ALPHA else ""
    return f"{sign * r['diff']:+.4f}{star}"
