"""Host memory and time of the exact pixel metrics: ``score_metrics`` (pixel AUROC, AP, F1-max,
AU-PRO) and ``spro_metrics`` (AU-sPRO) on generated maps at MVTec LOCO AD scale (large defects,
many defective pixels), and ``score_metrics`` on MVTec AD-like maps (small defects, where
counting every pixel dominates the time). Each call runs in a fresh child process whose peak
resident memory is read from the kernel (``VmHWM``, reset just before the call), so that what
the call adds is measured without sampling."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.perf import save

#: (maps, height, width, anomalous maps): the reviewer's LOCO scale, and a smoke size
LOCO, LOCO_QUICK = (60, 1100, 1600, 40), (12, 550, 800, 8)
#: (maps, size) of ``metrics_perf.make_category``
MVTEC, MVTEC_QUICK = (100, 1024), (30, 256)
#: (data, function, torch threads: 0 is torch's default, this machine's cores); the counting
#: runs one worker thread per torch thread, so more threads can mean more work memory
CASES = [
    ("loco", "score_metrics", 0),
    ("loco", "spro_metrics", 0),
    ("loco", "score_metrics", 8),
    ("loco", "spro_metrics", 8),
    ("mvtec", "score_metrics", 0),
]
REPEATS = 2  # fresh children per case: the fastest time and the largest peak are reported


def make_loco_like(n: int, h: int, w: int, anomalous: int, seed: int = 0):
    """``n`` float32 maps of ``h`` x ``w``, the first ``anomalous`` with 1-3 overlapping
    elliptic channels each (about a quarter of the image in all, like LOCO's large logical
    anomalies), half of them "logical" (group 1) and half "structural" (group 2), the rest
    defect-free (group 0). Scores are log-normal, shifted up inside the channels, so nearly
    every defective score is distinct (the worst case for the event arrays)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:h, 0:w]
    maps, masks, channels, groups = [], [], [], []
    for i in range(n):
        union = np.zeros((h, w), dtype=bool)
        mine = []
        if i < anomalous:
            for j in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
                ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.1, 0.3) * w
                channel = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                union |= channel
                pixels = np.flatnonzero(channel).astype(np.int32)
                saturation = pixels.size // 2 if j % 2 else min(20_000, pixels.size)
                mine.append((pixels, saturation))
        z = rng.standard_normal((h, w), dtype=np.float32) * np.float32(0.5)
        z += union * np.float32(rng.uniform(0.5, 1.5))
        maps.append(torch.from_numpy(np.exp(z, out=z)))
        masks.append(torch.from_numpy(union))
        channels.append(mine)
        groups.append(0 if i >= anomalous else 1 + i % 2)
    return maps, masks, channels, groups


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _data(data: str, quick: bool):
    """(maps, masks, channels or None, groups, subsets) of one generated data set."""
    if data == "loco":
        maps, masks, channels, groups = make_loco_like(*(LOCO_QUICK if quick else LOCO))
        return (
            maps,
            masks,
            channels,
            groups,
            {"all": [0, 1, 2], "logical": [0, 1], "structural": [0, 2]},
        )
    from bench.perf.metrics_perf import make_category

    maps, masks, defects = make_category(*(MVTEC_QUICK if quick else MVTEC))
    kinds = ["good", "crack", "hole", "scratch"]
    subsets = {"all": [0, 1, 2, 3], **{k: [0, i] for i, k in enumerate(kinds) if i}}
    return list(maps), list(masks), None, [kinds.index(d) for d in defects], subsets


def child(data: str, function: str, threads: int, quick: bool) -> dict:
    """Runs one metric function on generated data in this (fresh) process: the peak resident
    memory it adds over the data, and its time (best of 3 on the MVTec AD-like data)."""
    from bench.metrics import score_metrics, spro_metrics

    if threads:
        torch.set_num_threads(threads)
    maps, masks, channels, groups, subsets = _data(data, quick)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    times = []
    for _ in range(3 if data == "mvtec" else 1):
        start = time.perf_counter()
        if function == "score_metrics":
            out = score_metrics(maps, masks, groups, subsets)
        else:
            out = spro_metrics(maps, masks, channels, groups, subsets)
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    defective = int(sum(int(m.sum()) for m in masks))
    distinct = int(torch.unique(torch.cat([m[k] for m, k in zip(maps, masks)])).numel())
    return {
        "code": str(Path(score_metrics.__code__.co_filename).parent),
        "data": data,
        "function": function,
        "threads": torch.get_num_threads(),
        "pixels": int(sum(m.numel() for m in maps)),
        "defective": defective,
        "distinct_defective_scores": distinct,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "added_mib": (peak - before) / 1024,
        "added_bytes_per_defective": (peak - before) * 1024 / defective,
        "seconds": min(times),
        "values": out["all"],
    }


