"""AUPIMO: our exact per-image values (``bench.metrics.aupimo``) against anomalib 2.7's
``aupimo_scores`` (300,000 thresholds, the default of its ``AUPIMO`` metric), in time, memory and
value, on seeded synthetic maps with blob defects."""

from __future__ import annotations

import json
import math
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.aupimo import FPR_BOUNDS, aupimo_scores
from bench.perf import save
from bench.perf.child import run_reference

ANOMALIB_THRESHOLDS = 300_000  # anomalib's AUPIMO default
CASES = [(60, 256), (83, 900), (100, 1024)]  # 83 x 900^2: the size of MVTec AD bottle's test set
QUICK_CASES = [(60, 256)]


def make_maps(n: int, size: int, seed: int = 0):
    """``n`` float32 maps of ``size``^2 (a third defect-free): smooth noise upsampled from a
    1/16 grid (like a feature map) plus fine noise; the others get 1-3 elliptic defects whose
    scores rise by a random amount toward their centres. Returns (maps, masks, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:size, 0:size]
    maps, masks, labels = [], [], []
    for i in range(n):
        coarse = torch.from_numpy(rng.standard_normal((1, 1, size // 16, size // 16), np.float32))
        z = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        z = z.numpy() + np.float32(0.1) * rng.standard_normal((size, size), np.float32)
        mask = np.zeros((size, size), dtype=bool)
        if i % 3:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0.1, 0.9, 2) * size
                ry, rx = rng.uniform(0.01, 0.08, 2) * size
                d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                mask |= d2 <= 1
                z += (rng.uniform(2.0, 8.0) * np.clip(1 - d2, 0, 1)).astype(np.float32)
        maps.append(torch.from_numpy(z))
        masks.append(torch.from_numpy(mask))
        labels.append(int(mask.any()))
    return maps, masks, labels


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _added_mib(fn):
    """(result, MiB of resident memory that ``fn()`` adds at its peak): the kernel's peak
    (VmHWM), reset just before the call, minus the resident set before it."""
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    out = fn()
    return out, (_status_kib("VmHWM") - before) / 1024


def _anomalib_worker(maps, masks, queue):
    from anomalib.metrics.pimo import functional

    def run():
        return functional.aupimo_scores(maps, masks, ANOMALIB_THRESHOLDS, FPR_BOUNDS)

    start = time.perf_counter()
    (thresholds, shared_fpr, _, classes, values, points), added = _added_mib(run)
    seconds = time.perf_counter() - start
    snapped = [
        float(functional.thresh_at_shared_fpr_level(thresholds, shared_fpr, b)[2])
        for b in FPR_BOUNDS
    ]
    queue.put(
        {
            "status": "ok",
            "seconds": seconds,
            "added_mib": added,
            "aupimo": values.tolist(),
            "classes": classes.tolist(),
            "points_in_range": points,
            "snapped_bounds": snapped,
        }
    )


def run_case(n: int, size: int, budget: float) -> dict:
    maps, masks, labels = make_maps(n, size)
    case = {"images": n, "size": size, "normal": labels.count(0), "anomalous": labels.count(1)}
    case["maps_mib"] = sum(m.numel() * 4 for m in maps) / 2**20
    times = []
    for _ in range(3):  # best of three: the machine's other load only ever adds time
        start = time.perf_counter()
        ours = aupimo_scores(maps, masks, labels)
        times.append(time.perf_counter() - start)
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc; ours allocates no tensors
    aupimo_scores(maps, masks, labels)
    case["ours_added_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    case["ours_seconds"] = min(times)
    case["ours_mean"] = ours.mean
    case["ours_thresholds"] = list(ours.thresholds)
    case["ours_curve_points"] = int(ours.curve_thresholds.size)
    out = run_reference(_anomalib_worker, (torch.stack(maps), torch.stack(masks)), budget)
    case["anomalib"] = {k: v for k, v in out.items() if k not in ("aupimo", "classes")}
    if out.get("status") != "ok":
        return case
    theirs = np.asarray(out["aupimo"], dtype=np.float64)
    assert out["classes"] == labels, "anomalib split normal / anomalous images differently"
    anomalous = np.asarray(labels) == 1
    case["anomalib_mean"] = float(np.nanmean(theirs[anomalous]))
    case["max_abs_diff"] = float(np.max(np.abs(ours.aupimo[anomalous] - theirs[anomalous])))
    case["speedup"] = out["seconds"] / case["ours_seconds"]
    # ours on anomalib's snapped range, normalised as anomalib does (by the nominal range)
    lo, hi = out["snapped_bounds"]
    snapped = aupimo_scores(maps, masks, labels, (lo, hi)).aupimo
    snapped = snapped * math.log(hi / lo) / math.log(FPR_BOUNDS[1] / FPR_BOUNDS[0])
    case["max_abs_diff_on_snapped_range"] = float(
        np.max(np.abs(snapped[anomalous] - theirs[anomalous]))
    )
    return case


def _row(c: dict) -> str:
    a = c["anomalib"]
    if a.get("status") != "ok":
        at = f"> {a['elapsed']:.0f} (stopped)" if a.get("status") == "timeout" else a["status"]
        return (
            f"| {c['images']} x {c['size']}² | {c['normal']} / {c['anomalous']} | "
            f"{c['ours_seconds']:.2f} | {c['ours_added_mib']:.0f} | {at} | - | - | - | - | - | - |"
        )
    lo, hi = a["snapped_bounds"]
    return (
        f"| {c['images']} x {c['size']}² | {c['normal']} / {c['anomalous']} | "
        f"{c['ours_seconds']:.2f} | {c['ours_added_mib']:.0f} | {a['seconds']:.1f} | "
        f"{a['added_mib']:.0f} | {c['speedup']:.0f}x | {c['ours_curve_points']:,} / "
        f"{a['points_in_range']:,} | [{lo:.5g}, {hi:.5g}] | {c['max_abs_diff']:.1e} | "
        f"{c['max_abs_diff_on_snapped_range']:.1e} |"
    )


def main(output: str, quick: bool, budget: float) -> None:
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "command": "python -m bench.perf aupimo" + (" --quick" if quick else ""),
        "fpr_bounds": list(FPR_BOUNDS),
        "anomalib_thresholds": ANOMALIB_THRESHOLDS,
        "cases": [],
    }
    try:
        import anomalib

        results["anomalib"] = anomalib.__version__
    except ImportError:
        results["anomalib"] = None
    for n, size in QUICK_CASES if quick else CASES:
        print(f"AUPIMO on {n} maps of {size}x{size} ...", flush=True)
        results["cases"].append(run_case(n, size, budget))
        print(json.dumps(results["cases"][-1], indent=2), flush=True)
    lines = [
        "| maps | normal / anomalous | ours (s) | ours added MiB | anomalib (s) | anomalib added "
        "MiB | speed-up | in range: distinct normal scores (ours) / grid thresholds (anomalib) | "
        "anomalib's snapped FPR "
        "range | max abs diff | same, ours on anomalib's range |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(c) for c in results["cases"]),
    ]
    note = (
        f"Ours: `bench.metrics.aupimo.aupimo_scores`, every distinct score a threshold, best of 3 "
        f"calls. anomalib {results['anomalib']} `anomalib.metrics.pimo.functional.aupimo_scores` "
        f"({ANOMALIB_THRESHOLDS:,} thresholds, its `AUPIMO` default) on the stacked maps, one "
        "call in a child process (import excluded). FPR range [1e-5, 1e-4]. 'added MiB': the "
        "memory a call adds to the maps it is given at its peak; ours: the peak of the NumPy "
        "buffers it allocates (tracemalloc); anomalib's: the kernel's peak resident set "
        "(VmHWM, reset before the call) minus the resident set before it. Maps: `make_maps` (smooth "
        "noise, elliptic defects, seed 0). 'max abs diff': the largest |ours - anomalib| over "
        "the anomalous images. anomalib samples the curve at a linear grid of thresholds "
        "between the lowest and highest normal score (only the listed number of grid points "
        "fall in the range) and integrates between the grid points whose shared FPR is "
        "closest to the bounds (its 'snapped' range) without interpolating at the bounds, yet "
        "divides by log(1e-4/1e-5). The last column runs ours on anomalib's snapped range, "
        "normalised the same way: what remains is the grid's sampling between its points. "
        f"Command: `{results['command']}`.\n"
    )
    save(
        output,
        "aupimo",
        results,
        f"# AUPIMO: exact vs anomalib ({results['machine']}, torch {results['torch']})\n\n"
        f"{note}\n" + "\n".join(lines),
    )
    print("\n".join(lines))
