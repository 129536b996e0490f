"""The figures of the HTML report (:mod:`bench.report_html`), as plotly figures: interval dot
plots, paired-difference heatmaps, ROC and PRO curves, accuracy against cost.

Every number is rounded and every curve thinned before it goes into a figure, so that a
15-category x 5-detector benchmark stays a file of a few megabytes (plotly writes floats in
full)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from bench.metrics import LABELS

#: colour-blind-safe qualitative colours (Paul Tol's "safe"), one per leaderboard row
PALETTE = qualitative.Safe
#: the figures' plotly config: no plotly logo (a link to plotly.com) and no cloud export
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}
#: the layout every figure starts from: plotly.js's own defaults, not a template copied into
#: each figure's JSON (the default template is ~10 kB a figure)
BASE = dict(
    template="none",
    font=dict(family="system-ui, sans-serif", size=11),
    margin=dict(l=10, r=10, t=40, b=30),
    paper_bgcolor="white",
    plot_bgcolor="white",
    hoverlabel=dict(namelength=-1),
)
DIGITS = 4  # decimals kept in the figures' data (the tables show 3)


def label_of(metric: str) -> str:
    return LABELS.get(metric, metric)


def colours(labels: Sequence[str]) -> dict[str, str]:
    """One fixed colour per leaderboard row, the same in every figure."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(labels)}


def to_html(fig: go.Figure) -> str:
    """The figure's div and script, without plotly.js (the page inlines it once)."""
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, config=CONFIG)


def _left(labels: Sequence[str]) -> int:
    """A left margin wide enough for the row labels (plotly clips long tick labels)."""
    return 12 + 7 * max((len(str(s)) for s in labels), default=4)


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def zoomed_range(lows: np.ndarray, highs: np.ndarray, pad: float = 0.08) -> list[float]:
    """An axis range around the data (whiskers included) instead of 0-1, at least 0.01 wide."""
    finite = np.concatenate([lows, highs])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = float(finite.min()), float(finite.max())
    span = max(hi - lo, 0.01)
    mid = (lo + hi) / 2
    return [mid - span * (0.5 + pad), mid + span * (0.5 + pad)]


def dot_plot(cells: pd.DataFrame, metric: str, palette: dict[str, str]) -> go.Figure:
    """One panel per column (each category, then the mean), leaderboard rows as rows: the value
    with its interval as whiskers, the x axis zoomed to each panel's data.

    ``cells``: index (label, column); columns value, low, high, best, tied, p_adj."""
    columns = sorted(set(cells.index.get_level_values("column")) - {"mean"}) + ["mean"]
    order = cells.xs("mean", level="column")["value"].sort_values().index.tolist()
    n_rows, n_cols = _grid(len(columns), 4)
    fig = make_subplots(
        n_rows,
        n_cols,
        subplot_titles=columns,
        shared_yaxes=True,
        horizontal_spacing=0.03,
        vertical_spacing=min(0.12, 0.5 / n_rows),
    )
    for i, column in enumerate(columns):
        part = cells.xs(column, level="column").reindex(order)
        row, col = i // n_cols + 1, i % n_cols + 1
        for label, c in part.iterrows():
            if not np.isfinite(c["value"]):
                continue
            fig.add_trace(_dot(label, column, c, palette[label], i == 0), row, col)
        fig.update_xaxes(range=zoomed_range(part["low"].fillna(part["value"]).to_numpy(),
                                            part["high"].fillna(part["value"]).to_numpy()),
                         row=row, col=col, nticks=4, tickformat=".3f")  # fmt: skip
    fig.update_yaxes(categoryorder="array", categoryarray=order, tickfont=dict(size=10))
    fig.update_layout(
        BASE,
        title=f"{label_of(metric)} per category (★ best, ● not significantly different, ○ other)",
        height=90 + n_rows * (40 + 18 * len(order)),
        margin=dict(l=_left(order), r=10, t=80, b=30),
        showlegend=False,
    )
    return fig


def _dot(label: str, column: str, c: pd.Series, colour: str, first: bool) -> go.Scatter:
    value = round(float(c["value"]), DIGITS)
    has_ci = bool(np.isfinite(c["low"]) and np.isfinite(c["high"]))
    text = f"{label}<br>{column}: {value:.3f}"
    if has_ci:
        text += f" [{c['low']:.3f}, {c['high']:.3f}]"
    if np.isfinite(c.get("p_adj", np.nan)):
        text += f"<br>p_adj vs best {c['p_adj']:.3g}"
    symbol = "star" if c["best"] else "circle" if c["tied"] else "circle-open"
    return go.Scatter(
        x=[value],
        y=[label],
        mode="markers",
        marker=dict(color=colour, size=11 if c["best"] else 8, symbol=symbol, line_width=1.5),
        error_x=dict(
            type="data",
            array=[round(float(c["high"]) - value, DIGITS)] if has_ci else [0],
            arrayminus=[round(value - float(c["low"]), DIGITS)] if has_ci else [0],
            visible=has_ci,
            color=colour,
            thickness=1.5,
            width=3,
        ),
        name=label,
        legendgroup=label,
        showlegend=first,
        hovertext=[text],
        hoverinfo="text",
    )


