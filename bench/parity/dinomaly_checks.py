"""The comparisons of the Dinomaly and Dinomaly2 parity checks, stage by stage: forward
(encoder, bottleneck, decoder, groups), loss and gradients, training through our ``fit`` against
the official scripts' iteration, maps and scores of the official ``evaluation_batch``,
StableAdamW on shared gradients. Models and helpers: :mod:`bench.parity.dinomaly_common`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from bench.adapters.dinomaly import Dinomaly
from bench.adapters.dinomaly.loss import mining_fraction
from bench.adapters.dinomaly.optim import StableAdamW
from bench.types import Batch

from . import Check, Report
from .dinomaly_common import (
    LAYERS,
    MAP_SIZE,
    RAMP,
    STEPS,
    Official,
    SharedDinomaly,
    our_name,
    worst,
)


@contextlib.contextmanager
def outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Each module's last output while the block runs."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, k=k: seen.__setitem__(k, out))
        for k, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def stage_modules(encoder_blocks, bottleneck: nn.Module, decoder_blocks) -> dict[str, nn.Module]:
    named = {f"encoder {i}": encoder_blocks[i] for i in LAYERS}
    named["bottleneck"] = bottleneck
    named.update({f"decoder {i}": b for i, b in enumerate(decoder_blocks)})
    return named


def compare_class_token(report: Report, tag: str, encoder: nn.Module, det: Dinomaly) -> None:
    """The class token with its position embedding: the official code adds them in the run's
    dtype; timm folds them into one token when it reads Meta's checkpoint, here in float32."""
    theirs = encoder.cls_token + encoder.pos_embed[:, :1]
    report.add(f"{tag}: class token + its position embedding", det.frozen_encoder.vit.cls_token,
               theirs)  # fmt: skip


def compare_forward(
    report: Report,
    tag: str,
    model: nn.Module,
    det: Dinomaly,
    batch: Batch,
    x: torch.Tensor,
    bottleneck: nn.Module,
) -> None:
    """Encoder layers, bottleneck, decoder blocks and both groups (targets, outputs), eval
    mode; ``x`` is the official model's input for ``batch``."""
    model.eval()
    det.decoder_.eval()
    theirs_at = stage_modules(model.encoder.blocks, bottleneck, model.decoder)
    ours_at = stage_modules(
        det.frozen_encoder.vit.blocks, det.decoder_.bottleneck, det.decoder_.blocks
    )
    with torch.no_grad(), outputs(theirs_at) as theirs, outputs(ours_at) as ours:
        en, de = model(x)
        target, output = det._features(batch)
    layers = [(ours[f"encoder {i}"], theirs[f"encoder {i}"]) for i in LAYERS]
    report.checks.append(worst(f"{tag}: encoder blocks 2-9 (all tokens)", layers))
    report.add(f"{tag}: bottleneck output", ours["bottleneck"], theirs["bottleneck"])
    blocks = [(ours[f"decoder {i}"], theirs[f"decoder {i}"]) for i in range(len(model.decoder))]
    report.checks.append(worst(f"{tag}: decoder blocks 1-8", blocks))
    report.checks.append(worst(f"{tag}: encoder targets, 2 groups", list(zip(target, en))))
    report.checks.append(worst(f"{tag}: decoder outputs, 2 groups", list(zip(output, de))))


def official_loss(off: Official, model: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """The official loss of an iteration: ``p = min(0.9 it / ramp, 0.9)`` (the scripts' ramp
    of 1000 shortened to :data:`RAMP`), ``global_cosine_hm_percent`` with factor 0.1."""
    en, de = model(x)
    p = min(0.9 * step / RAMP, 0.9)
    return off.utils.global_cosine_hm_percent(en, de, p=p, factor=0.1)


def compare_gradients(
    report: Report,
    tag: str,
    off: Official,
    model: nn.Module,
    det: SharedDinomaly,
    batch: Batch,
    x: torch.Tensor,
    step: int,
) -> None:
    """One training forward and backward in train mode (same dropout masks): the loss with
    hard mining and the gradient of every trainable parameter."""
    model.train()
    det.decoder_.train()
    model.zero_grad(set_to_none=True)
    det.decoder_.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    theirs = official_loss(off, model, x, step)
    theirs.backward()
    torch.manual_seed(7)
    ours = det.training_step(batch, step)
    ours.backward()
    p = mining_fraction(step, det.hard_mining, det.hard_mining_ramp)
    report.add(f"{tag}: loss with hard mining (p = {p:.3g})", ours, theirs)
    named = dict(det.decoder_.named_parameters())
    pairs = [
        (named[our_name(k, det.bottleneck_names)].grad, p.grad)
        for k, p in model.named_parameters()
        if not k.startswith("encoder.")
    ]
    report.checks.append(worst(f"{tag}: gradients ({len(pairs)} trainable tensors)", pairs))


def official_fit(
    off: Official,
    model: nn.Module,
    trainable: nn.Module,
    optimizer,
    scheduler,
    batches: Iterable[torch.Tensor],
    seed: int,
) -> tuple[list[float], list[list[float]]]:
    """The official scripts' training iteration, :data:`STEPS` times over ``batches`` (cycled):
    each step's loss and its groups' learning rates."""
    batches, losses, lrs = list(batches), [], []
    model.train()
    torch.manual_seed(seed)
    for it in range(STEPS):
        loss = official_loss(off, model, batches[it % len(batches)], it)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)
        optimizer.step()
        losses.append(loss.item())
        lrs.append([g["lr"] for g in optimizer.param_groups])
        scheduler.step()
        torch.manual_seed(seed + it + 1)
    return losses, lrs


