"""Dinomaly: each part against an independent computation, the training loop's outcomes (loss
falls, exact resume), the Dinomaly2 options, and a unified benchmark run with the offline
encoder substitute named in the record, the MLflow run and the leaderboard; Dinomaly2's RGB +
depth mode: the colourised depth against a loop-by-loop reading of the official preparation
and OpenCV's colour map, the fused encoder layers, the plan's modality checks and a unified
run on generated MVTec 3D-AD-layout scans."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from bench.adapters.dinomaly import Dinomaly
from bench.adapters.dinomaly.depth import depth_grey, fill_gaps, hot_colours, rgb_and_depth
from bench.adapters.dinomaly.encoder import ViTEncoder, create_encoder
from bench.adapters.dinomaly.loss import (
    anomaly_maps,
    gaussian_kernel,
    global_cosine_hard_mining,
    mining_fraction,
    top_mean,
)
from bench.adapters.dinomaly.network import LinearAttention, Reconstructor
from bench.adapters.dinomaly.optim import StableAdamW, warm_cosine
from bench.backbones import normalize
from bench.training import CHECKPOINT_NAME
from bench.types import Batch

#: a 2-block random ViT-S/14 with registers: the real architecture, small enough for a CPU test
TINY = dict(
    encoder="vit_small_patch14_reg4_dinov2",
    weights="random",
    encoder_depth=2,
    layers=(0, 1),
    decoder_depth=2,
    warmup=3,
    hard_mining_ramp=4,
    map_size=None,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _images(n: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth random textures in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class Batches:
    """Re-iterable batches of fixed images (a stand-in for the runner's EpochLoader)."""

    def __init__(self, images: torch.Tensor, batch_size: int = 4) -> None:
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self), 1):
            image = self.images[i * self.batch_size : (i + 1) * self.batch_size]
            n, _, h, w = image.shape
            yield Batch(
                meta=[{} for _ in range(n)],
                label=torch.zeros(n),
                image=image,
                mask=torch.zeros(n, h, w),
            )


# -- optimiser and schedule --------------------------------------------------------------------
def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((5, 7), (7,), (3, 2, 4))]


def _quadratic_steps(opt, params, steps: int, scale: float) -> None:
    g = torch.Generator().manual_seed(42)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() * scale for p, t in zip(params, targets))
        loss.backward()
        opt.step()


@pytest.mark.parametrize("amsgrad", [True, False])
def test_stable_adamw_without_clipping_is_torch_adamw(amsgrad):
    ours, theirs = _params(0), _params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-2, amsgrad=amsgrad)
    _quadratic_steps(StableAdamW(ours, clip_threshold=1e12, **kw), ours, 12, 1.0)
    _quadratic_steps(torch.optim.AdamW(theirs, **kw), theirs, 12, 1.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _reference_stable_adamw(params, steps, lr, wd, eps, amsgrad, clip):
    """The official per-parameter loop, written out with Python floats for the scale."""
    g = torch.Generator().manual_seed(42)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    state = [
        dict(m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p)) for p in params
    ]
    params = [p.detach().clone().double() for p in params]
    targets = [t.double() for t in targets]
    for step in range(1, steps + 1):
        for p, t, s in zip(params, targets, state):
            grad = 2 * (p - t) * 1e-3
            p.mul_(1 - lr * wd)
            s["m"] = 0.9 * s["m"].double() + 0.1 * grad
            s["v"] = 0.999 * s["v"].double() + 0.001 * grad * grad
            s["vmax"] = torch.maximum(s["vmax"].double(), s["v"])
            second = s["vmax"] if amsgrad else s["v"]
            denom = second.sqrt() / math.sqrt(1 - 0.999**step) + eps
            ratio = grad / denom
            rms = float(ratio.norm() / math.sqrt(ratio.numel()))
            scale = max(1.0, rms / clip)
            p.add_(-(lr / (1 - 0.9**step) / scale) * s["m"] / denom)
    return params


