"""Cost of the bootstrap intervals against one evaluation of the same category, and their
exactness: a few resamples recomputed by the plain metrics on the resampled images.

"One evaluation" is ``Evaluator.compute`` (image and pixel metrics of the category and of each
defect type, AU-PRO, AUPIMO, the plotted curves) on maps already at native size; "bootstrap" is
everything ``bench run`` adds per job for B resamples: the per-image counts, then image and pixel
AUROC, AP, F1-max and AU-PRO on every resample (``bench.per_image.collect`` minus the
thumbnails). Both on the same maps, CPU, the same threads.
"""

from __future__ import annotations

import glob
import json
import platform
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from bench.evaluation import Evaluator
from bench.metrics import score_metrics
from bench.metrics.bootstrap import bootstrap_metrics, resample_weights
from bench.perf import save
from bench.perf.metrics_perf import make_category
from bench.system import track_peak_memory
from bench.types import Batch, Prediction

CHECKED = 3  # resamples recomputed by the plain metrics


def bottle_like(root: str, maps_dir: str | None, seed: int = 0):
    """The real bottle test masks (900 x 900); maps from an export (``maps_dir``, the official
    layout) or, without one, detector-like maps: seeded 28 x 28 noise raised over the defects,
    upsampled bilinearly (smooth, mostly distinct scores, as a patch detector's)."""
    rng = np.random.default_rng(seed)
    files = sorted(glob.glob(f"{root}/bottle/test/*/*.png"))
    if not files:
        raise FileNotFoundError(f"no MVTec AD bottle test images under {root}")
    maps, masks, defects = [], [], []
    for f in files:
        defect, stem = Path(f).parent.name, Path(f).stem
        if defect == "good":
            mask = np.zeros((900, 900), dtype=bool)
        else:
            gt = f"{root}/bottle/ground_truth/{defect}/{stem}_mask.png"
            mask = np.array(Image.open(gt)) > 0
        if maps_dir:
            amap = torch.from_numpy(tifffile.imread(f"{maps_dir}/bottle/test/{defect}/{stem}.tiff"))
        else:
            low = torch.from_numpy(rng.normal(size=(1, 1, 28, 28)).astype(np.float32))
            area = F.interpolate(torch.from_numpy(mask)[None, None].float(), (28, 28), mode="area")
            amap = F.interpolate(low + 2 * area, (900, 900), mode="bilinear")[0, 0]
        maps.append(amap.float().contiguous())
        masks.append(torch.from_numpy(mask))
        defects.append(defect)
    return maps, masks, defects


def _evaluator(maps, masks, defects) -> Evaluator:
    ev = Evaluator("official")
    for i, (m, k, d) in enumerate(zip(maps, masks, defects)):
        label = int(d != "good")
        meta = {"category": "c", "defect": d, "path": f"{d}/{i:03d}.png"}
        roi = torch.tensor([[0, 0, *k.shape]])
        batch = Batch(torch.tensor([label]), mask=k[None], roi=roi, meta=[meta])
        ev.update(Prediction(torch.tensor([float(m.max())]), m[None]), batch)
    return ev


def run_case(name: str, maps, masks, defects, resamples: int) -> dict:
    labels = np.array([int(d != "good") for d in defects])
    scores = np.array([float(m.max()) for m in maps])
    ev = _evaluator(maps, masks, defects)
    with track_peak_memory(torch.device("cpu")) as peak_eval:
        start = time.perf_counter()
        ev.compute()
        evaluation = time.perf_counter() - start
    with track_peak_memory(torch.device("cpu")) as peak_boot:
        start = time.perf_counter()
        boot = bootstrap_metrics(scores, labels, resamples, 0, maps, masks, {"au_pro": 0.3})
        bootstrap = time.perf_counter() - start
    weights = resample_weights(labels, resamples, 0)
    worst = 0.0
    for b in np.linspace(0, resamples - 1, CHECKED).astype(int):
        idx = np.repeat(np.arange(labels.size), weights[b].astype(int))
        ref = score_metrics(
            [maps[i] for i in idx], [masks[i] for i in idx], [0] * idx.size, {"all": [0]}
        )["all"]
        for metric in ("pixel_auroc", "pixel_ap", "pixel_f1max", "au_pro"):
            worst = max(worst, abs(boot.values[b, boot.names.index(metric)] - ref[metric]))
    return {
        "case": name,
        "images": len(maps),
        "pixels": int(sum(m.numel() for m in maps)),
        "defective_pixels": int(sum(int(k.sum()) for k in masks)),
        "resamples": resamples,
        "evaluation_s": evaluation,
        "bootstrap_s": bootstrap,
        "ratio": bootstrap / evaluation,
        "peak_host_mb_evaluation": peak_eval.host_bytes / 2**20,
        "peak_host_mb_bootstrap": peak_boot.host_bytes / 2**20,
        "checked_resamples": CHECKED,
        "max_abs_difference": worst,
    }


def main(output: str, quick: bool, data: str | None, maps_dir: str | None, resamples: int) -> None:
    threads = torch.get_num_threads()
    rows = []
    if data:
        maps, masks, defects = bottle_like(data, maps_dir)
        label = "bottle 83 x 900²" + (" (exported maps)" if maps_dir else " (detector-like maps)")
        rows.append(run_case(label, maps, masks, defects, resamples))
    n, size = (20, 256) if quick else (100, 1024)
    maps, masks, defects = make_category(n, size)
    rows.append(run_case(f"{n} x {size}² noise", list(maps), list(masks), defects, resamples))
    lines = [
        f"# Bootstrap intervals: cost and exactness ({platform.machine()}, {threads} torch "
        f"threads, torch {torch.__version__})",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        f"Each row also recomputes {CHECKED} resamples with the plain metrics on the resampled "
        "images (an image taken twice is two images) and gives the largest difference of pixel "
        "AUROC, AP, F1-max and AU-PRO. The noise case is the worst one for the per-image counts "
        "(uniform noise: every defect-free pixel lies between defective scores). Command: "
        "`make perf` (`python -m bench.perf bootstrap`).",
        "",
        "| case | pixels | defective | B | one evaluation (s) | bootstrap (s) | ratio | peak MB eval / boot | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['pixels']:,} | {r['defective_pixels']:,} | {r['resamples']} | "
            f"{r['evaluation_s']:.2f} | {r['bootstrap_s']:.2f} | {r['ratio']:.1f}x | "
            f"{r['peak_host_mb_evaluation']:.0f} / {r['peak_host_mb_bootstrap']:.0f} | "
            f"{r['max_abs_difference']:.1e} |"
        )
    save(output, "bootstrap", {"threads": threads, "rows": rows}, "\n".join(lines))
    print(json.dumps(rows, indent=1))
