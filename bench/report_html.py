"""``bench report --html``: the benchmark as one self-contained page, ``results/<name>/report.html``
(plotly.js inlined once, images as data: URIs, nothing fetched over the network).

Sections: a sortable leaderboard with 95% intervals and significance marks, per-category dot
plots, paired differences, ROC and PRO curves, the same test images for every detector, and
accuracy against time and memory. Intervals and tests come from :mod:`bench.intervals` (the
records' ``per_image`` files); a dataset whose jobs have no such file is shown without them."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from plotly.offline import get_plotlyjs

from bench.intervals import compare, load_per_image, row_intervals, significance_marks
from bench.metrics import HEADLINE
from bench.report import SUBSTITUTE_MARK, TRANSDUCTIVE_MARK, notes_markdown, records_frame
from bench.report_images import image_rows, number
from bench.report_plots import (
    aupimo_figure,
    colours,
    cost_figure,
    curve_figure,
    diff_heatmaps,
    dot_plot,
    label_of,
    to_html,
)
from bench.results import ResultStore, writing

TEMPLATES = Path(__file__).with_name("templates")
ALPHA = 0.05
LEVEL = 0.95
#: the accuracy axes of the cost figure, where a dataset has them
COST_METRICS = ("image_auroc", "pixel_auroc", "au_pro", "point_auroc")
CELLS = ["value", "low", "high", "best", "tied", "p_adj"]


def row_label(detector: str, fit: str) -> str:
    """A leaderboard row's name in the figures: the detector (with its marks) and its fit scope
    unless per category."""
    return detector if fit == "per-category" else f"{detector} [{fit}]"


def dataset_groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records by the leaderboard's dataset label (one dataset under two protocols or metric
    versions is two groups, never compared)."""
    labels = records_frame(records)["dataset"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for label, record in zip(labels, records):
        groups.setdefault(label, []).append(record)
    return dict(sorted(groups.items()))


def has_per_image(root: Path, records: list[dict[str, Any]]) -> bool:
    return all(r.get("per_image") and (root / r["per_image"]).is_file() for r in records)


def _relabel(table: pd.DataFrame) -> pd.DataFrame:
    """(detector, fit, dataset, column) -> (label, column)."""
    index = [(row_label(d, f), c) for d, f, _, c in table.index]
    return table.set_axis(pd.MultiIndex.from_tuples(index, names=["label", "column"]))


def metric_cells(root: Path, records: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """The records of one dataset: per (label, column = category or "mean") the value, its
    interval, whether it is the column's best and whether it is tied with the best."""
    if not has_per_image(root, records):
        return _plain_cells(records, metric)
    values = row_intervals(records, root, metric, level=LEVEL)
    marks = significance_marks(records, root, metric, alpha=ALPHA)
    table = values[["value", "low", "high"]].join(marks[["best", "tied", "p_adj"]])
    table[["best", "tied"]] = table[["best", "tied"]].fillna(False).astype(bool)  # no value
    return _relabel(table)[CELLS]


def _plain_cells(records: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """Without per-image files: the means, a category's record ``ci`` where it is the only
    job of its cell, the best by value and no tests."""
    frame = records_frame(records)
    frame["label"] = [row_label(d, f) for d, f in zip(frame["detector"], frame["fit"])]
    ci = [(r.get("ci") or {}).get("metrics", {}).get(metric, [np.nan, np.nan]) for r in records]
    frame["low"], frame["high"] = [c[0] for c in ci], [c[1] for c in ci]
    cats = frame.groupby(["label", "category"]).agg(
        value=(metric, "mean"), low=("low", "first"), high=("high", "first"), n=(metric, "size")
    )
    cats.loc[cats["n"] > 1, ["low", "high"]] = np.nan
    means = cats["value"].unstack("category").mean(axis=1, skipna=False)
    mean = pd.DataFrame({"value": means, "low": np.nan, "high": np.nan})
    mean.index = pd.MultiIndex.from_product([mean.index, ["mean"]], names=["label", "category"])
    table = pd.concat([cats.drop(columns="n"), mean]).rename_axis(["label", "column"])
    best = table.groupby(level="column")["value"].transform("max")
    table["best"] = table["value"].eq(best) & table["value"].notna()
    table["tied"], table["p_adj"] = False, np.nan
    return table[CELLS]


def cell_text(c: pd.Series) -> str:
    if not np.isfinite(c["value"]):
        return "–"
    if np.isfinite(c["low"]) and np.isfinite(c["high"]):
        return f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
    return f"{c['value']:.3f}"


def costs(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (label, dataset): mean milliseconds per predicted image (1 / images per second) and
    the highest prediction peak memory (GPU where a job used one, else host)."""
    frame = records_frame(records)
    rows = []
    for r, det, fit, dataset in zip(records, frame["detector"], frame["fit"], frame["dataset"]):
        ips = r["timings"].get("predict_images_per_second") or np.nan
        memory = r.get("memory") or {}
        gpu = memory.get("predict_peak_gpu_mb") or 0.0
        rows.append(dict(label=row_label(det, fit), dataset=dataset, ms=1000.0 / ips,
                         gpu=gpu, host=memory.get("predict_peak_host_mb", np.nan)))  # fmt: skip
    per = pd.DataFrame(rows).groupby(["label", "dataset"], sort=False)
    out = per.agg(ms_per_image=("ms", "mean"), gpu=("gpu", "max"), host=("host", "max"))
    out["memory"] = np.where(out["gpu"] > 0, "GPU", "host")
    out["peak_mb"] = np.where(out["gpu"] > 0, out["gpu"], out["host"])
    return out.reset_index()


def leaderboard(cells: dict[str, pd.DataFrame], cost: pd.DataFrame) -> dict[str, Any]:
    """One dataset's table: a row per label, each metric's mean over categories with its
    interval and marks, then time and memory."""
    first = next(iter(cells.values())).xs("mean", level="column")["value"]
    labels = first.sort_values(ascending=False, na_position="last").index.tolist()
    cost = cost.set_index("label")
    rows = []
    for label in labels:
        row = [_cell(label, label, "name")]
        for table in cells.values():
            c = table.loc[(label, "mean")]
            tip = "" if not np.isfinite(c["p_adj"]) else f"p_adj vs best = {c['p_adj']:.3g}"
            cls = "best" if c["best"] else "tied" if c["tied"] else ""
            row.append(_cell(cell_text(c), _sort(c["value"]), cls, tip))
        ms, mb = cost.loc[label, "ms_per_image"], cost.loc[label, "peak_mb"]
        row.append(_cell(number(ms), _sort(ms), "num"))
        row.append(_cell(f"{mb:.0f} ({cost.loc[label, 'memory']})", _sort(mb), "num"))
        rows.append(row)
    headers = ["detector", *(label_of(m) for m in cells), "ms / image", "peak MB (predict)"]
    return dict(headers=headers, rows=rows)


def _cell(text: str, sort: str, cls: str = "", title: str = "") -> dict[str, str]:
    return dict(text=text, sort=sort, cls=cls, title=title)


def _sort(value: float) -> str:
    return "" if not np.isfinite(value) else repr(float(value))


def pair_matrices(
    root: Path, records: list[dict[str, Any]], metric: str, labels: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The mean-over-categories difference of every pair of rows (row minus column, rows and
    columns in the order of ``labels``) and its Holm-adjusted p, from
    :func:`bench.intervals.compare` (whose names are the row labels)."""
    diff = pd.DataFrame(np.nan, index=labels, columns=labels)
    p_adj = diff.copy()
    table = compare(records, root, metric, level=LEVEL)
    for _, t in table[table["column"] == "mean"].iterrows():
        diff.loc[t["a"], t["b"]], diff.loc[t["b"], t["a"]] = t["diff"], -t["diff"]
        p_adj.loc[t["a"], t["b"]] = p_adj.loc[t["b"], t["a"]] = t["p_adj"]
    return diff, p_adj


def dataset_section(
    root: Path, label: str, records: list[dict[str, Any]], palette: dict[str, str]
) -> dict[str, Any]:
    """Everything the page shows for one dataset."""
    frame = records_frame(records)
    metrics = [m for m in HEADLINE if frame[m].notna().any()]
    cells = {m: metric_cells(root, records, m) for m in metrics}
    tested = has_per_image(root, records)
    section = dict(label=label, tested=tested, metrics=[label_of(m) for m in metrics])
    section["table"] = leaderboard(cells, costs(records))
    section["dots"] = [to_html(dot_plot(cells[m], m, palette)) for m in metrics]
    aupimo = aupimo_values(root, records)
    section["aupimo"] = to_html(aupimo_figure(aupimo, palette)) if aupimo else None
    section["diffs"] = None
    if tested and len(cells[metrics[0]].xs("mean", level="column")) > 1:
        order = [row[0]["text"] for row in section["table"]["rows"]]  # the leaderboard's
        pairs = {m: pair_matrices(root, records, m, order) for m in metrics}
        figure = diff_heatmaps(
            {m: p[0] for m, p in pairs.items()}, {m: p[1] for m, p in pairs.items()}
        )
        section["diffs"] = to_html(figure)
    figure = curve_figure(category_curves(records), palette)
    section["curves"] = [] if figure is None else [to_html(figure)]
    scored = cells.get("image_auroc", cells[metrics[0]])
    section["images"] = image_rows(root, first_replicates(records), scored)
    section["cells"] = cells  # for the cost figure, which spans every dataset
    return section


def first_replicates(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Category -> row label -> the record of its lowest (seed, few-shot draw)."""
    frame = records_frame(records)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    order = sorted(range(len(records)), key=lambda i: (records[i]["seed"], frame["draw"][i]))
    for i in order:
        label = row_label(frame["detector"][i], frame["fit"][i])
        out.setdefault(records[i]["category"], {}).setdefault(label, records[i])
    return dict(sorted(out.items()))


def aupimo_values(root: Path, records: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Category -> row label -> per-image AUPIMO of its anomalous images (first replicate),
    where a per-image file holds some."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for category, rows in first_replicates(records).items():
        for label, record in rows.items():
            data = load_per_image(root, record)
            if data is None or data.aupimo is None or not np.isfinite(data.aupimo).any():
                continue
            out.setdefault(category, {})[label] = data.aupimo[data.labels == 1]
    return out


def category_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    return {
        c: {label: r.get("curves") or {} for label, r in rows.items()}
        for c, rows in first_replicates(records).items()
    }


def render_html_report(root: Path, records: list[dict[str, Any]], title: str) -> str:
    """The page, as text; ``root``: the benchmark folder the records' ``per_image`` paths are
    relative to."""
    if not records:
        raise ValueError(f"expected at least one finished job record for {title}, got none")
    root = Path(root)
    frame = records_frame(records)
    palette = colours(sorted({row_label(d, f) for d, f in zip(frame["detector"], frame["fit"])}))
    groups = dataset_groups(records)
    sections = [dataset_section(root, label, rs, palette) for label, rs in groups.items()]
    cost_points = costs(records)
    for s in sections:  # the accuracy of each (label, dataset) next to its costs
        for metric, cells in s.pop("cells").items():
            means = cells.xs("mean", level="column")["value"]
            at = cost_points["dataset"] == s["label"]
            cost_points.loc[at, metric] = cost_points.loc[at, "label"].map(means)
    shown = [m for m in COST_METRICS if m in cost_points and cost_points[m].notna().any()]
    return _template().render(
        title=title,
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        protocols=", ".join(sorted(set(frame["protocol"]))),
        versions=", ".join(sorted(set(frame["metric_version"]))),
        n_jobs=len(records),
        alpha=ALPHA,
        level=LEVEL,
        marks=dict(substitute=SUBSTITUTE_MARK, transductive=TRANSDUCTIVE_MARK),
        substitutes=_notes(records, "substitutes"),
        transductive=_notes(records, "transductive"),
        sections=sections,
        cost=to_html(cost_figure(cost_points, shown, palette)) if shown else None,
        plotly_js=get_plotlyjs(),
    )


def _notes(records: list[dict[str, Any]], key: str) -> list[str]:
    text = notes_markdown(records, key)
    return [line.removeprefix("- ") for line in text.splitlines()]


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html.j2")


def write_html_report(
    output: str | Path, name: str, records: list[dict[str, Any]] | None = None
) -> Path:
    """Writes ``output/name/report.html`` from ``records`` or the readable job files."""
    store = ResultStore(output, name)
    records = store.finished(records)
    path = store.root / "report.html"
    with writing(path):
        path.write_text(render_html_report(store.root, records, f"Benchmark {name}"), "utf-8")
    return path


def log_html_report(client: Any, run_id: str, root: Path, records: list[dict[str, Any]]) -> None:
    """Logs ``report.html`` to an MLflow run (the benchmark's parent): MLflow's artifact view
    shows an HTML file in a sandboxed iframe, scripts allowed."""
    html = render_html_report(Path(root), records, f"Benchmark {Path(root).name}")
    client.log_text(run_id, html, "report.html")
