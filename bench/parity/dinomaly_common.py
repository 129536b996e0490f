"""What the Dinomaly and Dinomaly2 parity checks share: the official modules imported from a
checkout, one small random DINOv2 ViT-S/14 with 4 registers built by the official code and
loaded into ours from a file in Meta's layout (our real loading path), and our detector with
the official trainable modules' weights copied in. The comparisons themselves are in
:mod:`bench.parity.dinomaly_checks`.

The official side runs its own modules and functions: Meta's DINOv2 code of the checkout, its
``models/uad.py`` model, ``global_cosine_hm_percent``, ``StableAdamW``, the schedulers of its
``utils.py`` and ``evaluation_batch`` (maps and image scores are read from its Gaussian filter
and from the ``roc_auc_score`` it calls). The training iteration of the official scripts
(model, loss, ``zero_grad``, ``backward``, ``clip_grad_norm`` at 0.1, ``step``, scheduler step)
is driven here on those modules, since the scripts' ``train`` loads hub weights and data.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.adapters.dinomaly import Dinomaly
from bench.types import Batch

from . import Check, compare, official_modules, share_weights

#: top-level names of the Dinomaly checkouts (forgotten before and after, see official_modules)
OFFICIAL_NAMES = (
    "models",
    "utils",
    "dinov1",
    "dinov2",
    "dinov3",
    "beit",
    "tips",
    "optimizers",
    "dataset",
    "adeval",
    "prepare_data",
    "flops_profiler",
)
ENCODER = "vit_small_patch14_reg4_dinov2"
LAYERS = list(range(2, 10))  # the official target_layers of ViT-S and ViT-B
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]  # fuse_layer_encoder / fuse_layer_decoder (lc = 2)
SIZE, BATCH, MAP_SIZE = 112, 4, 256
#: the training comparison: iterations, warm-up, hard-mining ramp (the scripts' 1000, shortened)
STEPS, WARMUP, RAMP = 4, 2, 4
DTYPES = (torch.float32, torch.float64)
FLOAT64_NOTE = (
    "float64 rows are near 1e-8 rather than 1e-15: our encoder reads Meta's float32 checkpoint "
    "through timm, which folds the class token's position embedding into the token in float32 "
    "(row 'float64: class token + its position embedding'), and every later stage carries that"
)


@dataclass
class Official:
    """The official modules of one checkout."""

    vit: ModuleType  # dinov2.models.vision_transformer
    uad: ModuleType  # models.uad
    blocks: ModuleType  # models.vision_transformer
    utils: ModuleType
    optim: ModuleType  # optimizers
    dataset: ModuleType


@contextlib.contextmanager
def official_dinomaly(path: str) -> Iterator[Official]:
    with official_modules(path, OFFICIAL_NAMES):
        imp = importlib.import_module
        yield Official(
            imp("dinov2.models.vision_transformer"),
            imp("models.uad"),
            imp("models.vision_transformer"),
            imp("utils"),
            imp("optimizers"),
            imp("dataset"),
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random values of a useful scale in every parameter (the official initialisations leave
    LayerScale at 1e-8 and LayerNorms at 1 / 0, which would hide a swapped or missing tensor):
    weights N(0, 1 / fan-in), norm weights 1 + N(0, 0.1^2), LayerScale 0.5 + N(0, 0.1^2),
    biases N(0, 0.05^2), tokens and position embeddings N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                value = 1 + 0.1 * noise
            elif leaf == "gamma":
                value = 0.5 + 0.1 * noise
            elif p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
                value = noise / math.sqrt(p[0].numel())
            elif leaf == "bias":
                value = 0.05 * noise
            else:
                value = 0.5 * noise
            p.copy_(value)
    return module


def official_encoder(off: Official, path: Path) -> nn.Module:
    """DINOv2 ViT-S/14 with 4 registers as the official ``vit_encoder.load`` builds it (without
    its hub weights), randomised, saved to ``path`` in Meta's checkpoint layout."""
    vit = off.vit.vit_small(
        patch_size=14,
        img_size=518,
        block_chunks=0,
        init_values=1e-8,
        num_register_tokens=4,
        interpolate_antialias=False,
        interpolate_offset=0.1,
    )
    randomise(vit, seed=1).eval()
    torch.save(vit.state_dict(), path)
    return vit


def our_name(key: str, bottleneck: dict[str, str]) -> str | None:
    """Our ``Reconstructor`` parameter for an official model's key (None: the encoder)."""
    if key.startswith("encoder."):
        return None
    for theirs, ours in bottleneck.items():
        if key.startswith(theirs + "."):
            return ours + key[len(theirs) :]
    match = re.fullmatch(r"decoder\.(\d+)\.(?:mlp\.)?(.+)", key)
    if match is None:
        raise KeyError(f"no counterpart of the official {key}")
    return f"blocks.{match[1]}.{match[2]}"


class SharedDinomaly(Dinomaly):
    """Our detector whose trainable modules take the official model's weights when built, in
    ``dtype``; the RNG is seeded before each training step as the official side is, so both
    draw the same dropout masks."""

    source: nn.Module
    bottleneck_names: dict[str, str]
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def build(self, example: Batch) -> None:
        super().build(example)
        self.frozen_encoder.to(self.dtype)
        self.decoder_.to(self.dtype)
        share_weights(self.source, self.decoder_, lambda k: our_name(k, self.bottleneck_names))
        torch.manual_seed(self.seed)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        torch.manual_seed(self.seed + step + 1)


def shared_detector(
    model: nn.Module,
    bottleneck: dict[str, str],
    dtype: torch.dtype,
    weights: Path,
    seed: int = 0,
    built: bool = True,
    **params,
) -> SharedDinomaly:
    """Ours with ``model``'s trainable weights (ViT-S from ``weights``, maps at 256 px, the
    shortened schedule of :data:`STEPS`, :data:`WARMUP` and :data:`RAMP` unless given);
    ``built=False`` leaves the building to ``fit``."""
    params = dict(dict(iterations=STEPS, warmup=WARMUP, hard_mining_ramp=RAMP), **params)
    det = SharedDinomaly(
        encoder=ENCODER,
        weights=str(weights),
        map_size=MAP_SIZE,
        amp="off",
        checkpoint_every=10**6,
        **params,
    )
    det.source, det.bottleneck_names, det.dtype, det.seed = model, bottleneck, dtype, seed
    if built:
        det.build(Batch(label=torch.zeros(1)))
    return det


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Smooth random RGB textures in [0, 1], [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def official_normalize(off: Official) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ImageNet normalisation of the official ``get_data_transforms``."""
    return off.dataset.get_data_transforms(SIZE, SIZE)[0].transforms[-1]


def worst(quantity: str, pairs: Sequence[tuple[Any, Any]], **kw) -> Check:
    """The pair with the largest relative difference stands for all of them."""
    checks = [compare(quantity, a, b, **kw) for a, b in pairs]
    return max(checks, key=lambda c: c.max_rel)


def lr_sequence(optimizer, scheduler, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out
