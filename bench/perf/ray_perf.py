"""Scale-out of the Ray executor on this machine: wall time of one 12-job grid with the local
executor, and as Ray tasks on a local Ray instance with 1 and with 2 CPU workers (the ratio is
the speed-up); on a CUDA machine also jobs per hour with fractional GPUs (4 jobs sharing a GPU)
against one job per GPU at a time.

The grid (built-in MVTec AD-layout data, 2 categories x 2 seeds): feature_stats, knn and a short
autoencoder training, 12 jobs, tracking off (the executor is measured, not MLflow). Every
configuration starts from an empty results folder; the data is generated before timing.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.config import BenchConfig, DatasetEntry, DetectorEntry
from bench.perf import save


def grid(output: str, quick: bool, **kw) -> BenchConfig:
    iterations = 20 if quick else 150
    return BenchConfig(
        name="ray-perf",
        detectors=[
            DetectorEntry("feature_stats"),
            DetectorEntry("knn", params={"backbone": "efficientnet_lite0"}),
            DetectorEntry("autoencoder", params={"iterations": iterations}),
        ],
        datasets=[DatasetEntry("builtin_ad", image_size=128 if quick else 256)],
        seeds=[0, 1],
        num_workers=0,
        output=output,
        **kw,
    )


def timed(cfg: BenchConfig, cpus: int | None = None, gpus: int | None = None) -> dict:
    """One run of ``cfg`` from an empty folder; Ray runs get a fresh local instance with
    ``cpus`` CPUs (and ``gpus`` GPUs)."""
    from bench.benchmark import run_benchmark

    ray = None
    if cfg.executor == "ray":
        import ray

        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    try:
        start = time.perf_counter()
        records, failed = run_benchmark(cfg, track=False)
        seconds = time.perf_counter() - start
    finally:
        if ray is not None:
            ray.shutdown()
    assert not failed, failed
    return {
        "jobs": len(records),
        "seconds": seconds,
        "jobs_per_hour": 3600 * len(records) / seconds,
    }


def main(output: str, quick: bool = False) -> None:
    from bench.datasets import get_dataset

    get_dataset("builtin_ad").root()  # generated before any timing
    rows = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)  # a Ray task gets cpus_per_job (1) threads: the same here
        try:
            local = timed(grid(f"{tmp}/local", quick, device="cpu"))
        finally:
            torch.set_num_threads(threads)
        rows.append({"executor": "local (this process, 1 thread)", **local})
        for workers in (1, 2):
            cfg = grid(f"{tmp}/ray{workers}", quick, device="cpu", executor="ray")
            rows.append({"executor": f"ray, {workers} CPU worker(s)", **timed(cfg, cpus=workers)})
        if torch.cuda.is_available():
            for share in (1.0, 0.25):
                cfg = grid(f"{tmp}/gpu{share}", quick, device="auto", executor="ray",
                           gpus_per_job=share)  # fmt: skip
                label = f"ray, {share:g} GPU per job"
                rows.append({"executor": label, **timed(cfg, cpus=os.cpu_count(), gpus=1)})
    one, two = rows[1]["seconds"], rows[2]["seconds"]
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "quick": quick,
        "rows": rows,
        "speedup_2_vs_1_workers": one / two,
    }
    lines = [
        "# Ray executor: one 12-job grid, 1 vs 2 workers",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores"
        + (f", {result['machine']['gpu']}" if result["machine"]["gpu"] else ", no GPU")
        + f"; torch {torch.__version__}. `python -m bench.perf ray`"
        + (" --quick" if quick else "")
        + ".",
        "",
        "Grid: feature_stats, knn (EfficientNet-Lite0), autoencoder "
        f"({grid('', quick).detectors[2].params['iterations']} iterations) x built-in MVTec AD "
        "layout (2 categories) x 2 seeds = 12 jobs, tracking off, each configuration from an "
        "empty results folder. Ray times exclude `ray.init` and include starting its worker "
        "processes (Ray starts them as tasks arrive).",
        "",
        "| executor | jobs | wall time (s) | jobs per hour |",
        "|---|---|---|---|",
        *[
            f"| {r['executor']} | {r['jobs']} | {r['seconds']:.1f} | {r['jobs_per_hour']:.0f} |"
            for r in rows
        ],  # fmt: skip
        "",
        f"Speed-up of 2 Ray workers over 1: **{result['speedup_2_vs_1_workers']:.2f}x**.",
    ]
    if len(rows) > 3:
        gpu_one, gpu_share = rows[3], rows[4]
        result["gpu_sharing_gain"] = gpu_share["jobs_per_hour"] / gpu_one["jobs_per_hour"]
        lines.append(
            f"Four jobs sharing the GPU (0.25 each) against one job at a time: "
            f"**{result['gpu_sharing_gain']:.2f}x** the jobs per hour."
        )
    save(output, "ray", result, "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(str(Path("results/perf")), quick=bool(os.environ.get("QUICK")))