@pytest.mark.parametrize("amsgrad", [True, False])
def test_stable_adamw_clips_each_update_by_its_rms_as_the_official_code(amsgrad):
    # a gradient scale of 1e-3 with eps 1: g / denom is small early and then grows, so some
    # steps are clipped (scale > 1) and some are not
    ours = _params(1)
    opt = StableAdamW(
        ours, lr=0.05, eps=1e-3, weight_decay=0.1, amsgrad=amsgrad, clip_threshold=0.5
    )
    _quadratic_steps(opt, ours, 15, 1e-3)
    expected = _reference_stable_adamw(_params(1), 15, 0.05, 0.1, 1e-3, amsgrad, 0.5)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-4, atol=1e-6)
    # clipping changed the result: without it the parameters differ
    unclipped = _params(1)
    opt = StableAdamW(
        unclipped, lr=0.05, eps=1e-3, weight_decay=0.1, amsgrad=amsgrad, clip_threshold=1e12
    )
    _quadratic_steps(opt, unclipped, 15, 1e-3)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, unclipped))


def test_warm_cosine_is_the_official_schedule():
    base, final, total, warmup = 2e-3, 2e-4, 40, 10
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = warm_cosine(opt, total, warmup, final / base)
    seen = []
    for _ in range(total + 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    rest = np.arange(total - warmup)
    official = np.concatenate(
        (
            np.linspace(0, base, warmup),
            final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / len(rest))),
        )
    )
    np.testing.assert_allclose(seen[:total], official, rtol=1e-12, atol=1e-15)
    assert seen[total:] == pytest.approx([final] * 3)
    # Dinomaly2's WarmupCosineScheduler(final_ratio=1): lr * step / warmup, then constant
    opt = torch.optim.SGD([p], lr=base)
    sched = warm_cosine(opt, total, warmup, None, full_at_last_warmup_step=False)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:warmup] == pytest.approx([base * i / warmup for i in range(warmup)])
    assert lrs[warmup:] == pytest.approx([base] * (total - warmup))


def _gradients(params, seed: int, bad: float | None = None) -> None:
    """Random gradients; ``bad`` (NaN or inf) put into one element of the second tensor."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if bad is not None:
        params[1].grad[3] = bad


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_dinomaly2_optimiser_skips_a_step_whose_gradients_are_not_finite(bad):
    """Dinomaly2's StableAdamW leaves out a step whose gradients hold NaN or inf: weights and
    optimiser state as before it, the step counted; the next steps are those of a run that
    never saw it. Dinomaly's (no skipping, as the official v1 code) writes the NaN in."""
    kw = dict(lr=1e-2, eps=1e-10, weight_decay=1e-4, amsgrad=True)
    ours, clean = _params(2), _params(2)
    opt = StableAdamW(ours, skip_nonfinite=True, **kw)
    reference = StableAdamW(clean, **kw)
    for seed in (0, 1):
        for params, o in ((ours, opt), (clean, reference)):
            _gradients(params, seed)
            o.step()
    weights = [p.detach().clone() for p in ours]
    state = {k: v.clone() for s in opt.state.values() for k, v in s.items() if k != "step"}
    _gradients(ours, 2, bad)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ours, weights))
    after = {k: v for s in opt.state.values() for k, v in s.items() if k != "step"}
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert [s["step"] for s in opt.state.values()] == [2, 2, 2]
    for seed in (3, 4):  # a normal step is taken and not counted
        for params, o in ((ours, opt), (clean, reference)):
            _gradients(params, seed)
            o.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ours, clean))
    _gradients(clean, 2, bad)
    reference.step()
    assert not all(torch.isfinite(p).all() for p in clean)


# -- decoder -----------------------------------------------------------------------------------
def test_linear_attention_is_the_normalised_kernel_attention():
    torch.manual_seed(0)
    attn = LinearAttention(24, heads=3).double()
    torch.nn.init.normal_(attn.qkv.weight, std=0.3)
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 11, 3, 3, 8).permute(2, 0, 3, 1, 4)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-1, -2)  # [b, h, n, n], the quadratic form
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    expected = attn.proj(expected.transpose(1, 2).reshape(2, 11, 24))
    torch.testing.assert_close(attn(x), expected)


def test_reconstructor_initialisation_and_output_order():
    torch.manual_seed(0)
    net = Reconstructor(32, 4, depth=4, dropout=0.2)
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linear])
    assert weights.abs().max() <= 0.03 and 0.007 < weights.std() < 0.011
    assert all(not m.bias.any() for m in linear)
    net.eval()
    x = [torch.randn(2, 5, 32) for _ in range(4)]
    out = net(x)
    manual = net.bottleneck(torch.stack(x).mean(0))
    chain = []
    for block in net.blocks:
        manual = block(manual)
        chain.append(manual)
    assert len(out) == 4 and all(torch.equal(a, b) for a, b in zip(out, chain[::-1]))


