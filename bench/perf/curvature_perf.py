"""Multi-scale surface variation speed: our torch/KD-tree path vs open3d on the CPU (and torch
on a GPU when there is one), on generated MVTec 3D-AD-layout scans at native size."""

from __future__ import annotations

import importlib.util
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.datasets import synthetic_3d
from bench.datasets.mvtec_3d import MVTec3D
from bench.perf import save
from bench.pointcloud import multiscale_surface_variation, open3d_surface_variation

KS = (16, 32, 64)


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(output: str, n_clouds: int = 4) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_3d.generate(
            Path(tmp), n_train=n_clouds, n_validation=0, n_test_good=0, n_per_defect=0
        )
        clouds = []
        for category in synthetic_3d.CATEGORIES:
            ds = MVTec3D(root, category, "train", image_size=None)
            for i in range(len(ds)):
                item = ds[i]
                clouds.append(item["xyz"].permute(1, 2, 0)[item["valid"]].double())
    points = sum(len(c) for c in clouds)
    rows = {}
    has_open3d = importlib.util.find_spec("open3d") is not None  # absent on an air-gapped GPU box
    if has_open3d:
        rows["open3d (CPU)"] = _best(
            lambda: [open3d_surface_variation(c.numpy(), KS) for c in clouds]
        )
    rows["ours, KD-tree + torch (CPU)"] = _best(
        lambda: [multiscale_surface_variation(c, KS, "kdtree") for c in clouds]
    )
    if torch.cuda.is_available():
        gpu = [c.float().cuda() for c in clouds]

        def run_gpu():
            for c in gpu:
                multiscale_surface_variation(c, KS, "torch")
            torch.cuda.synchronize()

        run_gpu()  # warm-up
        rows["ours, torch (GPU)"] = _best(run_gpu)
    gap = float("nan")
    if has_open3d:
        gap = max(
            float(
                np.abs(
                    multiscale_surface_variation(c, KS, "kdtree").numpy()
                    - open3d_surface_variation(c.numpy(), KS)
                ).max()
            )
            for c in clouds[:2]
        )
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "clouds": len(clouds),
        "points": points,
        "scales": list(KS),
        "seconds": rows,
        "points_per_second": {k: points / v for k, v in rows.items()},
        "max_difference_vs_open3d": gap,
    }
    lines = [
        f"# Multi-scale surface variation speed ({results['machine']}, torch {torch.__version__})",
        "",
        f"{len(clouds)} generated MVTec 3D-AD-layout scans at native size (192x192 and 176x208 "
        f"grids), {points:,} valid points, k = {', '.join(map(str, KS))} (one kNN search at the "
        "largest k); best of 3. Largest difference from open3d: "
        f"{gap:.1e}. Command: `make perf`.",
        "",
        "| implementation | seconds | points/s | vs open3d |",
        "|---|---|---|---|",
    ]
    base = rows.get("open3d (CPU)")
    for k, v in rows.items():
        ratio = f"{base / v:.1f}x" if base else "open3d not installed"
        lines.append(f"| {k} | {v:.2f} | {points / v:,.0f} | {ratio} |")
    save(output, "curvature", results, "\n".join(lines))
    print("\n".join(lines))
