"""The ``knn`` detector on a real MVTec AD category: feature extraction, coreset and scoring
speed, chunked nearest-neighbour search vs ``torch.cdist``, and anomalib 2.7's PatchCore with the
same backbone, input and coreset ratio side by side, both scored by our official evaluator."""

from __future__ import annotations

import json
import os
import platform
import time

import psutil
import torch

from bench.backbones import create_backbone, normalize
from bench.datasets.mvtec_ad import MVTecAD
from bench.evaluation import Evaluator
from bench.metrics import METRIC_VERSION
from bench.perf import save
from bench.perf.child import run_reference
from bench.system import track_peak_memory
from bench.types import collate

BACKBONE, LAYERS, RATIO, IMAGE_SIZE, BATCH = "efficientnet_lite0", (2, 3), 0.1, 256, 8


def batches(root: str, category: str, split: str):
    ds = MVTecAD(root, category, split, image_size=IMAGE_SIZE)
    for i in range(0, len(ds), BATCH):
        yield collate([ds[j] for j in range(i, min(len(ds), i + BATCH))])


def _extra_mb(fn) -> tuple[float, float, object]:
    """(seconds, peak resident MB above the level before, result) of ``fn()``."""
    before = psutil.Process().memory_info().rss
    with track_peak_memory(torch.device("cpu"), interval=0.005) as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, (mem.host_bytes - before) / 2**20, out


def run_ours(root: str, category: str) -> dict:
    from bench.adapters.knn import KNNPatchDistance
    from bench.adapters.knn.neighbours import nearest

    total_start = time.perf_counter()
    det = KNNPatchDistance(backbone=BACKBONE, layers=LAYERS, coreset_ratio=RATIO)
    train = list(batches(root, category, "train"))
    test = list(batches(root, category, "test"))
    load_seconds = time.perf_counter() - total_start

    start = time.perf_counter()
    patches = torch.cat([det.embed(b.image).permute(0, 2, 3, 1).flatten(0, 2) for b in train])
    feature_seconds = time.perf_counter() - start
    n_train = sum(len(b) for b in train)
    n = max(1, int(RATIO * len(patches)))
    start = time.perf_counter()
    starts = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:10]
    picks = det.coreset(patches, n, starts)  # as det.fit: projection, start points, k-center
    coreset_seconds = time.perf_counter() - start
    det.bank_ = patches[picks].contiguous()

    start = time.perf_counter()
    evaluator = Evaluator()
    for b in test:
        evaluator.update(det.predict(b), b)
    predict_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.compute()["all"]
    eval_seconds = time.perf_counter() - start

    # nearest-neighbour search alone: chunked vs one torch.cdist over the whole bank
    queries = torch.cat([det.embed(b.image).permute(0, 2, 3, 1).flatten(0, 2) for b in test[:2]])
    t_ours, mb_ours, (d_ours, _) = _extra_mb(lambda: nearest(queries, det.bank_))
    t_cdist, mb_cdist, d_cdist = _extra_mb(lambda: torch.cdist(queries, det.bank_).min(1).values)
    return {
        "train_images": n_train,
        "test_images": sum(len(b) for b in test),
        "bank_before_coreset": len(patches),
        "bank": len(det.bank_),
        "feature_dim": patches.shape[1],
        "image_loading_seconds": load_seconds,
        "feature_images_per_second": n_train / feature_seconds,
        "coreset_seconds": coreset_seconds,
        "scoring_images_per_second": sum(len(b) for b in test) / predict_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - total_start - (t_ours + t_cdist),
        "metrics": metrics,
        "nn_queries": len(queries),
        "nn_seconds": t_ours,
        "nn_extra_mb": mb_ours,
        "cdist_seconds": t_cdist,
        "cdist_extra_mb": mb_cdist,
        "nn_max_abs_difference_vs_cdist": float((d_ours - d_cdist).abs().max()),
    }


def _anomalib_worker(root: str, category: str, queue) -> None:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    total_start = time.perf_counter()
    model = PatchcoreModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False)
    ours = create_backbone(BACKBONE, "pretrained", LAYERS)  # same ImageNet weights, offline
    model.feature_extractor.feature_extractor.load_state_dict(ours.state_dict())
    train = list(batches(root, category, "train"))
    test = list(batches(root, category, "test"))
    model.train()
    start = time.perf_counter()
    for b in train:
        model(normalize(b.image))
    feature_seconds = time.perf_counter() - start
    bank_before = sum(len(e) for e in model.embedding_store)
    start = time.perf_counter()
    model.subsample_embedding(RATIO)
    coreset_seconds = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    evaluator = Evaluator()
    from bench.types import Prediction

    with torch.no_grad():
        for b in test:
            out = model(normalize(b.image))
            evaluator.update(Prediction(score=out.pred_score, anomaly_map=out.anomaly_map[:, 0]), b)
    predict_seconds = time.perf_counter() - start
    metrics = evaluator.compute()["all"]
    queue.put(
        {
            "status": "ok",
            "bank_before_coreset": bank_before,
            "bank": len(model.memory_bank),
            "feature_seconds": feature_seconds,
            "coreset_seconds": coreset_seconds,
            "scoring_images_per_second": sum(len(b) for b in test) / predict_seconds,
            "total_seconds": time.perf_counter() - total_start,
            "metrics": metrics,
        }
    )