# -- loss and maps -------------------------------------------------------------------------------
def test_hard_mining_damps_the_easy_points_gradient_only():
    torch.manual_seed(0)
    target = [torch.randn(3, 6, 4, 5) for _ in range(2)]
    output = [(t + 0.5 * torch.randn_like(t)).requires_grad_() for t in target]
    p, factor = 0.75, 0.1
    loss = global_cosine_hard_mining(target, output, p, factor)
    # the value: 1 - cosine of each image's whole flattened map, averaged
    expected = np.mean(
        [
            np.mean(
                [
                    1
                    - a[i].flatten().numpy()
                    @ b[i].detach().flatten().numpy()
                    / np.linalg.norm(a[i].numpy())
                    / np.linalg.norm(b[i].detach().numpy())
                    for i in range(3)
                ]
            )
            for a, b in zip(target, output)
        ]
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    plain = [o.detach().clone().requires_grad_() for o in output]
    global_cosine_hard_mining(target, plain, 0.0, 1.0).backward()
    for t, o, q in zip(target, output, plain):
        distance = 1 - F.cosine_similarity(t, o.detach(), dim=1)
        k = int(distance.numel() * (1 - p))
        kth = distance.flatten().sort(descending=True).values[k - 1]
        easy = (distance < kth)[:, None].expand_as(o)
        assert easy.any() and (~easy).any()
        torch.testing.assert_close(o.grad[easy], factor * q.grad[easy])
        torch.testing.assert_close(o.grad[~easy], q.grad[~easy])
    assert [mining_fraction(s, 0.9, 1000) for s in (0, 500, 1000, 5000)] == [0, 0.45, 0.9, 0.9]


def test_maps_and_score_follow_the_official_evaluation():
    torch.manual_seed(0)
    a = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    b = [x + 0.3 * torch.randn_like(x) for x in a]
    maps = anomaly_maps(a, b, (28, 28), (20, 20), kernel=5, sigma=4.0)
    # independently: per group distance, upsample (align_corners), mean, resize, 5x5 zero-pad blur
    per_group = [
        F.interpolate(
            (1 - F.cosine_similarity(x, y, dim=1))[:, None],
            (28, 28),
            mode="bilinear",
            align_corners=True,
        )
        for x, y in zip(a, b)
    ]
    mean = (per_group[0] + per_group[1]) / 2
    small = F.interpolate(mean, (20, 20), mode="bilinear", align_corners=False)[:, 0].numpy()
    grid = np.arange(5) - 2.0
    kernel = np.exp(-(grid[:, None] ** 2 + grid[None] ** 2) / (2 * 16.0))
    kernel /= kernel.sum()
    padded = np.pad(small, ((0, 0), (2, 2), (2, 2)))
    blurred = np.zeros_like(small)
    for dy in range(5):
        for dx in range(5):
            blurred += kernel[dy, dx] * padded[:, dy : dy + 20, dx : dx + 20]
    np.testing.assert_allclose(maps.numpy(), blurred, rtol=1e-5, atol=1e-6)
    assert gaussian_kernel(5, 4.0, torch.device("cpu")).sum() == pytest.approx(1.0)
    flat = np.sort(maps.flatten(1).numpy(), axis=1)[:, ::-1]
    k = int(400 * 0.01)
    assert top_mean(maps, 0.01).numpy() == pytest.approx(flat[:, :k].mean(1), rel=1e-6)


# -- encoder -----------------------------------------------------------------------------------
def _dinov2_positions(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Meta's DINOv2 ``interpolate_pos_encoding`` for a patch grid of h x w (offset 0.1,
    bicubic on scale factors, no antialias), on its patch embeddings [1, N, D]."""
    n, dim = pos.shape[1], pos.shape[2]
    side = math.sqrt(n)
    grid = pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic", antialias=False
    )
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


def test_vit_tokens_match_timm_at_native_size_and_dinov2_when_resized():
    torch.manual_seed(0)
    enc = create_encoder("vit_small_patch14_reg4_dinov2", "random", (0, 1), depth=2)
    vit = enc.vit
    torch.nn.init.normal_(vit.pos_embed, std=0.5)  # a position signal worth interpolating
    x = torch.randn(1, 3, 518, 518)
    ours, grid = enc(x)
    assert grid == (37, 37)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        expected = []
        for block in vit.blocks:
            tokens = block(tokens)
            expected.append(tokens)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    # 392 px: 28 x 28 tokens with the official interpolation, not timm's antialiased resample
    positions = enc.positions(28, 28)
    torch.testing.assert_close(positions, _dinov2_positions(vit.pos_embed, 28, 28))
    from timm.layers import resample_abs_pos_embed

    timm_default = resample_abs_pos_embed(vit.pos_embed, (28, 28), (37, 37), num_prefix_tokens=0)
    assert (positions - timm_default).abs().max() > 1e-3
    # anomalib 2.7 turns timm's antialiasing off; the embeddings still differ, as timm passes
    # the target size where DINOv2 passes the factor (28 + 0.1) / 37, by which torch places the
    # samples: with the factor recomputed from the output size, DINOv2's call gives timm's
    plain = resample_abs_pos_embed(
        vit.pos_embed, (28, 28), (37, 37), num_prefix_tokens=0, antialias=False
    )
    assert (positions - plain).abs().max() > 1e-3
    square = vit.pos_embed.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    recomputed = F.interpolate(
        square, scale_factor=(28.1 / 37,) * 2, mode="bicubic", recompute_scale_factor=True
    )
    torch.testing.assert_close(recomputed.permute(0, 2, 3, 1).reshape(plain.shape), plain)
    out, grid = enc(torch.randn(1, 3, 392, 392))
    assert grid == (28, 28) and out[0].shape == (1, 5 + 28 * 28, 384)


def test_meta_dinov2_checkpoint_loads_through_the_real_path(tmp_path):
    """A checkpoint in Meta's layout (cls position inside pos_embed, register_tokens,
    mask_token), as the official Dinomaly loads it, gives the encoder timm's weights."""
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2)
    torch.nn.init.normal_(source.pos_embed, std=0.5)
    torch.nn.init.normal_(source.reg_token, std=0.5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    cls_position = torch.randn(1, 1, 384)
    meta = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], 1)
    meta["cls_token"] = state["cls_token"] - cls_position
    meta["register_tokens"] = state["reg_token"]
    meta["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta, path)
    loaded = create_encoder("vit_small_patch14_reg4_dinov2", str(path), (0, 1), depth=2)
    reference = ViTEncoder("vit_small_patch14_reg4_dinov2", "random", (0, 1), 2)
    reference.vit.load_state_dict(state)
    x = torch.randn(2, 3, 70, 84)
    for a, b in zip(loaded(x)[0], reference(x)[0]):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "missing.pth"), None)