def aupimo_figure(values: dict[str, dict[str, np.ndarray]], palette: dict[str, str]) -> go.Figure:
    """Per category, the distribution of per-image AUPIMO (anomalous images) of every row: a box
    with every image as a point. ``values``: category -> row label -> per-image AUPIMO."""
    columns = sorted(values)
    labels = sorted({label for rows in values.values() for label in rows})
    n_rows, n_cols = _grid(len(columns), 4)
    fig = make_subplots(
        n_rows, n_cols, subplot_titles=columns, shared_yaxes=True, horizontal_spacing=0.03,
        vertical_spacing=min(0.12, 0.5 / n_rows),
    )  # fmt: skip
    for i, column in enumerate(columns):
        row, col = i // n_cols + 1, i % n_cols + 1
        for label in labels:
            v = values[column].get(label)
            if v is None or not np.isfinite(v).any():
                continue
            v = np.round(v[np.isfinite(v)], DIGITS)
            fig.add_trace(
                go.Box(x=v, name=label, marker_color=palette[label], boxpoints="all",
                       jitter=0.4, pointpos=0, boxmean=True, showlegend=False,
                       hovertemplate=f"{label}: %{{x:.3f}}<extra></extra>"),
                row, col,
            )  # fmt: skip
        fig.update_xaxes(range=[-0.02, 1.02], nticks=5, row=row, col=col)
    fig.update_yaxes(categoryorder="array", categoryarray=labels, tickfont=dict(size=10))
    fig.update_layout(
        BASE,
        title="AUPIMO per anomalous image (box: quartiles, dashed: mean; FPR 1e-5 to 1e-4 on the normal images)",
        height=90 + n_rows * (40 + 22 * len(labels)),
        margin=dict(l=_left(labels), r=10, t=80, b=30),
    )
    return fig


def diff_heatmaps(diffs: dict[str, pd.DataFrame], p_adj: dict[str, pd.DataFrame]) -> go.Figure:
    """Per headline metric, a row x row heatmap of the mean difference (row minus column) over
    the categories, with p_adj in each cell's text; blue: the row is better."""
    metrics = list(diffs)
    fig = make_subplots(
        1,
        len(metrics),
        subplot_titles=[label_of(m) for m in metrics],
        shared_yaxes=True,
        horizontal_spacing=0.02,
    )
    for i, metric in enumerate(metrics):
        d, p = diffs[metric], p_adj[metric]
        bound = float(np.nanmax(np.abs(d.to_numpy()))) if np.isfinite(d.to_numpy()).any() else 1
        text = [
            ["" if not np.isfinite(v) else f"{v:+.3f}<br>{_p_text(q)}" for v, q in zip(dv, pv)]
            for dv, pv in zip(d.to_numpy(), p.to_numpy())
        ]
        fig.add_trace(
            go.Heatmap(
                z=np.round(d.to_numpy(), DIGITS),
                x=list(d.columns),
                y=list(d.index),
                text=text,
                texttemplate="%{text}",
                textfont=dict(size=9),
                colorscale="RdBu",
                zmid=0,
                zmin=-bound,
                zmax=bound,
                showscale=False,
                hovertemplate="%{y} − %{x}<br>%{text}<extra></extra>",
            ),
            1,
            i + 1,
        )
    n = max(len(d) for d in diffs.values())
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10))
    fig.update_xaxes(tickangle=-30, tickfont=dict(size=10))
    left = _left(next(iter(diffs.values())).index)
    fig.update_layout(BASE, height=140 + 36 * n, margin=dict(l=left, r=10, t=40, b=90))
    return fig


def _p_text(p: float) -> str:
    return "" if not np.isfinite(p) else "p<0.001" if p < 0.001 else f"p={p:.2g}"


def thin(x: Sequence[float], y: Sequence[float], step: tuple[float, float]) -> tuple[list, list]:
    """The points of a monotone curve that move at least ``step`` (in x or y) from the last one
    kept, plus the last: a few pixels apart on screen, a fraction of the stored points.
    Hand-written: a greedy pass over at most a few hundred points, no library does this."""
    kx, ky = [x[0]], [y[0]]
    for u, v in zip(x[1:-1], y[1:-1]):
        if abs(u - kx[-1]) >= step[0] or abs(v - ky[-1]) >= step[1]:
            kx.append(u)
            ky.append(v)
    if len(x) > 1:
        kx.append(x[-1])
        ky.append(y[-1])
    return [round(v, DIGITS) for v in kx], [round(v, DIGITS) for v in ky]


#: the curves of a record's ``curves``: (y key, x limit, panel name)
CURVES = {"roc": ("tpr", 1.0, "ROC"), "pro": ("pro", 0.3, "PRO")}


