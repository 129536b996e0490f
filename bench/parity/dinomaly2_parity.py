"""Dinomaly2 against the official preview code (``--official PATH`` a checkout of it).

The official model is built from the checkout as ``dinomaly_2D.py`` builds it (its DINOv2
code, ``models.uad.Dinomaly`` with context-aware recentring, the narrow bottleneck of two
``nn.Sequential``, ``Block`` with ``LinearAttention2(eps=1e-8)``), with a random ViT-S/14 with 4
registers in place of the hub weights, and its weights are copied into our detector
(``variant="dinomaly2"``; the encoder through a file in Meta's layout). Compared in float32 and
float64: the class token, encoder blocks, bottleneck, decoder blocks, recentred targets and
outputs, the loss with hard mining and every gradient, training steps through our ``fit``
against the script's iteration with its three parameter groups, maps and image scores; then
the learning-rate schedules (constant after warm-up as the script, and with a decay ratio),
StableAdamW without AMSGrad, the step skipped on non-finite gradients after the scripts'
clipping, and the RGB + depth mode of ``dinomaly_mvtec3d.py`` (:mod:`.dinomaly2_rgbd`).
"""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bench.types import Batch

from . import Report, checkout_version
from . import dinomaly_checks as check
from .dinomaly2_rgbd import compare_rgbd
from .dinomaly_common import (
    BATCH,
    DTYPES,
    FLOAT64_NOTE,
    GROUPS,
    LAYERS,
    SIZE,
    STEPS,
    WARMUP,
    Official,
    dtype_name,
    images,
    lr_sequence,
    official_dinomaly,
    official_encoder,
    official_normalize,
    our_name,
    randomise,
    shared_detector,
)

#: the official bottleneck's parameters -> ours
BOTTLENECK = {
    "bottleneck.0.0": "bottleneck.reduce",
    "bottleneck.1.0": "bottleneck.fc1",
    "bottleneck.1.3": "bottleneck.fc2",
}
SETTING = (
    f"DINOv2 ViT-S/14 with 4 registers (12 blocks, img_size 518) with random weights, shared; "
    f"layers 2-9 in two groups, recentred targets, bottleneck 384 -> 256 -> 1536 -> 384 with "
    f"dropout 0.4, 8 linear-attention decoder blocks (eps 1e-8); {SIZE} px inputs (8 x 8 "
    f"tokens), batch {BATCH}, maps at 256 px; training: {STEPS} steps of batch 2, warm-up "
    f"{WARMUP}, hard-mining ramp 4 (the script's 100 and 1000, shortened); RGB + depth: two "
    f"{SIZE} x {SIZE} scans; CPU, float32 and float64 (RGB + depth: float32)"
)


def official_parts(off: Official, dim: int = 384, heads: int = 6):
    """The bottleneck and decoder of ``dinomaly_2D.py`` / ``dinomaly_mvtec3d.py``, randomised."""
    bottleneck = nn.ModuleList([
        nn.Sequential(nn.Linear(dim, 256), nn.Dropout(p=0.4)),
        nn.Sequential(nn.Linear(256, dim * 4), nn.GELU(), nn.Dropout(p=0.4),
                      nn.Linear(dim * 4, dim), nn.Dropout(p=0.4)),
    ])  # fmt: skip
    attention = partial(off.blocks.LinearAttention2, eps=1e-8)
    norm = partial(nn.LayerNorm, eps=1e-8)
    decoder = nn.ModuleList(
        off.blocks.Block(
            dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm, attn=attention
        )  # fmt: skip
        for _ in range(8)
    )
    randomise(nn.ModuleList([bottleneck, decoder]), seed=2)
    return bottleneck, decoder


def official_model(off: Official, encoder: nn.Module) -> nn.Module:
    bottleneck, decoder = official_parts(off)
    return off.uad.Dinomaly(
        encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=LAYERS,
        remove_class_token=False, fuse_layer_encoder=GROUPS, fuse_layer_decoder=GROUPS,
        context_aware_recenter=1,
    )  # fmt: skip


def official_optimiser(
    off: Official, model: nn.Module, total: int, warmup: int, final_ratio: float = 1.0
):
    """The script's StableAdamW (2e-4 on the bottleneck's first layer, 2e-3 elsewhere, no
    AMSGrad) and WarmupCosineScheduler (``--lr_decay_ratio`` 1: constant after warm-up)."""
    groups = [
        {"params": model.bottleneck[0].parameters(), "lr": 2e-4},
        {"params": model.bottleneck[1].parameters()},
        {"params": model.decoder.parameters()},
    ]
    opt = off.optim.StableAdamW(
        groups, lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=False, eps=1e-10
    )
    sched = off.utils.WarmupCosineScheduler(
        opt, final_ratio=final_ratio, total_epochs=total, warmup_epochs=warmup
    )
    return opt, sched