def test_the_offline_substitute_preserves_each_layers_cosines():
    enc = create_encoder("efficientnet_lite0", "pretrained", None)
    x = torch.rand(2, 3, 128, 128)
    layers, grid = enc(x)
    assert grid == (8, 8) and len(layers) == 8 and enc.prefix == 0
    with torch.no_grad():
        h = enc.stem(x)
        raw = []
        for block in enc.blocks:
            h = block(h)
            raw.append(F.adaptive_avg_pool2d(h, grid).flatten(2).transpose(1, 2))
    for embedded, native in zip(layers, raw):
        assert embedded.shape[-1] == 128
        gram, expected = embedded @ embedded.transpose(1, 2), native @ native.transpose(1, 2)
        assert (gram - expected).abs().max() < 1e-5 * expected.abs().max()


# -- the detector ------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_reduces_the_loss():
    seed_everything(0)
    det = Dinomaly(**TINY, iterations=24)
    det.fit(Batches(_images(16)))
    losses = [v for _, v in det.train_log_]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4])
    pred = det.predict(next(iter(Batches(_images(4, seed=1)))))
    assert pred.score.shape == (4,) and pred.anomaly_map.shape == (4, 56, 56)


class CrashAt(Dinomaly):
    crash_at = 5

    def training_step(self, batch, step):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().training_step(batch, step)