def run_anomalib(root: str, category: str, budget: float) -> dict:
    out = run_reference(_anomalib_worker, (root, category), budget)
    if out.get("status") == "timeout":
        return {"status": "timeout", "seconds_at_least": out["elapsed"]}
    return out


def main(output: str, root: str, category: str, budget: float) -> None:
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "metric_version": METRIC_VERSION,
        "setting": f"{category}, {BACKBONE} stages {LAYERS}, input {IMAGE_SIZE}x{IMAGE_SIZE} (no crop), coreset {RATIO:.0%}, official protocol",
    }
    print("ours ...", flush=True)
    results["ours"] = run_ours(root, category)
    print(json.dumps(results["ours"], indent=2), flush=True)
    print(f"anomalib PatchCore (budget {budget:.0f} s) ...", flush=True)
    results["anomalib"] = run_anomalib(root, category, budget)
    print(json.dumps(results["anomalib"], indent=2), flush=True)
    save(output, "knn", results, markdown(results))


def markdown(r: dict) -> str:
    o, a = r["ours"], r["anomalib"]
    ok = a.get("status") == "ok"

    def m(d: dict, k: str) -> str:
        return f"{d['metrics'][k]:.4f}" if "metrics" in d else "-"

    rows = [
        (
            "bank before / after coreset",
            f"{o['bank_before_coreset']:,} / {o['bank']:,}",
            f"{a['bank_before_coreset']:,} / {a['bank']:,}" if ok else "-",
        ),
        (
            "coreset (s)",
            f"{o['coreset_seconds']:.1f}",
            f"{a['coreset_seconds']:.1f}" if ok else a.get("status"),
        ),
        (
            "scoring (images/s)",
            f"{o['scoring_images_per_second']:.1f}",
            f"{a['scoring_images_per_second']:.1f}" if ok else "-",
        ),
        ("whole job (s)", f"{o['total_seconds']:.1f}", f"{a['total_seconds']:.1f}" if ok else "-"),
        ("image AUROC", m(o, "image_auroc"), m(a, "image_auroc")),
        ("pixel AUROC", m(o, "pixel_auroc"), m(a, "pixel_auroc")),
        ("AU-PRO (FPR 0.3)", m(o, "au_pro"), m(a, "au_pro")),
        ("pixel AP", m(o, "pixel_ap"), m(a, "pixel_ap")),
    ]
    lines = [
        f"# knn vs anomalib PatchCore ({r['machine']}, torch {r['torch']})",
        "",
        f"Setting: {r['setting']}. Both scored by this harness's evaluator (metric version "
        f"{r['metric_version']}) at the masks' native 900x900. Command: `make perf`.",
        "",
        "| | ours (`knn`) | anomalib 2.7.0 PatchCore |",
        "|---|---|---|",
        *[f"| {k} | {x} | {y} |" for k, x, y in rows],
    ]
    if ok:
        lines += [
            "",
            f"Speed-up, whole job: {a['total_seconds'] / o['total_seconds']:.0f}x; "
            f"coreset: {a['coreset_seconds'] / o['coreset_seconds']:.0f}x.",
        ]
    lines += [
        "",
        f"Feature extraction: {o['feature_images_per_second']:.1f} training images/s.",
        f"Nearest-neighbour search for {o['nn_queries']:,} query patches against the "
        f"{o['bank']:,}-entry bank: chunked {o['nn_seconds']:.2f} s and {o['nn_extra_mb']:.0f} MB "
        f"extra vs `torch.cdist` {o['cdist_seconds']:.2f} s and {o['cdist_extra_mb']:.0f} MB extra "
        f"(ratio {o['cdist_seconds'] / o['nn_seconds']:.1f}x time, "
        f"{o['cdist_extra_mb'] / max(o['nn_extra_mb'], 1):.1f}x memory); largest distance "
        f"difference {o['nn_max_abs_difference_vs_cdist']:.1e}.",
        "",
    ]
    return "\n".join(lines)