def run(official: str | None) -> Report:
    if official is None:
        raise SystemExit("dinomaly2 parity needs --official PATH, a checkout of Dinomaly2's code")
    report = Report("dinomaly2", f"Dinomaly2 preview code, {checkout_version(official)}", SETTING)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        with tempfile.TemporaryDirectory() as tmp, official_dinomaly(official) as off:
            weights = Path(tmp) / "dinov2_vits14_reg4_pretrain.pth"
            encoder = official_encoder(off, weights)
            base = official_model(off, encoder)
            fits = {dtype: _compare(report, off, base, dtype, weights) for dtype in DTYPES}
            check.explain_float32_training(report, fits)
            report.notes.append(FLOAT64_NOTE)
            _schedules(report, off, base, weights)
            check.compare_stable_adamw(report, off, amsgrad=False)
            for bad in (float("nan"), float("inf")):
                _skipped_step(report, off, base, weights, bad)
            compare_rgbd(report, off, encoder, official_parts(off), BOTTLENECK, weights, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    return report


def _compare(report: Report, off: Official, base: nn.Module, dtype, weights: Path):
    """Every stage in ``dtype``; returns the trained weights' check and the official model."""
    tag = dtype_name(dtype)
    model = copy.deepcopy(base).to(dtype)
    det = shared_detector(model, BOTTLENECK, dtype, weights, variant="dinomaly2")
    norm = official_normalize(off)
    x = images(BATCH, seed=3).to(dtype)
    batch = Batch(label=torch.zeros(BATCH), image=x)
    check.compare_class_token(report, tag, model.encoder, det)
    check.compare_forward(report, tag, model, det, batch, norm(x), model.bottleneck[1])
    check.compare_gradients(report, tag, off, model, det, batch, norm(x), step=3)
    check.compare_maps(report, tag, off, model, det, batch, norm(x))
    train = [images(2, seed=10 + i).to(dtype) for i in range(3)]
    trained = copy.deepcopy(model)
    trainable = nn.ModuleList([trained.bottleneck, trained.decoder])
    opt, sched = official_optimiser(off, trained, STEPS, WARMUP)
    losses, lrs = check.official_fit(off, trained, trainable, opt, sched, map(norm, train), 5)
    det = shared_detector(
        model, BOTTLENECK, dtype, weights, seed=5, built=False, variant="dinomaly2"
    )
    batches = [Batch(label=torch.zeros(2), image=t) for t in train]
    fit = check.compare_fit(report, tag, det, trained, batches, losses, lrs, their_group=2)
    return fit, trained


def _schedules(report: Report, off: Official, base: nn.Module, weights: Path) -> None:
    """Each parameter group's learning rate over 40 iterations (warm-up 10) and 3 beyond: the
    script's (constant after warm-up) and with ``--lr_decay_ratio 0.1`` (ours: lr_final)."""
    total, warmup = 40, 10
    for ratio, final in ((1.0, None), (0.1, 2e-4)):
        det = shared_detector(base, BOTTLENECK, torch.float32, weights, variant="dinomaly2",
                              iterations=total, warmup=warmup, lr_final=final)  # fmt: skip
        ours = lr_sequence(*det.configure_optimizers(), total)
        model = copy.deepcopy(base)
        theirs = lr_sequence(*official_optimiser(off, model, total, warmup, ratio), total)
        # our groups: everything but the bottleneck's first layer, then that layer
        pairs = [([s[0] for s in ours], [s[2] for s in theirs]),
                 ([s[1] for s in ours], [s[0] for s in theirs])]  # fmt: skip
        quantity = f"learning rates of both groups over 40 steps (warm-up 10), decay ratio {ratio}"
        report.checks.append(check.worst(quantity, pairs))


def _skipped_step(report: Report, off: Official, base: nn.Module, weights: Path, bad: float):
    """A step whose gradients hold a NaN (or an inf) after the scripts' clipping at 0.1, one
    normal step after the first; float64, lr at its full value (no warm-up)."""
    model = copy.deepcopy(base).to(torch.float64)
    det = shared_detector(model, BOTTLENECK, torch.float64, weights, variant="dinomaly2",
                          iterations=10, warmup=0)  # fmt: skip
    ours, _ = det.configure_optimizers()
    theirs, _ = official_optimiser(off, model, 10, 0)
    named = dict(det.decoder_.named_parameters())
    mine, trainable = zip(*[
        (named[our_name(k, BOTTLENECK)], p)
        for k, p in model.named_parameters()
        if not k.startswith("encoder.")
    ])  # fmt: skip
    g = torch.Generator().manual_seed(6)
    for step in range(2):
        for a, b in zip(mine, trainable):
            b.grad = torch.randn(b.shape, generator=g, dtype=torch.float64) * 1e-3
            a.grad = b.grad.clone()
        if step:  # in the last decoder block, late in the official order
            model.decoder[7].mlp.fc2.weight.grad[0, 0] = bad
            named["blocks.7.fc2.weight"].grad[0, 0] = bad
        for params, opt in ((trainable, theirs), (mine, ours)):
            nn.utils.clip_grad_norm_(params, max_norm=0.1)
            opt.step()
    quantity = f"StableAdamW: weights after a step whose gradient holds {bad} (clipped first)"
    explained = (
        "after the clipping an inf leaves the other gradients 0 and itself NaN; the official "
        "StableAdamW returns at the first non-finite tensor, after weight decay and a zero-"
        "gradient Adam step on the tensors ahead of it in its order; ours leaves the whole "
        "step out"
    )
    report.checks.append(
        check.worst(quantity, list(zip(mine, trainable)), explained=explained if bad > 0 else "")
    )
    report.notes.append(
        f"step whose gradient holds {bad}: ours skipped {ours.skipped_steps} of 2 steps"
    )