@pytest.mark.slow
def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    params = dict(**TINY, iterations=8, checkpoint_every=4)
    data = Batches(_images(12))
    seed_everything(0)
    straight = Dinomaly(**params)
    straight.workdir = tmp_path / "straight"
    straight.fit(data)

    seed_everything(0)
    crashed = CrashAt(**params)
    crashed.workdir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(data)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)["step"] == 4

    seed_everything(99)  # the checkpoint restores the RNG (the bottleneck's dropout masks)
    resumed = Dinomaly(**params)
    resumed.workdir = tmp_path / "resumed"
    resumed.fit(data)
    assert resumed.train_log_ == straight.train_log_
    a, b = straight.decoder_.state_dict(), resumed.decoder_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds the trained part only, never the frozen encoder
    blob = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)
    assert set(blob["modules"]) == {"decoder_"}


def test_dinomaly2_options():
    seed_everything(0)
    det = Dinomaly(**{**TINY, "variant": "dinomaly2"}, iterations=6)
    assert (det.dropout, det.narrow, det.lr_final, det.narrow_lr, det.amsgrad, det.recentre) == (
        0.4, 256, None, 2e-4, False, True,
    )  # fmt: skip
    # the official dinomaly_2D.py: LinearAttention2(eps=1e-8), --total_iters 40000, ViT-S
    v2 = Dinomaly(variant="dinomaly2")
    assert (v2.attention_eps, v2.iterations) == (1e-8, 40000)
    assert (Dinomaly().attention_eps, Dinomaly().iterations) == (0.0, 10000)
    assert Dinomaly().encoder == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert v2.encoder == "vit_small_patch14_reg4_dinov2.lvd142m"
    # dinomaly_mvtec3d.py: ViT-B and one learning rate for the whole bottleneck
    rgbd = Dinomaly(variant="dinomaly2", inputs="rgb+depth")
    assert (rgbd.encoder, rgbd.narrow_lr) == ("vit_base_patch14_reg4_dinov2.lvd142m", None)
    det.fit(Batches(_images(8)))
    bottleneck = det.decoder_.bottleneck
    assert (bottleneck.reduce.in_features, bottleneck.reduce.out_features) == (384, 256)
    assert (bottleneck.fc1.in_features, bottleneck.fc1.out_features) == (256, 4 * 384)
    opt, sched = det.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # warm-up starts at 0
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 / 3, 2e-4 / 3])  # step/3
    for _ in range(9):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])  # then constant
    # recentring acts on the encoder targets only (the official Dinomaly.forward): each target
    # token is its group's patch token minus the group's class token, layer-normalised; the
    # decoder output is compared as it is
    det.decoder_.eval()
    image = torch.rand(2, 3, 56, 56)
    target, output = det._features(Batch(label=torch.zeros(2), image=image))
    layers, grid = det.frozen_encoder(normalize(image))
    for t, tokens in zip(target, layers):  # one layer per group in TINY
        expected = F.layer_norm(tokens[:, 5:] - tokens[:, :1], (384,), eps=1e-8)
        torch.testing.assert_close(t.flatten(2).transpose(1, 2), expected)
    assert all(o.mean(1).abs().max() > 1e-3 for o in output)


class NanGradientAt(Dinomaly):
    """Training step 3's loss is finite but its gradient is NaN (0 x d sqrt(x)/dx at 0 = 0 x
    inf); the decoder's weights are kept after every step."""

    def training_step(self, batch, step):
        loss = super().training_step(batch, step)
        if step == 3:
            weight = self.decoder_.bottleneck.fc2.weight
            loss = loss + 0.0 * torch.sqrt(weight * 0.0).sum()
        return loss

    def after_step(self, step, optimizer):
        self.kept_ = getattr(self, "kept_", {})
        self.kept_[step] = {k: v.clone() for k, v in self.decoder_.state_dict().items()}


class StepRecorder:
    """A StepLogger that keeps what the loop reports."""

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def log(self, step, metrics):
        self.logged[step] = dict(metrics)

    def flush(self):
        pass

    def finish(self, train_log):
        pass


