"""Leaderboard intervals, significance marks and `bench compare`, from real per-image files
written by the evaluator and the bootstrap a job runs."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.evaluation import Evaluator
from bench.intervals import compare, row_intervals, significance_marks
from bench.metrics.significance import (
    bootstrap_difference,
    combine_delong,
    delong,
    holm,
    percentile_interval,
)
from bench.per_image import collect, load, save
from bench.report import leaderboard_markdown
from bench.types import Batch, Prediction

B = 200


def _scored(category: str, strength: float, seed: int, noise_seed: int):
    """An evaluator fed a category of 6 good and 8 defective 24x24 images whose defects stand
    out by ``strength`` (the same images and masks for every detector of a category)."""
    data = np.random.default_rng(seed)
    noise = np.random.default_rng(noise_seed)
    ev = Evaluator("official")
    for i in range(14):
        defect = "good" if i < 6 else ("crack" if i % 2 else "hole")
        mask = np.zeros((24, 24), dtype=bool)
        if defect != "good":
            y, x = data.integers(0, 18, 2)
            mask[y : y + 5, x : x + 6] = True
        amap = noise.normal(size=(24, 24)) + strength * mask
        meta = {
            "category": category,
            "defect": defect,
            "path": f"/d/{category}/{defect}/{i:03d}.png",
        }
        batch = Batch(
            torch.tensor([int(defect != "good")]),
            mask=torch.from_numpy(mask)[None],
            roi=torch.tensor([[0, 0, 24, 24]]),
            meta=[meta],
        )
        amap = torch.from_numpy(amap.astype(np.float32))[None]
        ev.update(Prediction(amap.amax(dim=(1, 2)), amap), batch)
    return ev


def _record(root, detector: str, category: str, strength: float, noise_seed: int) -> dict:
    ev = _scored(category, strength, seed=zlib.crc32(category.encode()), noise_seed=noise_seed)
    metrics = ev.compute()
    per_image, boot = collect(ev, "/d", B, 0)
    rel = f"per_image/{detector}__{category}.npz"
    save(root / rel, per_image)
    return {
        "detector": detector,
        "dataset": "toy",
        "category": category,
        "seed": 0,
        "draw": None,
        "protocol": "official",
        "metric_version": "1.0",
        "fit_label": "per-category",
        "fit_hash": f"{detector}{category}",
        "metrics": metrics,
        "ci": boot.record(),
        "per_image": rel,
        "timings": {"fit_seconds": 1.0, "fitted_seconds": 1.0, "predict_images_per_second": 10.0},
        "scope": {},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "toy"
    records = [
        _record(root, name, category, strength, noise)
        for name, strength, noise in (("strong", 2.5, 1), ("weak", 0.6, 2), ("twin", 2.5, 3))
        for category in ("cable", "screw")
    ]
    (root / "jobs").mkdir(parents=True)
    for r in records:
        (root / "jobs" / f"{r['detector']}__{r['category']}.json").write_text(json.dumps(r))
    return root, records


def test_the_per_image_file_round_trips(folder):
    root, records = folder
    data = load(root / records[0]["per_image"])
    assert list(data.ids) == sorted(data.ids) and data.ids[0] == "crack/007"
    assert data.paths[0] == "cable/crack/007.png"  # relative to the record's root
    assert data.boot.shape == (B, len(data.boot_metrics)) and data.thumbs.shape == (14, 96, 96)
    assert data.mask_thumbs.any() and np.isnan(data.aupimo[data.labels == 0]).all()


def test_category_and_mean_intervals(folder):
    root, records = folder
    frame = row_intervals(records, root, "au_pro")
    strong = [r for r in records if r["detector"] == "strong"]
    boots = [load(root / r["per_image"]).boot_of("au_pro") for r in strong]
    cell = frame.loc[("strong", "per-category", "toy", "cable")]
    assert cell["value"] == strong[0]["metrics"]["all"]["au_pro"]
    assert (cell["low"], cell["high"]) == pytest.approx(strong[0]["ci"]["metrics"]["au_pro"])
    mean = frame.loc[("strong", "per-category", "toy", "mean")]
    assert mean["value"] == pytest.approx(np.mean([r["metrics"]["all"]["au_pro"] for r in strong]))
    assert (mean["low"], mean["high"]) == pytest.approx(percentile_interval(np.mean(boots, axis=0)))
    # the mean of two independent categories: sd (sd1^2 + sd2^2)^0.5 / 2 < the larger sd
    other = frame.loc[("strong", "per-category", "toy", "screw")]
    widest = max(cell["high"] - cell["low"], other["high"] - other["low"])
    assert mean["high"] - mean["low"] < widest


def test_compare_uses_delong_for_image_auroc_and_the_paired_bootstrap_otherwise(folder):
    root, records = folder
    data = {(r["detector"], r["category"]): load(root / r["per_image"]) for r in records}
    table = compare(records, root, "image_auroc", baseline="weak")
    row = table[(table["column"] == "cable") & (table["a"] == "strong")].iloc[0]
    a, b = data[("strong", "cable")], data[("weak", "cable")]
    expected = delong(a.scores, b.scores, a.labels)
    assert row["test"] == "delong" and row["diff"] == pytest.approx(expected.diff)
    assert row["p"] == pytest.approx(expected.p_value)
    column = table[table["column"] == "cable"]
    np.testing.assert_allclose(column["p_adj"], holm(column["p"].to_numpy()))
    mean = table[(table["column"] == "mean") & (table["a"] == "strong")].iloc[0]
    tests = [delong(data[("strong", c)].scores, data[("weak", c)].scores, data[("strong", c)].labels) for c in ("cable", "screw")]  # fmt: skip
    assert mean["p"] == pytest.approx(combine_delong(tests).p_value)

    table = compare(records, root, "au_pro")
    row = table[(table["column"] == "screw") & (table["a"] == "strong") & (table["b"] == "weak")]
    a, b = data[("strong", "screw")], data[("weak", "screw")]
    value = {d: next(r for r in records if r["detector"] == d and r["category"] == "screw")["metrics"]["all"]["au_pro"] for d in ("strong", "weak")}  # fmt: skip
    expected = bootstrap_difference(
        a.boot_of("au_pro"), b.boot_of("au_pro"), value["strong"], value["weak"]
    )
    assert row.iloc[0]["test"] == "bootstrap"
    assert (row.iloc[0]["diff"], row.iloc[0]["p"]) == pytest.approx(
        (expected.diff, expected.p_value)
    )
    assert len(table) == 3 * 3  # three pairs in two categories and the mean


def test_marks_bold_the_best_and_tie_the_indistinguishable(folder):
    root, records = folder
    marks = significance_marks(records, root, "pixel_auroc")
    mean = marks.xs(("toy", "mean"), level=("dataset", "column"))
    assert mean["best"].sum() == 1
    best = mean.index[mean["best"]][0][0]
    assert best in ("strong", "twin")
    other = "twin" if best == "strong" else "strong"
    assert bool(mean.loc[(other, "per-category"), "tied"])  # same strength: not distinguishable
    assert not bool(mean.loc[("weak", "per-category"), "tied"])
    board = leaderboard_markdown(records, root)
    assert "≈" in board and "## pixel_auroc" in board
    section = board.split("## pixel_auroc", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {best} |"))
    assert "**" in line


def test_bench_compare_prints_and_writes_the_table(folder, capsys):
    root, _ = folder
    assert main(["compare", str(root), "--metric", "au_pro", "--baseline", "weak"]) == 0
    out = capsys.readouterr().out
    assert "strong higher" in out and "mean over categories" in out
    table = pd.read_csv(root / "compare-au_pro.csv")
    assert set(table["b"]) == {"weak"} and len(table) == 2 * 3
    assert main(["compare", str(root), "--metric", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    assert main(["compare", str(root / "jobs")]) == 2
