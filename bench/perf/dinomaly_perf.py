"""Dinomaly training and inference speed: ours vs anomalib 2.7's ``Dinomaly`` on one device, both
from the same random encoder weights (no hub here) on the same images, and the loss each reaches.

GPU: the paper's configuration (ViT-B/14-reg4, 392 px, batch 16, ``steps`` iterations), ours
with bf16 autocast + fused SDPA (the default), in fp32, and with ``torch.compile``; anomalib in
fp32 (its Lightning default) and under bf16 autocast. CPU: ViT-S/14-reg4 at 224 px, fewer steps.
anomalib runs as a plain loop over its torch model, optimiser and scheduler (no Lightning
overhead), in a child process of the perf venv.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bench.perf import save
from bench.perf.child import run_reference
from bench.system import track_peak_memory
from bench.types import Batch

SETTINGS = {
    "cuda": dict(encoder="vit_base_patch14_reg4_dinov2", size=392, batch=16, steps=200),
    "cpu": dict(encoder="vit_small_patch14_reg4_dinov2", size=224, batch=16, steps=12),
}
WARM = 2  # first steps excluded from the throughput (allocation, autotuning, compilation)


def images(n: int, size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, size // 14, size // 14, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear").to(device)


class Stream:
    """``steps`` batches cycling over fixed images (an EpochLoader stand-in, data on device)."""

    def __init__(self, data: torch.Tensor, batch: int) -> None:
        self.data, self.batch = data, batch

    def __len__(self) -> int:
        return len(self.data) // self.batch

    def __iter__(self):
        for i in range(len(self)):
            image = self.data[i * self.batch : (i + 1) * self.batch]
            n, _, h, w = image.shape
            yield Batch(meta=[{}] * n, label=torch.zeros(n), image=image, mask=torch.zeros(n, h, w))


def _peak(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, torch.cuda.max_memory_allocated(device) / 2**20
    with track_peak_memory(device, interval=0.01) as mem:
        out = fn()
    return out, mem.host_bytes / 2**20


def run_ours(device: torch.device, s: dict, amp: str, compile: bool) -> dict:
    from bench.adapters.dinomaly import Dinomaly

    torch.manual_seed(1)
    det = Dinomaly(
        encoder=s["encoder"], weights="random", iterations=s["steps"], amp=amp, compile=compile
    )
    det.to(device)
    data = images(4 * s["batch"], s["size"], device)
    _, peak = _peak(device, lambda: det.fit(Stream(data, s["batch"])))
    rates = [m[3] for m in det.train_metrics_[WARM:]]
    losses = [m[1] for m in det.train_metrics_]
    batch = next(iter(Stream(data, s["batch"])))
    infer = []
    for _ in range(5):
        start = time.perf_counter()
        det.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        infer.append(time.perf_counter() - start)
    return {
        "status": "ok",
        "train_images_per_second": statistics.median(rates),
        "loss_last10": statistics.mean(losses[-10:]),
        "infer_images_per_second": s["batch"] / min(infer),
        "peak_mb": peak,
    }


def anomalib_child(device_name: str, s: dict, amp: bool, queue) -> None:
    try:
        queue.put(run_anomalib(torch.device(device_name), s, amp))
    except Exception as err:  # reported, never raised across the process boundary
        queue.put({"status": f"failed: {type(err).__name__}: {err}"})


def run_anomalib(device: torch.device, s: dict, amp: bool) -> dict:
    import timm

    create = timm.create_model

    def offline(*args, **kwargs):  # no hub here: the same random weights as ours instead
        kwargs["pretrained"] = False
        return create(*args, **kwargs)

    timm.create_model = offline
    from anomalib.models.image.dinomaly import lightning_model as lm
    from anomalib.models.image.dinomaly.components import StableAdamW, WarmCosineScheduler
    from anomalib.models.image.dinomaly.torch_model import DinomalyModel

    from bench.adapters.dinomaly.encoder import create_encoder

    torch.manual_seed(1)
    model = DinomalyModel(encoder_name=s["encoder"]).to(device)
    ours = create_encoder(s["encoder"], "random", None).vit
    missing = model.encoder.feature_extractor.load_state_dict(ours.state_dict(), strict=False)
    trainable = torch.nn.ModuleList([model.bottleneck, model.decoder])
    lm.Dinomaly._initialize_trainable_modules(trainable)
    opt = StableAdamW([{"params": trainable.parameters()}], **lm.TRAINING_CONFIG["optimizer"])
    sched = WarmCosineScheduler(
        opt, **{**lm.TRAINING_CONFIG["scheduler"], "total_iters": s["steps"]}
    )
    data = images(4 * s["batch"], s["size"], device)
    ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if amp
        else (lambda: torch.autocast(device.type, enabled=False))
    )
    times, losses = [], []

    def train():
        model.train()
        for step in range(s["steps"]):
            i = step % 4
            start = time.perf_counter()
            with ctx():
                loss = model(data[i * s["batch"] : (i + 1) * s["batch"]], global_step=step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), 0.1)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)

    _, peak = _peak(device, train)
    model.eval()
    infer = []
    with torch.no_grad(), ctx():
        for _ in range(5):
            start = time.perf_counter()
            model(data[: s["batch"]])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            infer.append(time.perf_counter() - start)
    return {
        "status": "ok",
        "train_images_per_second": s["batch"] / statistics.median(times[WARM:]),
        "loss_last10": statistics.mean(losses[-10:]),
        "infer_images_per_second": s["batch"] / min(infer),
        "peak_mb": peak,
        "encoder_keys_not_loaded": len(missing.missing_keys),
    }


def main(output: str, quick: bool = False, budget: float = 3600.0) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = dict(SETTINGS[device.type])
    if quick:
        s["steps"] = WARM + 3
    rows = []
    variants = [("ours", "auto", False)]
    if device.type == "cuda":
        variants += [("ours fp32", "off", False), ("ours + torch.compile", "auto", True)]
    for name, amp, compile in variants:
        rows.append({"implementation": name, **run_ours(device, s, amp, compile)})
    anomalib_runs = [("anomalib 2.7 (fp32)", False)]
    if device.type == "cuda":
        anomalib_runs.append(("anomalib 2.7 (bf16 autocast)", True))
    for name, amp in anomalib_runs:
        result = run_reference(anomalib_child, (device.type, s, amp), budget)
        rows.append({"implementation": name, **result})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    results = {"device": device.type, "device_name": name or platform.machine(), **s, "rows": rows}
    save(output, f"dinomaly-{device.type}", results, markdown(results))


def markdown(r: dict) -> str:
    ref = next(
        (
            x
            for x in r["rows"]
            if x["implementation"].startswith("anomalib") and x["status"] == "ok"
        ),
        None,
    )
    lines = [
        f"# Dinomaly speed, {r['device']} ({r['device_name']}, {time.strftime('%Y-%m-%d')})",
        "",
        f"Encoder {r['encoder']} (random weights, the same in both), {r['size']} px, batch "
        f"{r['batch']}, {r['steps']} iterations from the same initialisation scheme; throughput = "
        f"median over iterations after the first {WARM}; loss = mean of the last 10 iterations. "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads. Command: "
        f"`make perf` (`python -m bench.perf dinomaly`).",
        "",
        "| implementation | train images/s | vs anomalib | loss (last 10) | inference images/s | peak memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        if x["status"] != "ok":
            lines.append(f"| {x['implementation']} | {x['status']} | | | | |")
            continue
        ratio = (
            f"{x['train_images_per_second'] / ref['train_images_per_second']:.2f}x" if ref else "–"
        )
        lines.append(
            f"| {x['implementation']} | {x['train_images_per_second']:.1f} | {ratio} | "
            f"{x['loss_last10']:.4f} | {x['infer_images_per_second']:.1f} | {x['peak_mb']:.0f} |"
        )
    return "\n".join(lines)
