"""`bench report --html`: one self-contained page from a generated benchmark folder (job records
and per-image files in the results folder's format), its numbers against a brute-force
computation from the generated data, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench.cli import main
from bench.report_html import render_html_report, write_html_report

N_GOOD, N_BAD, B, SIZE = 10, 10, 200, 96
CATEGORIES = ("alpha", "beta")
#: detector -> (separation of its maps on the defects, substitutes, images per second): "close"
#: is "strong" with a little noise (never significantly different), "weak" barely separates
DETECTORS = {
    "strong": (3.0, [], 50.0),
    "close": (3.0, ["a stand-in backbone"], 20.0),
    "weak": (0.15, [], 200.0),
}


def pixel_auroc_from_hist(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from per-level counts of positives and negatives ([..., 256]), ties counted half:
    the Mann-Whitney statistic, checked against scikit-learn below."""
    below = np.cumsum(neg, axis=-1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(-1)
    return wins / (pos.sum(-1) * neg.sum(-1))


def make_job(root, data_root, category, c_index, detector, rng_maps, resample) -> dict:
    """One job's record and per-image file: generated maps (noise, plus the detector's
    separation on the defect), the image score each map's maximum."""
    separation, substitutes, images_per_second = DETECTORS[detector]
    labels = np.r_[np.ones(N_BAD), np.zeros(N_GOOD)].astype(np.int8)  # ids sort "crack" first
    masks = np.zeros((N_GOOD + N_BAD, SIZE, SIZE), bool)
    for k in range(N_BAD):
        y, x = 10 + 6 * k, 20 + 3 * k
        masks[k, y : y + 14, x : x + 18] = True
    base = rng_maps["noise"] + separation * masks * rng_maps["gain"][:, None, None]
    maps = base + (0.05 * rng_maps[detector] if detector == "close" else 0)
    lo, hi = float(maps.min()), float(maps.max())
    thumbs = np.round((maps - lo) / (hi - lo) * 255).astype(np.uint8)
    scores = maps.reshape(len(maps), -1).max(1)
    defects = np.where(labels == 1, "crack", "good")
    ids = np.array([f"{d}/{k:03d}" for k, d in enumerate(defects)])
    assert (ids[:-1] < ids[1:]).all()  # sorted, as the per-image files are
    paths = np.array([f"{category}/test/{i}.png" for i in ids])
    pos = np.stack([np.bincount(t[m], minlength=256) for t, m in zip(thumbs, masks)])
    neg = np.stack([np.bincount(t[~m], minlength=256) for t, m in zip(thumbs, masks)])
    # AUROC of resample b: pairs (good i, anomalous j) weighted by how often each is drawn
    wins = (scores[None, :] > scores[:, None]) + 0.5 * (scores[None, :] == scores[:, None])
    bad, good = resample[:, :N_BAD], resample[:, N_BAD:]
    boot_image = np.einsum("bi,bj,ij->b", good, bad, wins[N_BAD:, :N_BAD]) / (N_GOOD * N_BAD)
    boot_pixel = pixel_auroc_from_hist(resample @ pos, resample @ neg)
    boot = np.stack([boot_image, boot_pixel], axis=1)
    metrics = {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": float(roc_auc_score(masks.ravel(), thumbs.ravel())),
    }
    assert np.isclose(metrics["pixel_auroc"], pixel_auroc_from_hist(pos.sum(0), neg.sum(0)))
    slug = f"{detector}__toy__{category}__seed0"
    per_image = Path("per_image") / f"{slug}.npz"
    (root / per_image).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        root / per_image, format=np.array([1]), ids=ids, paths=paths, labels=labels,
        defects=defects, scores=scores, thumbs=thumbs, thumb_range=np.array([lo, hi]),
        mask_thumbs=masks, boot_metrics=np.array(["image_auroc", "pixel_auroc"]), boot=boot,
        boot_seed=np.array([c_index]), aupimo=aupimo_of(scores, labels),
    )  # fmt: skip
    for path, mask in zip(paths, masks):  # the test images (beta's: never written)
        if category != "beta" and not (data_root / path).exists():
            (data_root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((64 + 100 * mask).astype(np.uint8)).convert("RGB").save(
                data_root / path
            )
    fpr = np.r_[0, np.cumsum(neg.sum(0)[::-1]) / neg.sum()]
    tpr = np.r_[0, np.cumsum(pos.sum(0)[::-1]) / pos.sum()]
    record = {
        "detector": detector, "detector_name": detector, "dataset": "toy", "category": category,
        "seed": 0, "draw": None, "protocol": "official", "metric_version": "1.0",
        "fit_label": "per-category", "fit_hash": f"{detector}{c_index}", "scope": {},
        "substitutes": substitutes, "transductive": None, "root": str(data_root),
        "metrics": {"all": metrics}, "n_test": len(labels), "per_image": str(per_image),
        "curves": {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(),
                   "pro": (tpr**1.5).round(6).tolist()},
        "ci": {"method": "stratified percentile bootstrap over test images", "level": 0.95,
               "resamples": B, "seed": c_index,
               "metrics": {m: np.percentile(boot[:, i], [2.5, 97.5]).tolist()
                           for i, m in enumerate(("image_auroc", "pixel_auroc"))}},
        "timings": {"fit_seconds": 1.0 + c_index, "fitted_seconds": 1.0 + c_index,
                    "predict_images_per_second": images_per_second,
                    "model_images_per_second": 100.0},
        "memory": {"predict_peak_host_mb": 900.0 + len(detector), "predict_peak_gpu_mb": 0.0,
                   "fit_peak_host_mb": 1000.0},
    }  # fmt: skip
    (root / "jobs").mkdir(exist_ok=True)
    (root / "jobs" / f"{slug}.json").write_text(json.dumps(record))
    return record


def aupimo_of(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Stand-in per-image AUPIMO in [0, 1] for the anomalous images, NaN for the good ones."""
    spread = (scores - scores.min()) / (np.ptp(scores) + 1e-9)
    return np.where(labels == 1, spread, np.nan)


def make_benchmark(tmp: Path) -> tuple[Path, list[dict]]:
    """results/toy/ with 3 detectors x 2 categories; resample b draws the same images (within
    good and anomalous) for every detector of a category, so the jobs' boot rows are paired."""
    root, data_root = tmp / "results" / "toy", tmp / "data"
    root.mkdir(parents=True)
    records = []
    for c_index, category in enumerate(CATEGORIES):
        rng = np.random.default_rng(c_index)
        n = N_GOOD + N_BAD
        draws = np.hstack([rng.integers(0, N_BAD, (B, N_BAD)), rng.integers(N_BAD, n, (B, N_GOOD))])
        counts = np.stack([np.bincount(d, minlength=n) for d in draws])
        noise = {"noise": rng.normal(0, 1, (n, SIZE, SIZE)), "gain": rng.uniform(0.2, 1.0, n)}
        noise["close"] = rng.normal(0, 1, (n, SIZE, SIZE))
        for detector in DETECTORS:
            records.append(make_job(root, data_root, category, c_index, detector, noise, counts))
    return root, records


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> tuple[Path, list[dict], str]:
    root, records = make_benchmark(tmp_path_factory.mktemp("report"))
    path = write_html_report(root.parent, root.name, records)
    return root, records, path.read_text(encoding="utf-8")


def boot_of(root: Path, record: dict, metric: str) -> np.ndarray:
    with np.load(root / record["per_image"]) as z:
        return z["boot"][:, list(z["boot_metrics"]).index(metric)]


def name_of(record: dict) -> str:
    return record["detector"] + (" †" if record["substitutes"] else "")


def table_rows(html: str) -> dict[str, list[str]]:
    """The leaderboard's rows: detector -> its cells' text (marks are CSS, not text)."""
    body = html.split('<table class="sortable">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1], flags=re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S) for r in rows]
    return {c[0]: c[1:] for c in cells}


def test_the_page_is_one_file_that_fetches_nothing(bench_folder):
    root, _, html = bench_folder
    assert sorted(p.name for p in root.iterdir()) == ["jobs", "per_image", "report.html"]
    from plotly.offline import get_plotlyjs

    assert html.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined, once
    outside_scripts = re.sub(r"<script\b.*?</script>", "", html, flags=re.S | re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", outside_scripts, re.I)
    assert "<link" not in outside_scripts and "@import" not in outside_scripts
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    # dots x2, AUPIMO, diffs, curves, cost
    assert html.count('class="plotly-graph-div"') == 2 + 1 + 1 + 1 + 1


def test_the_leaderboard_holds_each_mean_and_its_interval(bench_folder):
    root, records, html = bench_folder
    rows = table_rows(html)
    assert set(rows) == {name_of(r) for r in records}
    for detector in DETECTORS:
        mine = [r for r in records if r["detector"] == detector]
        for k, metric in enumerate(("image_auroc", "pixel_auroc")):
            value = np.mean([r["metrics"]["all"][metric] for r in mine])
            mean_boot = np.mean([boot_of(root, r, metric) for r in mine], axis=0)
            low, high = np.percentile(mean_boot, [2.5, 97.5])
            assert rows[name_of(mine[0])][k] == f"{value:.3f} [{low:.3f}, {high:.3f}]"
        ms = 1000 / mine[0]["timings"]["predict_images_per_second"]
        assert rows[name_of(mine[0])][2] == f"{ms:.3g}"
    assert "a stand-in backbone" in html  # the substitutes note under the † mark


def test_best_and_tied_marks(bench_folder):
    _, records, html = bench_folder
    body = html.split('<table class="sortable">', 1)[1].split("</table>", 1)[0]
    marks = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)[1:]:
        cells = re.findall(r'<td class="([^"]*)"[^>]*>(.*?)</td>', row, flags=re.S)
        marks[cells[0][1]] = cells[1][0]  # image AUROC
    means = {
        name_of(r): np.mean([q["metrics"]["all"]["image_auroc"] for q in records
                             if q["detector"] == r["detector"]])
        for r in records
    }  # fmt: skip
    best = max(means, key=means.get)
    assert marks[best] == "best"
    assert [marks[n] for n in means if n != best and n.startswith(("strong", "close"))] == ["tied"]
    assert marks["weak"] == ""
    assert "Holm" in html and "0.05" in html


def test_each_category_dot_shows_its_record_interval(bench_folder):
    _, records, html = bench_folder
    for r in records:
        low, high = r["ci"]["metrics"]["pixel_auroc"]
        value = r["metrics"]["all"]["pixel_auroc"]
        text = f"{name_of(r)}<br>{r['category']}: {value:.3f} [{low:.3f}, {high:.3f}]"
        assert json.dumps(text)[1:-1].replace("<", "\\u003c").replace(">", "\\u003e") in html


def test_the_paired_matrix_holds_each_mean_difference(bench_folder):
    _, records, html = bench_folder
    paired = html.split('id="paired"', 1)[1].split('id="curves"', 1)[0]
    mean = {
        (name_of(r), m): np.mean([q["metrics"]["all"][m] for q in records
                                  if q["detector"] == r["detector"]])
        for r in records for m in ("image_auroc", "pixel_auroc")
    }  # fmt: skip
    names = sorted({name_of(r) for r in records})
    for a in names:
        for b in names:
            for m in ("image_auroc", "pixel_auroc"):
                if a != b:
                    diff = mean[(a, m)] - mean[(b, m)]
                    assert f'"{diff:+.3f}\\u003cbr\\u003ep' in paired


def test_the_image_rows_are_the_best_detectors_misses_then_random(bench_folder):
    root, records, html = bench_folder
    for category in CATEGORIES:
        mine = [r for r in records if r["category"] == category]
        best = max(mine, key=lambda r: r["metrics"]["all"]["image_auroc"])
        with np.load(root / best["per_image"]) as z:
            anomalous = np.flatnonzero(z["labels"] == 1)
            hardest = z["ids"][anomalous[np.argsort(z["scores"][anomalous])[:3]]]
        section = html.split(f"toy / {category} ")[1].split("</table>")[0]
        shown = re.findall(r"<div>([a-z]+/\d{3})</div>", section)
        assert shown[:3] == hardest.tolist() and len(shown) == 5
        missing = 5 if category == "beta" else 0  # grey placeholders naming the path
        assert section.count("<img") == 5 * (2 + len(DETECTORS)) - missing
        unreadable = [
            f"unreadable: {root.parent.parent / 'data' / category}/test/{i}.png" for i in shown
        ]
        assert sum(u in section for u in unreadable) == missing


def test_sorting_script_and_headers(bench_folder):
    _, _, html = bench_folder
    assert 'document.querySelectorAll("table.sortable th")' in html
    assert re.findall(r"<th>([^<]*)</th>", html)[:3] == ["detector", "image AUROC", "pixel AUROC"]


def test_records_without_per_image_files_show_means_only(bench_folder):
    root, records, _ = bench_folder
    old = [{k: v for k, v in r.items() if k not in ("per_image", "ci")} for r in records]
    html = render_html_report(root, old, "old")
    rows = table_rows(html)
    for r in old[:3]:
        value = np.mean([q["metrics"]["all"]["image_auroc"] for q in old
                         if q["detector"] == r["detector"]])  # fmt: skip
        assert rows[name_of(r)][0] == f"{value:.3f}"
    assert "means only" in html and 'class="tied"' not in html
    with pytest.raises(ValueError, match="at least one finished job"):
        render_html_report(root, [], "empty")


def test_bench_report_html_prints_the_path(bench_folder, tmp_path, capsys):
    root = tmp_path / "results" / "toy"
    shutil.copytree(bench_folder[0], root, ignore=shutil.ignore_patterns("report.html"))
    assert main(["report", "--html", "--name", root.name, "--output", str(root.parent)]) == 0
    assert f"html report: {root / 'report.html'}" in capsys.readouterr().out
    assert (root / "report.html").stat().st_size > 4_000_000  # plotly.js itself is ~4.8 MB


@pytest.mark.slow
def test_the_benchmark_parent_run_holds_the_page(bench_folder, tmp_path):
    """``Tracker.log_summary`` logs report.html next to the leaderboard (a real SQLite store)."""
    from mlflow import MlflowClient

    from bench.tracking import Tracker

    root, records, html = bench_folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = root.parent / "mlartifacts"  # as Tracker.from_config: <output>/mlartifacts
    with Tracker(uri, "adbench/toy", artifacts, root.name, {}) as tracker:
        tracker.log_summary(records)
        assert not tracker.failed
        run_id = tracker.parent_id
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"leaderboard.md", "report.html"} <= names
    logged = Path(client.download_artifacts(run_id, "report.html", str(tmp_path)))
    assert table_rows(logged.read_text(encoding="utf-8")) == table_rows(html)


# --- the page in a real browser -------------------------------------------------------------

BROWSER_CHECK = textwrap.dedent(
    """
    import json, sys
    from playwright.sync_api import sync_playwright
    url, executable = sys.argv[1], sys.argv[2] or None
    out = {"errors": [], "requests": []}
    with sync_playwright() as pw:
        if executable is None and not __import__("os").path.exists(pw.chromium.executable_path):
            print(json.dumps({"skip": "no Chromium: apt-get install chromium"})); sys.exit()
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: m.type == "error" and out["errors"].append(m.text))
        page.on("pageerror", lambda e: out["errors"].append(str(e)))
        page.on("request", lambda r: r.url.split(":")[0] not in ("file", "data")
                and out["requests"].append(r.url))
        page.goto(url, wait_until="load")
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div svg').length > 0")
        out["plots"] = page.eval_on_selector_all(
            ".plotly-graph-div", "ds => ds.map(d => d.querySelectorAll('svg.main-svg').length)")
        first = "table.sortable tbody tr td:first-child"
        column = "table.sortable tbody tr td:nth-child(2)"
        out["before"] = page.eval_on_selector_all(first, "cs => cs.map(c => c.textContent)")
        page.click("table.sortable th:nth-child(2)")
        out["desc"] = page.eval_on_selector_all(column, "cs => cs.map(c => c.dataset.sort)")
        page.click("table.sortable th:nth-child(2)")
        out["asc"] = page.eval_on_selector_all(column, "cs => cs.map(c => c.dataset.sort)")
        out["aria"] = page.get_attribute("table.sortable th:nth-child(2)", "aria-sort")
        browser.close()
    print(json.dumps(out))
    """
)


def playwright_python() -> str | None:
    """An interpreter that imports Playwright (kept out of the project's environment):
    $BENCH_PLAYWRIGHT_PYTHON, this one, or /tmp/pw (bench/perf/screenshots.py's venv)."""
    for python in (os.environ.get("BENCH_PLAYWRIGHT_PYTHON"), sys.executable, "/tmp/pw/bin/python"):
        if python and Path(python).exists():
            probe = subprocess.run([python, "-c", "import playwright"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


@pytest.mark.slow
def test_the_page_in_headless_chromium(bench_folder, tmp_path):
    python = playwright_python()
    if python is None:
        pytest.skip("Playwright not found: python3 -m venv /tmp/pw && /tmp/pw/bin/pip install "
                    "playwright (or set BENCH_PLAYWRIGHT_PYTHON)")  # fmt: skip
    root, _, _ = bench_folder
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    script = tmp_path / "check.py"
    script.write_text(BROWSER_CHECK)
    url = (root / "report.html").as_uri()
    done = subprocess.run([python, str(script), url, chromium], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["errors"] == [] and out["requests"] == []
    assert len(out["plots"]) == 6 and all(n > 0 for n in out["plots"])  # every plot rendered
    assert sorted(out["before"]) == ["close †", "strong", "weak"]
    values = [float(v) for v in out["desc"]]
    assert values == sorted(values, reverse=True) and len(set(values)) == 3
    assert [float(v) for v in out["asc"]] == sorted(values) and out["aria"] == "ascending"


def test_the_aupimo_distribution_of_each_category(bench_folder):
    from bench.report_html import aupimo_values

    root, records, html = bench_folder
    assert "AUPIMO per anomalous image" in html
    values = aupimo_values(root, records)
    assert sorted(values) == sorted({r["category"] for r in records})
    for r in records:
        with np.load(root / r["per_image"]) as z:
            expected = z["aupimo"][z["labels"] == 1]
        np.testing.assert_array_equal(values[r["category"]][name_of(r)], expected)