def curve_figure(curves: dict[str, dict[str, dict]], palette: dict[str, str]) -> go.Figure | None:
    """Every row's curves overlaid, per category its ROC (pixel or point TPR over FPR) and,
    beside it, its PRO curve (over the FPR up to AU-PRO's limit 0.3). ``curves``: category ->
    row label -> the record's ``curves``."""
    panels = [
        (category, kind, {k: v for k, v in rows.items() if v.get(CURVES[kind][0])})
        for category, rows in curves.items()
        for kind in CURVES
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    pairs = any(kind == "pro" for _, kind, _ in panels)
    n_rows, n_cols = _grid(len(panels), 6 if pairs else 5)
    titles = [f"{category} · {CURVES[kind][2]}" for category, kind, _ in panels]
    fig = make_subplots(n_rows, n_cols, subplot_titles=titles, horizontal_spacing=0.05,
                        vertical_spacing=min(0.1, 0.6 / n_rows))  # fmt: skip
    seen = set()
    for i, (_, kind, rows) in enumerate(panels):
        y_key, x_max, name = CURVES[kind]
        for label, curve in rows.items():
            x = np.asarray(curve["fpr"], float)
            y = np.asarray(curve[y_key], float)
            keep = np.zeros(x.size, bool)  # the curve to the limit and the point just past it
            keep[: np.searchsorted(x, x_max, side="right") + 1] = True
            xs, ys = thin(x[keep].tolist(), y[keep].tolist(), (0.01 * x_max, 0.01))
            fig.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines", name=label, legendgroup=label,
                           showlegend=label not in seen, line=dict(color=palette[label], width=1.5),
                           hovertemplate=f"{label}<br>FPR %{{x:.3f}}, {name} %{{y:.3f}}"
                           "<extra></extra>"),
                i // n_cols + 1, i % n_cols + 1,
            )  # fmt: skip
            seen.add(label)
        ticks = np.linspace(0, x_max, 4 if kind == "pro" else 3).round(2).tolist()
        fig.update_xaxes(range=[0, x_max], tickvals=ticks, row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_yaxes(range=[0, 1.02], tickvals=[0, 0.5, 1])
    height = 150 + 210 * n_rows  # the legend below the tick labels: 40 px under the plots
    fig.update_layout(BASE, title="ROC (TPR over FPR) and PRO (over FPR, to 0.3)",
                      height=height, width=50 + 230 * n_cols, margin=dict(l=30, r=10, t=80, b=60),
                      legend=dict(orientation="h", y=-28 / (height - 140), yanchor="top"))  # fmt: skip
    return fig


def cost_figure(points: pd.DataFrame, metrics: list[str], palette: dict[str, str]) -> go.Figure:
    """Accuracy (each metric's mean over categories) against milliseconds per image and against
    peak prediction memory: one point per row and dataset, one symbol per dataset.

    ``points``: one row per (label, dataset) with columns label, dataset, ms_per_image,
    peak_mb, memory (what the peak measures) and each metric."""
    symbols = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon"]
    datasets = list(dict.fromkeys(points["dataset"]))
    fig = make_subplots(len(metrics), 2, shared_xaxes="columns", horizontal_spacing=0.08,
                        vertical_spacing=0.06)  # fmt: skip
    seen = set()
    for r, metric in enumerate(metrics):
        part = points[points[metric].notna()]
        for (label, dataset), p in part.groupby(["label", "dataset"], sort=False):
            p = p.iloc[0]
            text = (
                f"{label} on {dataset}<br>{label_of(metric)} {p[metric]:.3f}<br>"
                f"{p['ms_per_image']:.3g} ms/image, peak {p['peak_mb']:.0f} MB ({p['memory']})"
            )
            for c, x in enumerate((p["ms_per_image"], p["peak_mb"])):
                fig.add_trace(
                    go.Scatter(x=[round(float(x), 3)], y=[round(float(p[metric]), DIGITS)],
                               mode="markers", name=f"{label} · {dataset}", legendgroup=label,
                               showlegend=(label, dataset) not in seen,
                               marker=dict(color=palette[label], size=10, line_width=1,
                                           symbol=symbols[datasets.index(dataset) % len(symbols)]),
                               hovertext=[text], hoverinfo="text"),
                    r + 1, c + 1,
                )  # fmt: skip
                seen.add((label, dataset))
        fig.update_yaxes(title_text=label_of(metric), row=r + 1, col=1)
    fig.update_xaxes(type="log")
    fig.update_xaxes(dtick="D2", col=1)  # labels at 1, 2 and 5 of each decade
    fig.update_xaxes(title_text="ms per image (prediction)", row=len(metrics), col=1)
    fig.update_xaxes(title_text="peak memory while predicting, MB", row=len(metrics), col=2)
    fig.update_layout(BASE, height=60 + 240 * len(metrics), margin=dict(l=60, r=10, t=30, b=50))
    return fig
