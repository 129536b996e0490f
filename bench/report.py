"""Leaderboards from the results folder: Markdown, CSV and a terminal table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.results import ResultStore

METRICS = (
    "image_auroc",
    "pixel_auroc",
    "au_pro",
    "image_ap",
    "pixel_ap",
    "image_f1max",
    "pixel_f1max",
    "point_auroc",
    "point_ap",
    "point_f1max",
)
HEADLINE = ("image_auroc", "pixel_auroc", "au_pro", "pixel_ap", "point_auroc")
FIGURE_METRICS = ("image_auroc", "pixel_auroc", "au_pro", "point_auroc")


def _present(frame: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """The metrics some job has a value for (pixel metrics only for images and organised
    clouds, point metrics only for unorganised clouds)."""
    return [m for m in metrics if frame[m].notna().any()]


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job with the overall metrics, protocol and metric version.

    Results of one dataset under different protocols or metric versions are never averaged or
    compared in one column: such rows get the dataset label ``name [protocol, vX]``."""
    rows = []
    for r in records:
        row = {
            k: r[k]
            for k in ("detector", "dataset", "category", "seed", "protocol", "metric_version")
        }
        row.update(r["metrics"]["all"])
        row["fit_seconds"] = r["timings"]["fit_seconds"]
        row["predict_images_per_second"] = r["timings"]["predict_images_per_second"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = float("nan")
    kinds = frame.groupby("dataset")[["protocol", "metric_version"]].nunique().max(axis=1)
    mixed = frame["dataset"].map(kinds) > 1
    frame.loc[mixed, "dataset"] = (
        frame["dataset"] + " [" + frame["protocol"] + ", v" + frame["metric_version"] + "]"
    )[mixed]
    return frame


def summary_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean over seeds, then unweighted mean over categories, per (detector, dataset)."""
    frame = records_frame(records)
    per_cat = frame.groupby(["detector", "dataset", "category"])[list(METRICS)].mean()
    return per_cat.groupby(["detector", "dataset"]).mean()


def metric_table(records: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """Detectors as rows, (dataset/category) and the per-dataset mean as columns."""
    frame = records_frame(records)
    per_cat = (
        frame.groupby(["detector", "dataset", "category"])[metric]
        .mean()
        .unstack(["dataset", "category"])
    )
    out = {}
    for dataset in sorted({d for d, _ in per_cat.columns}):
        cols = [c for c in per_cat.columns if c[0] == dataset]
        for c in sorted(cols):
            out[f"{dataset}/{c[1]}"] = per_cat[c]
        out[f"{dataset}/mean"] = per_cat[cols].mean(axis=1, skipna=False)
    return pd.DataFrame(out)


def _markdown(table: pd.DataFrame) -> str:
    header = "| detector | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    best = table.max(axis=0)
    for det, row in table.iterrows():
        cells = []
        for col, v in row.items():
            if v != v:
                cells.append("–")
            else:
                text = f"{v:.4f}"
                cells.append(
                    f"**{text}**" if v == best[col] and table[col].notna().sum() > 1 else text
                )
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_markdown(records: list[dict[str, Any]]) -> str:
    frame = records_frame(records)
    protocols = ", ".join(sorted(set(frame["protocol"])))
    versions = ", ".join(sorted(set(frame["metric_version"])))
    parts = [
        f"# Leaderboard\n\nProtocol: {protocols}; metric version {versions}. "
        "Categories are averaged without weights; seeds are averaged first."
        + (
            " On unorganised clouds (protocol `points`) `image_*` are object-level metrics."
            if (frame["protocol"] == "points").any()
            else ""
        )
        + "\n"
    ]
    for metric in _present(frame, METRICS):
        table = metric_table(records, metric).dropna(axis=1, how="all")
        parts.append(f"## {metric}\n\n{_markdown(table)}\n")
    return "\n".join(parts)


def leaderboard_figure(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-category bars of the headline metrics, one panel per metric, detectors side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = records_frame(records)
    frame["column"] = frame["dataset"] + "/" + frame["category"]
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
        for i, det in enumerate(detectors):
            values = [table.loc[det, c] if c in table.columns else float("nan") for c in columns]
            ax.bar([x + i * width for x in range(len(columns))], values, width, label=det)
        ax.set_xticks([x + width * (len(detectors) - 1) / 2 for x in range(len(columns))])
        ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(detectors)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    output: str | Path, name: str, records: list[dict[str, Any]] | None = None
) -> dict[str, Path]:
    """Leaderboard files in ``output/name``, from ``records`` or the readable job files."""
    store = ResultStore(output, name)
    records = store.records() if records is None else records
    if not records:
        raise FileNotFoundError(
            f"no finished jobs under {store.root / 'jobs'}; run `bench run` first"
        )
    md = store.root / "leaderboard.md"
    md.write_text(leaderboard_markdown(records))
    csv = store.root / "leaderboard.csv"
    records_frame(records).to_csv(csv, index=False)
    summary = store.root / "summary.csv"
    summary_frame(records).to_csv(summary)
    figure = leaderboard_figure(records, store.root / "leaderboard.png")
    return {"markdown": md, "csv": csv, "summary": summary, "figure": figure}


def print_leaderboard(records: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    summary = summary_frame(records)
    frame = records_frame(records)
    table = Table(title="Leaderboard (mean over categories)")
    headline = _present(frame, HEADLINE)
    for col in ("detector", "dataset", "categories", *headline):
        table.add_column(
            col, justify="left" if col in ("detector", "dataset") else "right", no_wrap=True
        )
    for (detector, dataset), row in summary.iterrows():
        n = frame[(frame.detector == detector) & (frame.dataset == dataset)]["category"].nunique()
        table.add_row(
            escape(detector),
            escape(dataset),
            str(n),
            *("–" if row[m] != row[m] else f"{row[m]:.4f}" for m in headline),
        )
    console.print(table)