def test_dinomaly2_training_skips_and_counts_a_step_with_nan_gradients(capsys):
    seed_everything(0)
    det = NanGradientAt(**{**TINY, "variant": "dinomaly2"}, iterations=6)
    det.step_logger = StepRecorder()
    det.fit(Batches(_images(8)))
    assert det.skipped_steps_ == [3]
    kept = det.kept_
    assert all(torch.equal(kept[3][k], kept[2][k]) for k in kept[2])  # step 3 changed nothing
    assert any(not torch.equal(kept[4][k], kept[3][k]) for k in kept[3])  # step 4 did
    assert all(math.isfinite(v) for _, v in det.train_log_)
    # the schedule went on through the skipped step (step / warm-up 3, then constant)
    assert [m[2] for m in det.train_metrics_] == pytest.approx(
        [2e-3 * s / 3 for s in range(3)] + [2e-3] * 3
    )
    logged = det.step_logger.logged
    assert [logged[s]["train/skipped_steps"] for s in range(6)] == [0, 0, 0, 1, 1, 1]
    assert "optimiser step 3 skipped" in capsys.readouterr().err
    # Dinomaly's optimiser takes the step (as the official v1): NaN weights, then a NaN loss
    seed_everything(0)
    v1 = NanGradientAt(**TINY, iterations=6)
    with pytest.raises(FloatingPointError, match="at step 4"):
        v1.fit(Batches(_images(8)))


def test_substitutes_are_named():
    assert Dinomaly.substitutes(Dinomaly().get_params()) == []
    [note] = Dinomaly.substitutes(Dinomaly(encoder="efficientnet_lite0").get_params())
    assert "substitute" in note and "vit_base_patch14_reg4_dinov2" in note
    [note] = Dinomaly.substitutes(Dinomaly(**TINY).get_params())
    assert "random weights" in note


@pytest.mark.slow
def test_unified_run_with_the_substitute_writes_one_state_and_names_the_substitute(
    tmp_path, ad_root, monkeypatch
):
    from mlflow import MlflowClient

    from bench.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    args = [
        "run", "--detectors", "dinomaly", "--datasets", "mvtec_ad", "--root", str(ad_root),
        "--image-size", "64", "--scope", "unified", "--batch-size", "4", "--num-workers", "0",
        "--param", "dinomaly.encoder=efficientnet_lite0", "--param", "dinomaly.iterations=6",
        "--param", "dinomaly.warmup=2", "--param", "dinomaly.decoder_depth=2",
        "--name", "dino", "--output", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "dino" / "jobs").glob("*.json"))]
    assert [r["category"] for r in records] == ["washer", "weave"]
    assert len({r["fit_hash"] for r in records}) == 1 and records[0]["n_train"] == 24
    assert len(list(out.glob("dino/state/*/fitted.pt"))) == 1
    for r in records:
        assert r["fit_label"] == "unified"
        assert r["substitutes"] and "encoder substitute efficientnet_lite0" in r["substitutes"][0]
        assert 0 <= r["metrics"]["all"]["image_auroc"] <= 1
        assert r["skipped_steps"] == 0
    board = next(out.glob("dino/**/leaderboard.md")).read_text()
    assert "| dinomaly † | unified |" in board and "## Substitutes" in board
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adbench/dino")
    jobs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("adbench.kind") == "job"
    ]
    assert len(jobs) == 2
    assert all("efficientnet_lite0" in r.data.tags["adbench.substitutes"] for r in jobs)
    assert all(r.data.metrics["train_skipped_steps"] == 0 for r in jobs)