def compare_fit(
    report: Report,
    tag: str,
    det: SharedDinomaly,
    model: nn.Module,
    batches: list[Batch],
    their_losses: list[float],
    their_lrs: list[list[float]],
    their_group: int,
) -> Check:
    """Our ``fit`` over the same batches against the official iterations: each step's loss
    and learning rate, and every trainable weight after the last step (returned)."""
    det.fit(batches)
    report.add(
        f"{tag}: loss of each of {STEPS} training steps",
        [m[1] for m in det.train_metrics_],
        their_losses,
    )
    report.add(
        f"{tag}: learning rate of each step",
        [m[2] for m in det.train_metrics_],
        [lr[their_group] for lr in their_lrs],
    )
    named = dict(det.decoder_.named_parameters())
    pairs = [
        (named[our_name(k, det.bottleneck_names)], p)
        for k, p in model.named_parameters()
        if not k.startswith("encoder.")
    ]
    check = worst(f"{tag}: weights after {STEPS} steps ({len(pairs)} tensors)", pairs)
    report.checks.append(check)
    return check


def trainable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for k, p in model.named_parameters() if not k.startswith("encoder.")]


def explain_float32_training(report: Report, fits: dict[torch.dtype, tuple[Check, nn.Module]]):
    """Adam divides each gradient element by its own running RMS, so an element whose gradient
    is at rounding level gets an lr-sized step in a direction set by rounding: float32 runs of
    two implementations that sum in another order drift apart by more than float32 rounding.
    The float32 weights are explained when they are no further from the official float32 run
    than that run is from the official float64 run (the table's note gives both)."""
    (ours32, official32), (ours64, official64) = fits[torch.float32], fits[torch.float64]
    pairs = list(zip(trainable_weights(official32), trainable_weights(official64)))
    noise = worst("official float32 vs float64", pairs).max_rel
    report.notes.append(
        f"weights after {STEPS} steps: the official float32 run is {noise:.2e} (max rel) from "
        f"the official float64 run; ours is {ours32.max_rel:.2e} from the official run in "
        f"float32 and {ours64.max_rel:.2e} in float64"
    )
    if ours32.status == "FAIL" and ours32.max_rel <= 2 * noise:
        ours32.explained = (
            f"float32 rounding amplified by Adam's per-element normalisation (elements whose "
            f"gradient is at rounding level take lr-sized steps): the official float32 run is "
            f"{noise:.1e} from its own float64 run; in float64 ours is {ours64.max_rel:.1e} off"
        )


def official_maps(
    off: Official, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``evaluation_batch`` (max_ratio 0.01, resize_mask 256) on one batch: the
    maps out of its Gaussian filter (cast to the maps' dtype) and the image scores it passes
    to ``roc_auc_score``. Its ``compute_pro`` is left out (it needs pandas < 2, for
    ``DataFrame.append``): the metrics are not compared, the maps and scores are."""
    utils, maps, calls = off.utils, [], []
    kernel, auroc, pro = utils.get_gaussian_kernel, utils.roc_auc_score, utils.compute_pro

    def filter_seen(*args, **kwargs):
        conv = kernel(*args, **kwargs).to(x.dtype)
        conv.register_forward_hook(lambda _m, _a, out: maps.append(out))
        return conv

    def auroc_seen(y_true, y_score, *args, **kwargs):
        calls.append(y_score)
        return auroc(y_true, y_score, *args, **kwargs)

    utils.get_gaussian_kernel, utils.roc_auc_score = filter_seen, auroc_seen
    utils.compute_pro = lambda *args, **kwargs: math.nan
    try:
        loader = [(x, masks, labels, [f"{i}.png" for i in range(len(x))])]
        utils.evaluation_batch(model, loader, "cpu", max_ratio=0.01, resize_mask=MAP_SIZE)
    finally:
        utils.get_gaussian_kernel, utils.roc_auc_score, utils.compute_pro = kernel, auroc, pro
    scores = next(torch.as_tensor(c) for c in calls if len(c) == len(x))
    return maps[0][:, 0], scores


def compare_maps(
    report: Report,
    tag: str,
    off: Official,
    model: nn.Module,
    det: Dinomaly,
    batch: Batch,
    x: torch.Tensor,
) -> None:
    masks = torch.zeros(len(x), 1, *x.shape[-2:], dtype=x.dtype)
    masks[len(x) // 2 :, :, 40:60, 50:70] = 1  # both classes, for the official metrics
    labels = (masks.flatten(1).amax(1) > 0).long()
    maps, scores = official_maps(off, model, x, labels, masks)
    det.decoder_.eval()
    pred = det.predict(batch)
    report.add(f"{tag}: anomaly maps ({MAP_SIZE} px, blurred)", pred.anomaly_map, maps)
    report.add(f"{tag}: image scores (top 1% mean)", pred.score, scores)


def compare_stable_adamw(report: Report, off: Official, amsgrad: bool) -> None:
    """Both StableAdamW on the same tensors and gradients (some steps' updates clipped by their
    RMS), the official scripts' settings; float64."""
    g = torch.Generator().manual_seed(4)
    shapes = ((384, 256), (256,), (6, 64, 64))
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=g, dtype=torch.float64) * 10.0**-k for s in shapes]
        for k in range(4)
    ]
    kw = dict(lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=amsgrad, eps=1e-10)
    sides = []
    for cls in (StableAdamW, off.optim.StableAdamW):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = cls(params, **kw)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        sides.append(params)
    report.checks.append(
        worst(f"StableAdamW (amsgrad={amsgrad}): weights after 4 steps", list(zip(*sides)))
    )