def run_child(data: str, function: str, threads: int, quick: bool, tree: Path | None) -> dict:
    """One ``child`` in a fresh process: on this checkout's code, or on the ``bench`` package
    unpacked in ``tree``."""
    args = [data, function, str(threads), "quick" if quick else "full"]
    cmd = [sys.executable, "-m", "bench.perf.metrics_memory", *args]
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tree, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if tree and not row["code"].startswith(str(tree)):
        raise RuntimeError(f"the baseline child ran {row['code']}, not the code in {tree}")
    return row


def _worst(runs: list[dict]) -> dict:
    """The run with the largest peak, with the fastest time of all."""
    row = max(runs, key=lambda r: r["added_mib"])
    return {**row, "seconds": min(r["seconds"] for r in runs)}


def measure(quick: bool, tree: Path | None) -> tuple[list[dict], list[dict]]:
    """(rows of this checkout, rows of the baseline in ``tree``), their children interleaved
    so that both meet the same load on the machine."""
    rows, before = [], []
    for data, function, threads in [c for c in CASES if not quick or c[2] == 0]:
        now, then = [], []
        for _ in range(REPEATS):
            if tree:
                then.append(run_child(data, function, threads, quick, tree))
            now.append(run_child(data, function, threads, quick, None))
        rows.append(_worst(now))
        before += [_worst(then)] if then else []
        print(json.dumps({"now": rows[-1], "before": before[-1] if then else None}), flush=True)
    return rows, before


def baseline_tree(rev: str) -> Path:
    """``bench/`` as of git revision ``rev`` (with this benchmark added), in a new temporary
    folder."""
    root = Path(__file__).resolve().parents[2]
    tree = Path(tempfile.mkdtemp(prefix="metrics-memory-"))
    archive = subprocess.run(
        ["git", "archive", rev, "bench"], cwd=root, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copy(Path(__file__), tree / "bench" / "perf" / "metrics_memory.py")
    return tree


def _table(rows: list[dict], before: list[dict] | None) -> list[str]:
    old = {(r["data"], r["function"], r["threads"]): r for r in before or []}
    lines = [
        "| data | function | torch threads | defective pixels | distinct defective scores | RSS of "
        "the data (MiB) | added before (MiB) | added now (MiB) | bytes / defective pixel, "
        "before -> now | time before -> now (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = old.get((r["data"], r["function"], r["threads"]))
        lines.append(
            f"| {r['data']} | {r['function']} | {r['threads']} | {r['defective']:,} | "
            f"{r['distinct_defective_scores']:,} | {r['rss_before_mib']:.0f} | "
            + (f"{b['added_mib']:.0f} | " if b else "- | ")
            + f"{r['added_mib']:.0f} | "
            + (f"{b['added_bytes_per_defective']:.0f} -> " if b else "")
            + f"{r['added_bytes_per_defective']:.0f} | "
            + (f"{b['seconds']:.2f} -> " if b else "")
            + f"{r['seconds']:.2f} |"
        )
    return lines


def main(output: str, quick: bool, baseline: str | None = None) -> None:
    """``baseline``: a git revision whose ``bench/`` is measured too, as 'before'."""
    tree = baseline_tree(baseline) if baseline else None
    try:
        rows, before = measure(quick, tree)
    finally:
        if tree:
            shutil.rmtree(tree)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    results = {"machine": machine, "torch": torch.__version__, "quick": quick, "rows": rows}
    results.update({"baseline": baseline, "before": before} if baseline else {})
    (n, h, w, anomalous), (m, size) = (LOCO_QUICK, MVTEC_QUICK) if quick else (LOCO, MVTEC)
    command = "python -m bench.perf metrics-memory" + (" --quick" if quick else "")
    if baseline:
        command += f" --baseline {baseline}"
    note = (
        f"loco: {n} maps of {h}x{w} (float32, {anomalous} with 1-3 overlapping elliptic "
        "channels, groups good / logical / structural, subsets all and each kind with the good "
        f"maps), generated by `make_loco_like`; mvtec: {m} maps of {size}x{size} with small "
        "elliptic defects (`metrics_perf.make_category`, groups good and three defect types, "
        "subsets as the evaluator's), time best of 3 calls in each child. Each call runs in a fresh child process; 'added' is the "
        "kernel's peak resident set (VmHWM, reset before the call) minus the resident set "
        f"before it. Worst of {REPEATS} children for memory, best for time (with more torch "
        "threads than cores, the time says little). "
        + (
            f"'before': `bench/` of git revision {baseline}, measured in the same run (its "
            "children interleaved with these). "
            if baseline
            else ""
        )
        + f"Command: `{command}`.\n"
    )
    save(
        output,
        "metrics-memory",
        results,
        f"# Pixel metrics: host memory at compute time ({machine}, torch {torch.__version__})"
        f"\n\n{note}\n" + "\n".join(_table(rows, before)),
    )
    print("\n".join(_table(rows, before)))


if __name__ == "__main__":
    data, function, threads, scale = sys.argv[1:]
    print(json.dumps(child(data, function, int(threads), scale == "quick")))