# -- Dinomaly2's RGB + depth mode (MVTec 3D-AD) -------------------------------------------
def official_fill(z: np.ndarray, passes: int) -> np.ndarray:
    """The official fill, pixel by pixel: each pixel that is 0 at the start of a pass and has a
    non-zero 3 x 3 neighbour takes sum(window) / count(window > 0) of the previous pass
    (windows clipped at the border)."""
    h, w = z.shape
    for _ in range(passes):
        prev = z.copy()
        for y in range(h):
            for x in range(w):
                if prev[y, x] != 0:
                    continue
                win = prev[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                n = (win > 0).sum()
                if n:
                    z[y, x] = win.sum() / n
    return z


def official_grey(z: np.ndarray, passes: int) -> np.ndarray:
    z = official_fill(z.astype(np.float64), passes)
    mask = z > 0
    d = (z - z[mask].min()) / (z.max() - z[mask].min())
    d = 1 - 0.8 * d
    d[~mask] = 0
    return (d * 255).astype(np.uint8)


def _scan(seed: int, h: int = 24, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """A tilted surface 0.5-0.6 m away with holes (invalid pixels), [h, w] z and valid."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    z = 0.5 + 0.004 * yy + 0.002 * xx + 0.001 * torch.rand(h, w, generator=g)
    valid = torch.rand(h, w, generator=g) > 0.3
    valid[:6, :5] = False  # a region wider than three fill passes
    return z * valid, valid


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_depth_grey_levels_follow_the_official_preparation(passes):
    zs, valids = zip(*(_scan(s) for s in range(3)))
    z, valid = torch.stack(zs), torch.stack(valids)
    grey, filled = depth_grey(z, valid, passes)
    for i in range(3):
        expected = official_grey(z[i].numpy(), passes)
        ours = grey[i].numpy().astype(int)
        assert np.array_equal(filled[i].numpy(), official_fill(z[i].numpy().copy(), passes) > 0)
        # float32 here, float64 there: a level may differ where 255 (1 - 0.8 d) is an integer
        assert np.abs(ours - expected).max() <= 1 and (ours == expected).mean() > 0.99
        assert grey[i][~filled[i]].eq(0).all() and grey[i][filled[i]].min() >= 50


def test_depth_is_made_in_float32_under_autocast():
    """A 3 cm deep object 0.6 m away: bf16 (autocast) or TF32 sums would move its grey levels by
    tens; the depth image must be the same with and without autocast."""
    g = torch.Generator().manual_seed(1)
    z = 0.6 + 0.03 * F.interpolate(torch.rand(2, 1, 8, 8, generator=g), size=(64, 64))[:, 0]
    valid = torch.rand(2, 64, 64, generator=g) > 0.4
    plain = depth_grey(z * valid, valid, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = depth_grey(z * valid, valid, 3)
    assert torch.equal(plain[0], cast[0]) and torch.equal(plain[1], cast[1])
    assert cast[0].dtype == torch.float32


def test_fill_grows_one_pixel_per_pass_into_a_hole():
    valid = torch.ones(1, 9, 9, dtype=torch.bool)
    valid[0, 2:7, 2:7] = False  # a 5 x 5 hole: 9, 1, then 0 empty
    z = torch.full((1, 9, 9), 2.0) * valid
    for passes, empty in ((1, 9), (2, 1), (3, 0)):
        filled_z, filled = fill_gaps(z, valid, passes)
        assert int((~filled).sum()) == empty
        assert torch.allclose(filled_z[filled], torch.tensor(2.0))


#: cv2.applyColorMap(level, COLORMAP_HOT) as RGB (OpenCV 5.1.0), around each ramp's ends
HOT_LEVELS = {
    0: [0, 0, 0], 1: [2, 0, 0], 2: [5, 0, 0], 25: [62, 0, 0], 101: [252, 0, 0],
    102: [253, 2, 0], 103: [254, 4, 0], 104: [254, 6, 0], 203: [255, 252, 2],
    204: [255, 253, 5], 205: [255, 254, 8], 206: [255, 255, 11], 253: [255, 255, 245],
    254: [255, 255, 250], 255: [255, 255, 255],
}  # fmt: skip


def test_hot_colours_are_opencv_colormap_hot():
    levels = torch.tensor(list(HOT_LEVELS), dtype=torch.float32)
    ours = hot_colours(levels) * 255
    assert torch.equal(ours, ours.round())  # whole 8-bit levels, as ToTensor makes them
    assert ours.int().tolist() == list(HOT_LEVELS.values())
    cv2 = pytest.importorskip("cv2")  # every level, where OpenCV is installed
    grey = np.arange(256, dtype=np.uint8)
    expected = cv2.applyColorMap(grey[:, None], cv2.COLORMAP_HOT)[:, 0, ::-1].astype(np.float32)
    ours = hot_colours(torch.from_numpy(grey).float()).numpy()
    assert np.array_equal(ours, expected / np.float32(255))


def test_rgb_is_blacked_out_where_no_depth_remains():
    z, valid = _scan(0)
    rgb = torch.rand(1, 3, *z.shape)
    masked, depth = rgb_and_depth(rgb, z[None], valid[None], passes=1)
    _, filled = fill_gaps(z[None], valid[None], 1)
    assert masked[:, :, ~filled[0]].eq(0).all()
    assert torch.equal(masked[:, :, filled[0]], rgb[:, :, filled[0]])
    assert depth[:, :, ~filled[0]].eq(0).all() and depth.shape == rgb.shape


def _rgbd_batch(n: int = 2, size: int = 28, seed: int = 0) -> Batch:
    zs, valids = zip(*(_scan(seed + i, size, size) for i in range(n)))
    z, valid = torch.stack(zs), torch.stack(valids)
    xyz = torch.stack([torch.zeros_like(z), torch.zeros_like(z), z], 1)
    rgb = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return Batch(label=torch.zeros(n), image=rgb, rgb=rgb, xyz=xyz, valid=valid)


def test_encoder_layers_are_the_weighted_mean_of_rgb_and_depth():
    torch.manual_seed(0)
    det = Dinomaly(**TINY, variant="dinomaly2", inputs="rgb+depth", rgb_weight=0.3)
    batch = _rgbd_batch()
    det.build(batch)
    det.decoder_.eval()
    target, _ = det._features(batch)
    rgb, depth = rgb_and_depth(batch.rgb, batch.xyz[:, 2], batch.valid, 3)
    a, grid = det.frozen_encoder(normalize(rgb))  # each image on its own
    b, _ = det.frozen_encoder(normalize(depth))
    for t, la, lb in zip(target, a, b):
        fused = 0.3 * la + 0.7 * lb
        expected = F.layer_norm(fused[:, 5:] - fused[:, :1], (384,), eps=1e-8)
        torch.testing.assert_close(t.flatten(2).transpose(1, 2), expected, atol=2e-5, rtol=1e-4)


def test_images_only_batch_is_refused_with_what_is_missing():
    det = Dinomaly(**TINY, inputs="rgb+depth")
    batch = Batch(label=torch.zeros(1), image=torch.rand(1, 3, 28, 28))
    det.build(batch)
    with pytest.raises(ValueError, match="rgb\\+depth.*organised point clouds"):
        det._features(batch)


def test_modalities_follow_the_inputs():
    assert Dinomaly.accepted_modalities() == ("image", "rgb+point_cloud")
    assert Dinomaly.accepted_modalities({"inputs": "rgb"}) == ("image",)
    assert Dinomaly.accepted_modalities({"inputs": "rgb+depth"}) == ("rgb+point_cloud",)


def _run_args(out, *extra: str) -> list[str]:
    return [
        "run", "--detectors", "dinomaly", "--scope", "unified", "--batch-size", "4",
        "--num-workers", "0", "--no-tracking", "--output", str(out),
        "--param", "dinomaly.encoder=efficientnet_lite0", "--param", "dinomaly.iterations=4",
        "--param", "dinomaly.warmup=2", "--param", "dinomaly.decoder_depth=2",
        "--param", "dinomaly.variant=dinomaly2", "--param", "dinomaly.inputs=rgb+depth",
        *extra,
    ]  # fmt: skip


def test_plan_refuses_rgb_depth_on_images(tmp_path, ad_root, capsys):
    from bench.cli import main

    args = _run_args(tmp_path, "--datasets", "mvtec_ad", "--root", str(ad_root))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dinomaly takes rgb+point_cloud; mvtec_ad serves image" in err
    assert not list(tmp_path.glob("**/jobs/*.json"))


@pytest.mark.slow
def test_unified_rgb_depth_run_on_mvtec_3d_layout(tmp_path, ad3d_root):
    from bench.cli import main

    out = tmp_path / "out"
    args = _run_args(
        out, "--datasets", "mvtec_3d", "--root", str(ad3d_root), "--image-size", "64",
        "--name", "rgbd",
    )  # fmt: skip
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "rgbd" / "jobs").glob("*.json"))]
    assert [r["category"] for r in records] == ["dome", "puck"]
    assert {r["modality"] for r in records} == {"rgb+point_cloud"}
    assert len({r["fit_hash"] for r in records}) == 1
    assert len(list(out.glob("rgbd/state/*/fitted.pt"))) == 1
    for r in records:
        assert r["params"]["inputs"] == "rgb+depth" and r["params"]["narrow_lr"] is None
        assert "encoder substitute" in r["substitutes"][0]
        assert "vit_base_patch14_reg4_dinov2" in r["substitutes"][0]
        assert 0 <= r["metrics"]["all"]["pixel_auroc"] <= 1
