"""Dinomaly against the official code (guojiajeremy/Dinomaly; ``--official PATH`` a checkout).

The official model is built from the checkout as ``dinomaly_mvtec_uni.py`` builds it (its
DINOv2 code, ``ViTill``, ``bMlp``, ``Block`` with ``LinearAttention2``), with a random ViT-S/14
with 4 registers in place of the hub weights, and its weights are copied into our detector
(the encoder through a file in Meta's layout, read by our real loading path). Compared in
float32 and float64: the class token, the encoder blocks, bottleneck, decoder blocks and
groups, the loss with hard mining and every gradient, a few training steps through our ``fit``
against the scripts' iteration (losses, learning rates, weights), the anomaly maps and image
scores of the official ``evaluation_batch``; then the learning-rate schedule over warm-up and
cosine decay and StableAdamW on shared gradients.
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
    randomise,
    shared_detector,
)

#: the official bottleneck's parameters -> ours
BOTTLENECK = {"bottleneck.0.fc1": "bottleneck.fc1", "bottleneck.0.fc2": "bottleneck.fc2"}
SETTING = (
    f"DINOv2 ViT-S/14 with 4 registers (12 blocks, img_size 518) with random weights, shared; "
    f"layers 2-9 in two groups, bottleneck dropout 0.2, 8 linear-attention decoder blocks; "
    f"{SIZE} px inputs (8 x 8 tokens), batch {BATCH}, maps at 256 px; training: {STEPS} steps "
    f"of batch 2, warm-up {WARMUP}, hard-mining ramp 4 (the scripts' 100 and 1000, shortened); "
    f"CPU, float32 and float64"
)


def official_model(off: Official, encoder: nn.Module) -> nn.Module:
    """``ViTill`` as ``dinomaly_mvtec_uni.py`` builds it for ViT-S, trainable part randomised."""
    dim, heads = 384, 6
    bottleneck = nn.ModuleList([off.blocks.bMlp(dim, dim * 4, dim, drop=0.2)])
    norm = partial(nn.LayerNorm, eps=1e-8)
    decoder = nn.ModuleList(
        off.blocks.Block(
            dim=dim,
            num_heads=heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=norm,
            attn=off.blocks.LinearAttention2,
        )  # fmt: skip
        for _ in range(8)
    )
    randomise(nn.ModuleList([bottleneck, decoder]), seed=2)
    return off.uad.ViTill(
        encoder=encoder,
        bottleneck=bottleneck,
        decoder=decoder,
        target_layers=LAYERS,
        mask_neighbor_size=0,
        fuse_layer_encoder=GROUPS,
        fuse_layer_decoder=GROUPS,
    )


def official_optimiser(off: Official, trainable: nn.Module, total: int, warmup: int):
    """The script's StableAdamW and WarmCosineScheduler (2e-3 -> 2e-4)."""
    opt = off.optim.StableAdamW(
        [{"params": trainable.parameters()}],
        lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=True, eps=1e-10,
    )  # fmt: skip
    sched = off.utils.WarmCosineScheduler(
        opt, base_value=2e-3, final_value=2e-4, total_iters=total, warmup_iters=warmup
    )
    return opt, sched


def run(official: str | None) -> Report:
    if official is None:
        raise SystemExit(
            "dinomaly parity needs --official PATH, a checkout of guojiajeremy/Dinomaly"
        )
    report = Report("dinomaly", f"guojiajeremy/Dinomaly, {checkout_version(official)}", SETTING)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        with tempfile.TemporaryDirectory() as tmp, official_dinomaly(official) as off:
            weights = Path(tmp) / "dinov2_vits14_reg4_pretrain.pth"
            base = official_model(off, official_encoder(off, weights))
            fits = {dtype: _compare(report, off, base, dtype, weights) for dtype in DTYPES}
            check.explain_float32_training(report, fits)
            report.notes.append(FLOAT64_NOTE)
            _schedule(report, off, base, weights)
            check.compare_stable_adamw(report, off, amsgrad=True)
    finally:
        torch.set_num_threads(threads)
    return report


def _compare(report: Report, off: Official, base: nn.Module, dtype, weights: Path):
    """Every stage in ``dtype``; returns the trained weights' check and the official model."""
    tag = dtype_name(dtype)
    model = copy.deepcopy(base).to(dtype)
    det = shared_detector(model, BOTTLENECK, dtype, weights)
    norm = official_normalize(off)
    x = images(BATCH, seed=3).to(dtype)
    batch = Batch(label=torch.zeros(BATCH), image=x)
    check.compare_class_token(report, tag, model.encoder, det)
    check.compare_forward(report, tag, model, det, batch, norm(x), model.bottleneck[0])
    check.compare_gradients(report, tag, off, model, det, batch, norm(x), step=3)
    check.compare_maps(report, tag, off, model, det, batch, norm(x))
    train = [images(2, seed=10 + i).to(dtype) for i in range(3)]
    trained = copy.deepcopy(model)
    trainable = nn.ModuleList([trained.bottleneck, trained.decoder])
    opt, sched = official_optimiser(off, trainable, STEPS, WARMUP)
    losses, lrs = check.official_fit(off, trained, trainable, opt, sched, map(norm, train), 5)
    det = shared_detector(model, BOTTLENECK, dtype, weights, seed=5, built=False)
    batches = [Batch(label=torch.zeros(2), image=t) for t in train]
    fit = check.compare_fit(report, tag, det, trained, batches, losses, lrs, their_group=0)
    return fit, trained


def _schedule(report: Report, off: Official, base: nn.Module, weights: Path) -> None:
    """The learning rate over 40 iterations (warm-up 10, cosine to 2e-4) and 3 beyond."""
    total, warmup = 40, 10
    det = shared_detector(base, BOTTLENECK, torch.float32, weights, iterations=total, warmup=warmup)
    ours = lr_sequence(*det.configure_optimizers(), total + 3)
    trainable = nn.ModuleList([copy.deepcopy(base.bottleneck), copy.deepcopy(base.decoder)])
    theirs = lr_sequence(*official_optimiser(off, trainable, total, warmup), total + 3)
    quantity = "learning rate over 40 steps (warm-up 10, cosine to 2e-4) and 3 after"
    report.add(quantity, [s[0] for s in ours], [s[0] for s in theirs])
