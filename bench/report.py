"""Leaderboards from the results folder: Markdown, CSV and a terminal table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.intervals import mean_intervals, row_intervals, significance_marks
from bench.metrics import HEADLINE
from bench.results import (  # noqa: F401 (the marks: re-exported for the report's users)
    SUBSTITUTE_MARK,
    TRANSDUCTIVE_MARK,
    ResultStore,
    dataset_labels,
    row_name,
    writing,
)

METRICS = (
    "image_auroc",
    "pixel_auroc",
    "au_pro",
    "aupimo",
    "image_ap",
    "pixel_ap",
    "image_f1max",
    "pixel_f1max",
    "point_auroc",
    "point_ap",
    "point_f1max",
    # a dataset's own official metrics (MVTec AD 2, MVTec LOCO), where its evaluation has them
    "au_pro_05",
    "seg_f1",
    "au_spro_05",
)
FIGURE_METRICS = ("image_auroc", "pixel_auroc", "au_pro", "au_pro_05", "au_spro_05", "point_auroc")


def _present(frame: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """The metrics some job has a value for (pixel metrics only for images and organised
    clouds, point metrics only for unorganised clouds)."""
    return [m for m in metrics if frame[m].notna().any()]


#: a row of the leaderboards: a detector under one fit scope
ROW = ["detector", "fit"]
#: one repetition of a setting: a seed and, for few-shot fits, a draw of references
REPLICATE = ["seed", "draw"]


def notes_markdown(records: list[dict[str, Any]], key: str) -> str:
    """One line per leaderboard row whose records carry ``key`` (``substitutes``: what stands
    in for the paper's setting; ``transductive``: how scores use the test set)."""
    notes: dict[str, list[str]] = {}
    for r in records:
        value = r.get(key) or []
        for note in [value] if isinstance(value, str) else value:
            row = notes.setdefault(row_name(r), [])
            if note not in row:
                row.append(note)
    return "\n".join(f"- {name}: {'; '.join(n)}" for name, n in sorted(notes.items()))


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job (every seed and few-shot draw) with the overall metrics, fit scope,
    protocol and metric version.

    Results of one dataset under different protocols or metric versions are never averaged or
    compared in one column: such rows get the dataset label ``name [protocol, vX]``."""
    rows = []
    for r in records:
        row = {
            k: r[k]
            for k in ("detector", "dataset", "category", "seed", "protocol", "metric_version")
        }
        row["detector"] = row_name(r)  # substitutes and transductive scores: marked on the row
        row["fit"] = r.get("fit_label", "per-category")
        row["fit_hash"] = r.get("fit_hash", "")
        row["draw"] = r.get("draw")
        row["shots"] = (r.get("scope") or {}).get("shots")
        row.update(r["metrics"]["all"])
        row["fit_seconds"] = r["timings"]["fit_seconds"]
        row["fitted_seconds"] = r["timings"].get("fitted_seconds")
        row["predict_images_per_second"] = r["timings"]["predict_images_per_second"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["draw"] = frame["draw"].fillna(-1).astype(int)  # -1: not a few-shot job
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = float("nan")
    frame["dataset"] = dataset_labels(records)
    return frame


def replicate_means(frame: pd.DataFrame, metric: str) -> pd.Series:
    """The unweighted mean over categories of each replicate (seed, draw) of every row and
    dataset that scored all of the row's categories: what the standard deviation is over."""
    keys = [*ROW, "dataset"]
    n_categories = frame.groupby(keys)["category"].nunique()
    per_replicate = frame.groupby([*keys, *REPLICATE]).agg(
        value=(metric, "mean"), n=("category", "nunique")
    )
    complete = (
        per_replicate["n"] == n_categories.reindex(per_replicate.index.droplevel([-2, -1])).values
    )
    return per_replicate.loc[complete, "value"]


def category_means(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Per row, dataset and category: the mean over replicates."""
    return frame.groupby([*ROW, "dataset", "category"])[metric].mean()


def fit_seconds(frame: pd.DataFrame) -> pd.Series:
    """Per row and dataset: the mean time of its distinct fits when they were computed (a fit
    shared by several jobs counts once)."""
    seconds = frame["fitted_seconds"].fillna(frame["fit_seconds"])
    per_fit = frame.assign(s=seconds).groupby([*ROW, "dataset", "fit_hash"])["s"].max()
    return per_fit.groupby([*ROW, "dataset"]).mean()


def summary_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (detector, fit, dataset): each metric's unweighted mean over categories of the mean
    over replicates (seeds x few-shot draws), the sample standard deviation over replicates of
    the category mean (``<metric>_std``; NaN with one replicate), the numbers of categories,
    seeds and draws, and the mean seconds of a fit."""
    frame = records_frame(records)
    keys = [*ROW, "dataset"]
    out = {}
    for metric in METRICS:
        out[metric] = category_means(frame, metric).groupby(keys).mean()
        out[f"{metric}_std"] = replicate_means(frame, metric).groupby(keys).std(ddof=1)
    summary = pd.DataFrame(out)
    counts = frame.groupby(keys).agg(
        categories=("category", "nunique"),
        seeds=("seed", "nunique"),
        draws=("draw", lambda d: int((d >= 0).any() and d[d >= 0].nunique())),
        fits=("fit_hash", "nunique"),
    )
    return summary.join(counts).join(fit_seconds(frame).rename("fit_seconds"))


def metric_table(records: list[dict[str, Any]], metric: str, std: bool = False) -> pd.DataFrame:
    """(detector, fit) as rows, (dataset/category) and the per-dataset mean as columns: means
    over replicates (the dataset mean: over categories), or with ``std`` sample standard
    deviations over replicates."""
    frame = records_frame(records)
    if std:
        per_replicate = frame.groupby([*ROW, "dataset", "category", *REPLICATE])[metric].mean()
        per_cat = per_replicate.groupby([*ROW, "dataset", "category"]).std(ddof=1)
        dataset_col = replicate_means(frame, metric).groupby([*ROW, "dataset"]).std(ddof=1)
    else:
        per_cat = category_means(frame, metric)
        dataset_col = per_cat.groupby([*ROW, "dataset"]).mean()
    per_cat = per_cat.unstack(["dataset", "category"])
    dataset_col = dataset_col.unstack("dataset")
    out = {}
    for dataset in sorted({d for d, _ in per_cat.columns}):
        cols = [c for c in per_cat.columns if c[0] == dataset]
        for c in sorted(cols):
            out[f"{dataset}/{c[1]}"] = per_cat[c]
        column = dataset_col[dataset] if dataset in dataset_col else float("nan")
        if not std:  # a category missing in a row: no mean (never a silently smaller one)
            column = per_cat[cols].mean(axis=1, skipna=False)
        out[f"{dataset}/mean"] = column
    return pd.DataFrame(out)


#: appended to a cell not significantly different from the best of its column
TIED_MARK = "≈"


def _markdown(
    table: pd.DataFrame,
    spread: pd.DataFrame | None = None,
    low: pd.DataFrame | None = None,
    high: pd.DataFrame | None = None,
    marks: pd.DataFrame | None = None,
) -> str:
    """A Markdown table of ``table``'s values, each with its interval ``[low, high]``, its
    ``± spread`` and its mark: bold the best of the column, ``≈`` not significantly different
    from it (``marks``: "best", "tied" or ""; without marks the highest value is bold)."""
    names = list(table.index.names)
    header = "| " + " | ".join(names) + " | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + len(names))]
    best = table.max(axis=0)

    def at(frame: pd.DataFrame | None, key, col):
        if frame is None or col not in frame.columns or key not in frame.index:
            return None
        return frame.loc[key, col]

    for key, row in table.iterrows():
        cells = []
        for col, v in row.items():
            if v != v:
                cells.append("–")
                continue
            mark = at(marks, key, col)
            text = f"{v:.4f}"
            several = table[col].notna().sum() > 1
            if several and (mark == "best" or (mark is None and v == best[col])):
                text = f"**{text}**"
            lo, hi = at(low, key, col), at(high, key, col)
            if lo is not None and lo == lo:
                text += f" [{lo:.3f}, {hi:.3f}]"
            sd = at(spread, key, col)
            if sd is not None and sd == sd:
                text += f" ± {sd:.4f}"
            if mark == "tied":
                text += f" {TIED_MARK}"
            cells.append(text)
        keys = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join(map(str, keys)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_tables(records: list[dict[str, Any]], root: Path, metric: str):
    """(low, high, marks) shaped like :func:`metric_table`: each cell's test-set interval and
    its significance mark ("best", "tied" or "")."""
    frame = row_intervals(records, root, metric)
    signif = significance_marks(records, root, metric)

    def shaped(series: pd.Series) -> pd.DataFrame:
        flat = series.reset_index()
        flat["where"] = flat["dataset"] + "/" + flat["column"]
        return flat.pivot_table(
            index=ROW, columns="where", values=series.name, aggfunc="first", dropna=False
        )

    mark = pd.Series(
        np.where(signif["best"], "best", np.where(signif["tied"], "tied", "")),
        index=signif.index,
        name="mark",
    )
    return shaped(frame["low"]), shaped(frame["high"]), shaped(mark) if len(mark) else None


def _runs_markdown(summary: pd.DataFrame) -> str:
    """What each leaderboard row averages: categories, seeds and few-shot draws."""
    lines = [
        "| detector | fit | dataset | categories | seeds | draws |",
        "|---|---|---|---|---|---|",
    ]
    for (detector, fit, dataset), row in summary.iterrows():
        draws = str(int(row["draws"])) if row["draws"] else "–"
        lines.append(
            f"| {detector} | {fit} | {dataset} | {int(row['categories'])} | "
            f"{int(row['seeds'])} | {draws} |"
        )
    return "\n".join(lines)


def leaderboard_markdown(records: list[dict[str, Any]], root: Path | None = None) -> str:
    """The Markdown leaderboard; with ``root`` (the benchmark folder, holding the per-image
    files) every cell also shows its 95% test-set interval and significance mark."""
    frame = records_frame(records)
    protocols = ", ".join(sorted(set(frame["protocol"])))
    versions = ", ".join(sorted(set(frame["metric_version"])))
    summary = summary_frame(records)
    repeated = bool((summary["seeds"] > 1).any() or (summary["draws"] > 1).any())
    parts = [
        f"# Leaderboard\n\nProtocol: {protocols}; metric version {versions}. "
        "Categories are averaged without weights; seeds and few-shot draws are averaged last"
        + (
            " (mean ± sample standard deviation over seeds x draws of the category mean)."
            if repeated
            else "."
        )
        + (
            " On unorganised clouds (protocol `points`) `image_*` are object-level metrics."
            if (frame["protocol"] == "points").any()
            else ""
        )
        + (
            " MVTec AD 2 (protocol `official-ad2`) is scored here on its public test set; its"
            " private test sets (test_private, test_private_mixed) have no public ground truth and"
            " are scored by the publisher's server only (https://benchmark.mvtec.com), from the"
            " submission `--export-maps` writes."
            if frame["protocol"].str.contains("-ad2", regex=False).any()
            else ""
        )
        + "\n",
        f"## Runs\n\n{_runs_markdown(summary)}\n",
    ]
    notes = notes_markdown(records, "substitutes")
    if notes:
        parts.append(
            f"## Substitutes ({SUBSTITUTE_MARK})\n\nRows marked {SUBSTITUTE_MARK} do not run the "
            f"paper's setting:\n\n{notes}\n"
        )
    notes = notes_markdown(records, "transductive")
    if notes:
        parts.append(
            f"## Transductive scores ({TRANSDUCTIVE_MARK})\n\nRows marked {TRANSDUCTIVE_MARK} "
            f"score each image with the whole test set of its category:\n\n{notes}\n"
        )
    if root is not None:
        parts.append(
            "## How to read the cells\n\n`value [low, high]`: the 95% interval from the finite "
            "test set (stratified bootstrap over test images, per-image files in `per_image/`; "
            "a dataset's mean resamples each category independently)"
            + ("; `± sd`: the spread over seeds x draws" if repeated else "")
            + f". **Bold**: the best of the column; {TIED_MARK}: not significantly different "
            "from it (paired on the same test images: DeLong for image AUROC, the paired "
            "bootstrap otherwise; Holm-adjusted over the column, alpha 0.05). `bench compare` "
            "prints every difference.\n"
        )
    for metric in _present(frame, METRICS):
        table = metric_table(records, metric).dropna(axis=1, how="all")
        spread = metric_table(records, metric, std=True).reindex_like(table) if repeated else None
        low = high = marks = None
        if root is not None:
            low, high, marks = interval_tables(records, root, metric)
        parts.append(f"## {metric}\n\n{_markdown(table, spread, low, high, marks)}\n")
    return "\n".join(parts)


def leaderboard_figure(
    records: list[dict[str, Any]], path: str | Path, root: Path | None = None
) -> Path:
    """Per-category dots of the headline metrics, one panel per metric, detectors side by side,
    each with its 95% test-set interval as a whisker (with ``root``, the benchmark folder), on an
    axis zoomed to the data (0.97 and 0.99 must look different)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = records_frame(records)
    frame["column"] = frame["dataset"] + "/" + frame["category"]
    scoped = frame["fit"] != "per-category"
    frame.loc[scoped, "detector"] = frame["detector"] + " [" + frame["fit"] + "]"
    metrics = _present(frame, FIGURE_METRICS)
    columns = sorted(frame["column"].unique())
    detectors = sorted(frame["detector"].unique())
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(max(6, 1.2 * len(columns) * max(1, len(detectors)) / 2), 3 * len(metrics)),
        squeeze=False,
    )
    width = 0.8 / max(1, len(detectors))
    for ax, metric in zip(axes[:, 0], metrics):
        table = frame.groupby(["detector", "column"])[metric].mean().unstack("column")
        bounds = _figure_intervals(records, root, metric)
        seen = []
        for i, det in enumerate(detectors):
            values = np.array(
                [table.loc[det, c] if c in table.columns else np.nan for c in columns]
            )
            low = np.array([bounds.get((det, c), (np.nan, np.nan))[0] for c in columns])
            high = np.array([bounds.get((det, c), (np.nan, np.nan))[1] for c in columns])
            err = np.vstack([values - np.where(np.isnan(low), values, low),
                             np.where(np.isnan(high), values, high) - values])  # fmt: skip
            x = [c + i * width for c in range(len(columns))]
            ax.errorbar(x, values, yerr=err, fmt="o", capsize=3, markersize=5, label=det)
            seen += [v for v in (*values, *low, *high) if v == v]
        ax.set_xticks([x + width * (len(detectors) - 1) / 2 for x in range(len(columns))])
        ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        if seen:  # zoomed to the values and their intervals
            lo, hi = min(seen), max(seen)
            pad = max(0.05 * (hi - lo), 0.002)
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(detectors)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _figure_intervals(records, root: Path | None, metric: str) -> dict:
    """(figure detector label, dataset/category) -> (low, high) of each category's interval."""
    if root is None:
        return {}
    frame = row_intervals(records, root, metric).reset_index()
    frame = frame[frame["column"] != "mean"]
    out = {}
    for _, r in frame.iterrows():
        label = r["detector"] if r["fit"] == "per-category" else f"{r['detector']} [{r['fit']}]"
        out[(label, f"{r['dataset']}/{r['column']}")] = (r["low"], r["high"])
    return out


def write_report(
    output: str | Path, name: str, records: list[dict[str, Any]] | None = None
) -> dict[str, Path]:
    """Leaderboard files in ``output/name``, from ``records`` or the readable job files."""
    store = ResultStore(output, name)
    records = store.finished(records)
    md = store.root / "leaderboard.md"
    with writing(md):
        md.write_text(leaderboard_markdown(records, store.root))
    csv = store.root / "leaderboard.csv"
    with writing(csv):
        records_frame(records).to_csv(csv, index=False)
    summary = store.root / "summary.csv"
    with writing(summary):
        summary_frame(records).join(mean_intervals(records, store.root)).to_csv(summary)
    with writing(store.root / "leaderboard.png"):
        figure = leaderboard_figure(records, store.root / "leaderboard.png", store.root)
    return {"markdown": md, "csv": csv, "summary": summary, "figure": figure}


def print_leaderboard(
    records: list[dict[str, Any]], console: Console | None = None, root: Path | None = None
) -> None:
    """The leaderboard in the terminal; with ``root`` (the benchmark folder) each mean with its
    95% test-set interval."""
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    summary = summary_frame(records)
    if root is not None:
        summary = summary.join(mean_intervals(records, root))
    frame = records_frame(records)
    title = "Leaderboard (mean over categories"
    title += "; [95% test-set interval]" if root is not None else ""
    table = Table(title=title + "; ± std over seeds x draws)")
    headline = _present(frame, HEADLINE)
    for col in ("detector", "fit", "dataset", "categories", "runs", *headline):
        table.add_column(
            col, justify="left" if col in ("detector", "fit", "dataset") else "right", no_wrap=True
        )

    def cell(row, m: str) -> str:
        if row[m] != row[m]:
            return "–"
        text = f"{row[m]:.4f}"
        low, high = row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
        sd = row[f"{m}_std"]
        text = text if sd != sd else f"{text} ± {sd:.4f}"
        if low is not None and low == low:  # on a line of its own: the table stays narrow
            text += f"\n[{low:.3f}, {high:.3f}]"
        return text

    for (detector, fit, dataset), row in summary.iterrows():
        runs = f"{int(row['seeds'])} seed(s)" + (
            f" x {int(row['draws'])} draws" if row["draws"] else ""
        )
        table.add_row(
            escape(detector),
            escape(fit),
            escape(dataset),
            str(int(row["categories"])),
            runs,
            *(cell(row, m) for m in headline),
        )
    console.print(table)
