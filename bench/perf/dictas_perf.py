"""DictAS speed and memory: per-image inference latency at k references, generator training
throughput, and the memory of the sparse lookup against an unchunked, fully sorted sparsemax.

CPU: the offline substitute token source (efficientnet_lite0, packaged ImageNet weights) at
336 px, plus (full run) the paper's ViT-L-14-336 with random weights on two images. GPU (when
there is one): ViT-L-14-336 with random weights, the paper's network (the OpenAI weights are not
available offline; the timings do not depend on the values of the weights). Generators are
random too (their initialisation), which changes the sparsemax support sizes, not the work of
the dense parts.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import Dataset

from bench.adapters.dictas import SUBSTITUTE, DictAS
from bench.adapters.dictas.backbone import PAPER_BACKBONE
from bench.adapters.dictas.lookup import LOOKUP_CHUNK, TOP_T, Dictionary
from bench.loading import EpochLoader
from bench.perf import save
from bench.perf.casl_perf import _cpu_name, _sync
from bench.system import device_description, track_peak_memory
from bench.training import amp_dtype
from bench.types import Batch, collate_training

CATEGORY = "bottle"  # not one of DictAS's rotated-reference categories (screw)
PAPER_LATENCY_MS = 73.5  # the paper's per-image inference time at k = 4, on its GPU
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """Sizes and repetition counts of one run (full or ``--quick``)."""

    size: int = 336
    k: int = 4
    reps: dict[str, int] | None = None  # timed predict calls per device (after one warm-up)
    vit_cpu_images: int = 2  # ViT-L-14-336 on the CPU: timed images (0 skips it)
    train: dict[str, tuple[int, int, int]] | None = None  # device: (batch, warm-up, timed steps)
    channels: int = 1024
    tokens: int = 576
    ks: tuple[int, ...] = (1, 2, 4, 8)
    lookup_batch: int = 8  # an extra k = max(ks) row with this many test images (the default)
    lookup_reps: int = 3


FULL = Plan(reps={"cpu": 10, "cuda": 50}, train={"cpu": (8, 1, 3), "cuda": (24, 3, 20)})
QUICK = Plan(
    size=112,
    reps={"cpu": 2, "cuda": 3},
    vit_cpu_images=0,
    train={"cpu": (2, 1, 1), "cuda": (4, 1, 2)},
    channels=256,
    tokens=144,
    ks=(1, 8),
    lookup_batch=2,
    lookup_reps=1,
)


# -- inputs -------------------------------------------------------------------------------------
def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: random 12 x 12 colours upsampled bilinearly."""
    coarse = torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class SmoothImages(Dataset):
    """In-memory training samples shaped like the real datasets' (two categories)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.images = smooth_images(n, size, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        category = ("bottle", "wood")[i % 2]
        meta = {"path": f"synthetic/{category}/{i:04d}.png", "category": category}
        return {"image": self.images[i], "label": torch.tensor(0), "meta": meta}


def one_category(images: torch.Tensor) -> Batch:
    """A test or reference batch of ``CATEGORY``."""
    meta = [
        {"path": f"synthetic/{CATEGORY}/{i:04d}.png", "category": CATEGORY}
        for i in range(len(images))
    ]
    return Batch(label=torch.zeros(len(images), dtype=torch.long), meta=meta, image=images)


def detector(backbone: str, size: int, **kwargs: Any) -> DictAS:
    weights = "random" if backbone == PAPER_BACKBONE else None
    return DictAS(backbone=backbone, weights=weights, input_size=size, val_fraction=0, **kwargs)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def precision(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} backbone"


# -- 1. inference latency -----------------------------------------------------------------------
def latency(backbone: str, device: torch.device, plan: Plan, reps: int) -> list[dict]:
    """Per-image ``predict`` latency (batch 1) after ``fit_references`` with k references; the
    first call (it embeds the references: keys and values, once per category) separately."""
    det = detector(backbone, plan.size, epochs=1).to(device)
    det.build(None)  # random generators: the same work as trained ones
    det.to(device)
    query = one_category(smooth_images(1, plan.size, seed=99)).to(device)
    # the runner predicts dictas in float32 (inference_amp = False); amp="bf16" puts the frozen
    # backbone alone in bf16 (GPUs only)
    amps = ["off"] + (["bf16"] if device.type == "cuda" else [])
    rows = []
    for amp in amps:
        det.amp = amp
        det.fit_references([one_category(smooth_images(plan.k, plan.size, seed=1))])
        first = timed(lambda: det.predict(query), device)
        times = [timed(lambda: det.predict(query), device) for _ in range(reps)]
        rows.append(latency_row(backbone, device, amp_dtype(device, amp), plan, first, times))
        print("latency", rows[-1], flush=True)
    return rows


def label(backbone: str) -> str:
    return backbone + (" (random weights)" if backbone == PAPER_BACKBONE else "")


def latency_row(
    backbone: str,
    device: torch.device,
    dtype: torch.dtype | None,
    plan: Plan,
    first: float,
    times: list[float],
) -> dict:
    median = statistics.median(times)
    return {
        "device": device_description(device),
        "backbone": label(backbone),
        "precision": precision(dtype),
        "input_size": plan.size,
        "k": plan.k,
        "first_predict_s": first,
        "reference_embedding_s": first - median,
        "median_s": median,
        "min_s": min(times),
        "reps": len(times),
    }


# -- 2. training throughput ---------------------------------------------------------------------
def training(backbone: str, device: torch.device, plan: Plan, amp: str = "off") -> dict:
    """``fit`` on one in-memory batch repeated (epochs = warm-up + timed steps); images/s from
    ``train_metrics_``: each step's wall time, batch transfer to training_step's loss,
    backward and Adam step (``amp``: the frozen backbone's precision)."""
    batch, warm, steps = plan.train[device.type]
    det = detector(backbone, plan.size, epochs=warm + steps, amp=amp).to(device)
    loader = EpochLoader(SmoothImages(batch, plan.size), batch, collate_fn=collate_training)
    base = trimmed_rss()
    with track_peak_memory(device, interval=0.05) as peak:
        seconds = timed(lambda: det.fit(loader), device)
    rates = [m[3] for m in det.train_metrics_[warm:]]
    row = {
        "device": device_description(device),
        "backbone": label(backbone),
        "precision": precision(amp_dtype(device, det.amp)),
        "input_size": plan.size,
        "batch": batch,
        "warm_up_steps": warm,
        "timed_steps": steps,
        "images_per_second": statistics.median(rates),
        "step_s": batch / statistics.median(rates),
        "fit_s": seconds,
        "peak_mb": (peak.gpu_bytes if device.type == "cuda" else peak.host_bytes - base) / MIB,
        "peak_kind": "GPU allocated" if device.type == "cuda" else "process RSS increase",
    }
    print("training", row, flush=True)
    return row


# -- 3. lookup memory ---------------------------------------------------------------------------
def dense_lookup(
    dic: Dictionary, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: sparsemax over the whole [B, N, M] logits with a full sort (no chunks, no
    top-T); returns the retrieved features and each row's support size."""
    z = (dic.query(query) @ keys.transpose(1, 2) * dic.scale).float()
    desc = z.sort(dim=-1, descending=True).values
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumulative = desc.cumsum(-1)
    support = (1 + ks * desc > cumulative).sum(-1, keepdim=True)
    tau = (cumulative.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return torch.clamp(z - tau, min=0) @ values.float(), support.squeeze(-1)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trimmed_rss() -> int:
    """This process's RSS after garbage collection and handing free heap pages back to the OS
    (glibc), so that memory reused afterwards counts as an increase."""
    gc.collect()
    if _libc() is not None:
        _libc().malloc_trim(0)
    return psutil.Process().memory_info().rss


def cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak of torch's CPU allocations during it: the profiler's allocation
    and free events in time order, summed (exact; allocator overhead not included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return out, peak


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``fn()`` and the memory it added at its peak (inputs excluded, its output included)."""
    if device.type != "cuda":
        return cpu_peak(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def lookup_row(dic: Dictionary, k: int, b: int, device: torch.device, plan: Plan) -> dict:
    """One lookup of ``b`` test images' tokens against k references: ours vs dense."""
    g = torch.Generator().manual_seed(k * 100 + b)
    n, c = plan.tokens, plan.channels
    query = torch.randn(b, n, c, generator=g).to(device)
    refs = torch.randn(1, k * n, c, generator=g).to(device)
    keys, values = dic.entries(refs)

    def ours() -> torch.Tensor:
        return dic.lookup(query, keys, values)

    def dense() -> tuple[torch.Tensor, torch.Tensor]:
        return dense_lookup(dic, query, keys, values)

    ours(), dense()  # warm-up
    got, ours_peak = peak_bytes(ours, device)
    (ref, support), dense_peak = peak_bytes(dense, device)
    m = k * n
    row = {
        "device": device_description(device),
        "k": k,
        "test_images": b,
        "N": n,
        "M": m,
        "C": c,
        "keys_values_mb": 2 * m * c * 4 / MIB,
        "support_median": float(support.float().median()),
        "support_max": int(support.max()),
        "rows_past_top_t": float((support >= TOP_T).float().mean()),
        "ours_s": statistics.median(timed(ours, device) for _ in range(plan.lookup_reps)),
        "ours_peak_mb": ours_peak / MIB,
        "ours_logits_mb": min(b * n, LOOKUP_CHUNK) * m * 4 / MIB,
        "dense_s": statistics.median(timed(dense, device) for _ in range(plan.lookup_reps)),
        "dense_peak_mb": dense_peak / MIB,
        "dense_logits_mb": b * n * m * 4 / MIB,
        "max_abs_diff": float((got.float() - ref.float()).abs().max()),
        "max_abs_output": float(ref.abs().max()),
    }
    print("lookup", row, flush=True)
    return row


@torch.no_grad()
def lookups(device: torch.device, plan: Plan) -> tuple[list[dict], str]:
    torch.manual_seed(0)
    dic = Dictionary(plan.channels).to(device).eval()
    shapes = [(k, 1) for k in plan.ks] + [(max(plan.ks), plan.lookup_batch)]
    rows = [lookup_row(dic, k, b, device, plan) for k, b in shapes]
    if device.type == "cuda":
        return rows, "torch.cuda.max_memory_allocated - memory_allocated before"
    return rows, "torch profiler allocation events (profile_memory=True), summed in time order"


# -- report -------------------------------------------------------------------------------------
def machine() -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{_cpu_name()} ({torch.get_num_threads()} torch threads)",
        "cpu_device": device_description(torch.device("cpu")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "timm": version("timm"),
        "open_clip_torch": version("open_clip_torch"),
        "load_average_1min": os.getloadavg()[0],
    }


def latency_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| device | backbone | precision | k | first predict (reference embedding + 1 image) "
        "| reference embedding (first - median) | per-image latency (median) | min | reps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['backbone']} | {r['precision']} | {r['k']} | "
            f"{r['first_predict_s'] * 1e3:,.0f} ms | {r['reference_embedding_s'] * 1e3:,.0f} ms | "
            f"**{r['median_s'] * 1e3:,.1f} ms** | {r['min_s'] * 1e3:,.1f} ms | {r['reps']} |"
        )
    return lines


def training_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| device | backbone | precision | batch | warm-up + timed steps | images/s (median) "
        "| s/step | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['backbone']} | {r['precision']} | {r['batch']} | "
            f"{r['warm_up_steps']} + {r['timed_steps']} | **{r['images_per_second']:.2f}** | "
            f"{r['step_s']:.2f} | {r['peak_mb']:,.0f} MB ({r['peak_kind']}) |"
        )
    return lines


def lookup_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| device | k | test images | M keys | support median / max | rows >= TOP_T "
        "| ours: time | ours: peak | ours: logits block | dense: time | dense: peak "
        "| dense: logits | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['k']} | {r['test_images']} | {r['M']:,} | "
            f"{r['support_median']:.0f} / {r['support_max']} | {r['rows_past_top_t']:.1%} | "
            f"{r['ours_s'] * 1e3:,.0f} ms | **{r['ours_peak_mb']:,.1f} MB** | "
            f"{r['ours_logits_mb']:,.1f} MB | {r['dense_s'] * 1e3:,.0f} ms | "
            f"{r['dense_peak_mb']:,.1f} MB | {r['dense_logits_mb']:,.1f} MB | "
            f"{r['max_abs_diff']:.1e} (of {r['max_abs_output']:.2f}) |"
        )
    return lines


def markdown(r: dict) -> str:
    return "\n".join(
        [
            *header_lines(r),
            *latency_section(r),
            *training_section(r),
            *lookup_section(r),
        ]
    )


def header_lines(r: dict) -> list[str]:
    m = r["machine"]
    load = f"{m['load_average_1min']:.1f} at the start, {r['load_average_end']:.1f} at the end"
    omp = f", OMP_NUM_THREADS={m['omp_num_threads']}" if m.get("omp_num_threads") else ""
    return [
        f"# DictAS speed and memory ({m['date']}{', quick run' if r['quick'] else ''})",
        "",
        f"CPU: {m['cpu']}{omp}. GPU: {m['gpu'] or 'none (GPU rows are skipped)'}. torch "
        f"{m['torch']}, timm {m['timm']}, open_clip {m['open_clip_torch']}, Python "
        f"{m['python']}. Command: `make perf` "
        f"(`python -m bench.perf dictas{' --quick' if r['quick'] else ''}`). Load average "
        f"(1 min) {load}, on {os.cpu_count()} cores: other processes may have shared the CPU "
        "(with more runnable threads than cores, torch's OpenMP threads wait on each other; "
        "OMP_NUM_THREADS=1 avoids that), so figures are medians over the stated repetitions.",
    ]


def latency_section(r: dict) -> list[str]:
    plan = r["plan"]
    return [
        "",
        f"## Inference latency, k = {plan['k']} references, batch 1, {plan['size']} px",
        "",
        "`fit_references` with k smooth random images, then `predict` on one image (already on "
        "the device, as the runner hands it over) timed with a device synchronisation; scales "
        "(1, 3), the default test layers, random generators. The first call embeds the "
        "references (keys and values, once per category; with CLIP also the prompt ensembles' "
        "text features, cached after the first precision) and is reported apart; per-image "
        "latency = median over the following calls (reps). The runner predicts in float32 "
        '(the official precision); on a GPU `amp="bf16"` (the frozen backbone alone in bf16) '
        f"is timed too. The paper reports {PAPER_LATENCY_MS} ms per image on its GPU (trained "
        "CLIP weights).",
        "",
        *latency_lines(r["latency"]),
    ]


def training_section(r: dict) -> list[str]:
    return [
        "",
        "## Generator training throughput",
        "",
        "`fit` (epochs = warm-up + timed steps over one in-memory batch of smooth random "
        "images, two categories, `val_fraction=0`); one training image = one query (synthetic "
        "anomaly with p = 0.3) + its augmented reference, both through the frozen backbone. "
        "Per step: batch to device, `training_step` (synthesis, backbone, generators, lookups, "
        "losses), backward, Adam step; images/s = median over the timed steps "
        "(`train_metrics_`), the warm-up steps excluded. Peak memory: the largest process RSS "
        "during `fit` minus the RSS before (CPU), `torch.cuda.max_memory_allocated` (GPU).",
        "",
        *training_lines(r["training"]),
    ]


def lookup_section(r: dict) -> list[str]:
    plan, lk = r["plan"], r["lookup"]
    kv = max(lk["rows"], key=lambda x: x["k"])
    n, c = plan["tokens"], plan["channels"]
    return [
        "",
        f"## Sparse lookup memory (C = {c}, {n} tokens per image)",
        "",
        f"One `Dictionary({c}).lookup` (random generators, float32, no gradient) of N = {n} "
        f"query tokens per test image against M = k x {n} keys, vs a dense reference written "
        "in the benchmark: the whole [B, N, M] logits, a full sort, cumulative sums (the same "
        "query generator). Peak = memory added at the peak of one call after a warm-up "
        f"({lk['memory_method']}); the inputs (keys and values, 2 x M x C x 4 bytes: "
        f"{kv['keys_values_mb']:.1f} MB at k = {kv['k']}) excluded, the output included. "
        f"Logits block = min(B x N, LOOKUP_CHUNK = {LOOKUP_CHUNK}) x M x 4 bytes (theory). "
        f"Time = median of {plan['lookup_reps']} after the warm-up. Support = non-zero weights "
        f"per row; rows >= TOP_T = {TOP_T} are the ones our sparsemax sorts in full.",
        "",
        *lookup_lines(lk["rows"]),
        *bound_lines(lk["rows"]),
    ]


def bound_lines(rows: list[dict]) -> list[str]:
    """How the lookup's memory grows with k, in words, from the measured rows of each device."""
    lines = []
    for device in dict.fromkeys(x["device"] for x in rows):
        one = sorted((x for x in rows if x["device"] == device and x["test_images"] == 1),
                     key=lambda x: x["k"])  # fmt: skip
        lo, hi = one[0], one[-1]
        span = hi["ours_logits_mb"] - lo["ours_logits_mb"]
        if span <= 0:
            continue
        ours = (hi["ours_peak_mb"] - lo["ours_peak_mb"]) / span
        dense = (hi["dense_peak_mb"] - lo["dense_peak_mb"]) / span
        lines += [
            "",
            f"{device}: from k = {lo['k']} to {hi['k']} the peak grows by {ours:.1f} MB per MB "
            f"of logits block for ours and by {dense:.1f} MB for the dense full sort; at k = "
            f"{hi['k']}, {hi['ours_peak_mb']:.1f} vs {hi['dense_peak_mb']:.1f} MB.",
        ]
    ok = all(x["max_abs_diff"] <= 1e-5 * max(1.0, x["max_abs_output"]) for x in rows)
    return lines + [
        "",
        "How it is bounded: memory is linear in k, with no [rows, M] sort: sparsemax finds "
        f"each row's threshold among its top {TOP_T} logits (`topk`; a row is sorted in full "
        "only when its support reaches TOP_T), so the live [rows, M] tensors are float32 copies "
        "of the logits (the scaled logits, logits - tau, the clamped weights), without the "
        "dense version's sorted copy, int64 sort indices and cumulative sums (16 more bytes "
        "per logit). The chunks split the query rows of all the test images of a call (they "
        f"share the dictionary) into blocks of {LOOKUP_CHUNK}, so a call holds at most "
        f"{LOOKUP_CHUNK} x M logits whatever the batch (the several-image row: the runner's "
        "test batch). Results "
        + ("agree with the dense reference to float32 rounding." if ok else "DIFFER (see table)."),
    ]


def main(output: str, quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    start = machine()
    cpu = torch.device("cpu")
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    rows = latency(SUBSTITUTE, cpu, plan, plan.reps["cpu"])
    if plan.vit_cpu_images:
        rows += latency(PAPER_BACKBONE, cpu, plan, plan.vit_cpu_images)
    if cuda is not None:
        rows += latency(PAPER_BACKBONE, cuda, plan, plan.reps["cuda"])
    train = [training(SUBSTITUTE, cpu, plan)]
    if cuda is not None:
        train.append(training(PAPER_BACKBONE, cuda, plan))  # float32, the official precision
        train.append(training(PAPER_BACKBONE, cuda, plan, amp="bf16"))  # bf16 backbone
    look, method = [], ""
    for device in [cpu] + ([cuda] if cuda is not None else []):
        found, how = lookups(device, plan)
        look += found
        method += ("; GPU: " if method else "CPU: ") + how
    results = {
        "machine": start,
        "quick": quick,
        "plan": asdict(plan),
        "latency": rows,
        "training": train,
        "lookup": {"rows": look, "memory_method": method},
        "load_average_end": os.getloadavg()[0],
    }
    path = save(output, "dictas", results, markdown(results))
    print(path.read_text())
