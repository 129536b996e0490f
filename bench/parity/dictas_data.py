"""Inputs of the DictAS parity check and the plumbing of both sides: seeded synthetic images
(two categories, k references, normal and defective test images with masks, one training
batch with given synthetic anomalies), the same images in the official loaders' item format
(CLIP-normalised, PNG files for its visualisation), our detector built through its public API,
and a recorder of each optimiser step's starting weights and gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.transforms.functional import normalize

from bench.adapters import dictas as dictas_module
from bench.adapters.dictas import DictAS
from bench.adapters.dictas.backbone import CLIP_MEAN, CLIP_STD
from bench.types import Batch, Prediction

from . import share_weights

SIZE, DEPTH, WIDTH, K = 112, 24, 64, 5  # K > 4: the official screw rule and chunked references
CATEGORIES = ("bottle", "screw")
TINTS = ((0.25, 0.3, 0.1), (0.1, 0.15, 0.3))
NORMAL, DEFECTIVE = 3, 3
COMMON = dict(backbone="ViT-L-14-336", weights="random", input_size=SIZE, backbone_depth=DEPTH,
              backbone_width=WIDTH)  # fmt: skip


@dataclass
class Category:
    name: str
    references: torch.Tensor  # [K,3,H,W] in [0, 1]
    images: torch.Tensor  # [N,3,H,W]: NORMAL normal, then DEFECTIVE defective
    masks: torch.Tensor  # [N,1,H,W]
    labels: torch.Tensor  # [N]

    def batch(self, images: torch.Tensor) -> Batch:
        meta = [{"category": self.name, "path": f"{self.name}/{i}.png"} for i in range(len(images))]
        return Batch(label=torch.zeros(len(images), dtype=torch.long), image=images, meta=meta)


@dataclass
class TrainingBatch:
    categories: list[str]
    clean: torch.Tensor  # what the loader gives our detector
    query: torch.Tensor  # with the given synthetic anomalies
    mask: torch.Tensor  # [B,1,H,W]
    label: torch.Tensor  # [B]
    reference: torch.Tensor  # each query's reference (in place of the augmented copy)

    def ours(self) -> Batch:
        meta = [{"category": c, "path": f"{c}/{i}.png"} for i, c in enumerate(self.categories)]
        return Batch(label=torch.zeros(len(meta), dtype=torch.long), image=self.clean, meta=meta)


def _images(gen: torch.Generator, n: int, tint) -> torch.Tensor:
    """Smooth random RGB images around a tint, on 8-bit levels."""
    coarse = torch.rand(n, 3, 6, 6, generator=gen) * 0.6 + torch.tensor(tint).view(1, 3, 1, 1)
    image = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    image = image + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return (image.clamp(0, 1) * 255).round() / 255


def _defects(gen: torch.Generator, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rectangle of stripes and noise on each image (the first one on the left border)."""
    out, masks = images.clone(), torch.zeros(len(images), 1, SIZE, SIZE)
    for i in range(len(images)):
        h, w = (int(v) for v in torch.randint(16, 40, (2,), generator=gen))
        y = int(torch.randint(0, SIZE - h, (1,), generator=gen))
        x = 0 if i == 0 else int(torch.randint(0, SIZE - w, (1,), generator=gen))
        stripes = (torch.arange(w) // 3 % 2).float().expand(3, h, w)
        out[i, :, y : y + h, x : x + w] = 0.7 * stripes + 0.3 * torch.rand(3, h, w, generator=gen)
        masks[i, :, y : y + h, x : x + w] = 1
    return (out.clamp(0, 1) * 255).round() / 255, masks


def categories(gen: torch.Generator) -> list[Category]:
    out = []
    for name, tint in zip(CATEGORIES, TINTS):
        references, normal = _images(gen, K, tint), _images(gen, NORMAL, tint)
        defective, masks = _defects(gen, _images(gen, DEFECTIVE, tint))
        labels = torch.tensor([0] * NORMAL + [1] * DEFECTIVE)
        masks = torch.cat([torch.zeros(NORMAL, 1, SIZE, SIZE), masks])
        out.append(Category(name, references, torch.cat([normal, defective]), masks, labels))
    return out


def training_batch(gen: torch.Generator) -> TrainingBatch:
    """Four images (two per category) and their references (other images). The first of each
    category has a synthetic anomaly: on the first, a patch copied from its reference (easily
    looked up, so the hinge is well above 0 and not a small difference), on the third stripes."""
    names = [c for c in CATEGORIES for _ in range(2)]
    clean = torch.cat([_images(gen, 2, t) for t in TINTS])
    reference = torch.cat([_images(gen, 2, t) for t in TINTS])
    query, mask = clean.clone(), torch.zeros(4, 1, SIZE, SIZE)
    query[2:3], mask[2:3] = _defects(gen, clean[2:3])
    y, x, h, w = 30, 40, 48, 44
    query[0, :, y : y + h, x : x + w] = reference[0, :, y : y + h, x : x + w]
    mask[0, :, y : y + h, x : x + w] = 1
    return TrainingBatch(names, clean, query, mask, torch.tensor([1, 0, 1, 0]), reference)


# -- our side --------------------------------------------------------------------------------
def detector(**params: Any) -> dict[str, Any]:
    """The parity detector's arguments: the shrunk CLIP with random weights, and ``params``."""
    return {**COMMON, **params}


def loaded(stage1: Path, clip: nn.Module, **params: Any) -> DictAS:
    """A detector with the trained generators (``load_state``) and the shared CLIP weights."""
    det = DictAS(**detector(**params))
    det.load_state(stage1)
    share_weights(clip, det.source.model)
    return det


def predict(det: DictAS, cat: Category) -> tuple[Prediction, torch.Tensor | None]:
    """``cat``'s references, then its test images as one batch: the prediction and the
    per-category scores (``test_scores``)."""
    det.fit_references([cat.batch(cat.references)])
    det.start_test()
    with torch.no_grad():
        prediction = det.predict(cat.batch(cat.images))
    return prediction, det.test_scores()


@contextlib.contextmanager
def given_synthesis(batch: TrainingBatch) -> Iterator[None]:
    """Our training step sees ``batch``'s queries, masks and references instead of random
    synthetic anomalies and augmentations (the official side is given the same)."""
    saved = dictas_module.synthesize_anomalies, dictas_module.augment_references
    dictas_module.synthesize_anomalies = lambda clean, gen, *a, **k: (
        batch.query.clone(),
        batch.mask.clone(),
        batch.label.clone(),
    )
    dictas_module.augment_references = lambda clean, gen, *a, **k: batch.reference.clone()
    try:
        yield
    finally:
        dictas_module.synthesize_anomalies, dictas_module.augment_references = saved


@contextlib.contextmanager
def step_recorder() -> Iterator[list[tuple[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]]]]:
    """Each optimiser step: the optimiser, and its parameters before it with their gradients,
    by ``id``."""
    steps: list = []

    def hook(optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        steps.append((optimizer, {id(p): (p.detach().clone(), p.grad.detach().clone())
                                  for p in params if p.grad is not None}))  # fmt: skip

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


# -- the official side's items ---------------------------------------------------------------
def clip_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] normalised as the official loaders do (CLIP's mean and std)."""
    return normalize(images, CLIP_MEAN, CLIP_STD)


def official_test_items(data: list[Category], folder: Path) -> list[dict[str, Any]]:
    """``test.py``'s items: one test image each, the category's references stacked; the
    images saved as PNG under ``folder`` (its visualisation reads them)."""
    items = []
    for cat in data:
        for i, (image, mask, label) in enumerate(zip(cat.images, cat.masks, cat.labels)):
            path = folder / cat.name / ("good" if label == 0 else "defect") / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(path)
            items.append(dict(img_ano=clip_input(image), img_good=clip_input(cat.references),
                              img_ano_mask=mask, cls_name=cat.name, anomaly=int(label),
                              img_ano_path=str(path)))  # fmt: skip
    return items


def official_training_batch(batch: TrainingBatch) -> dict[str, Any]:
    """``train.py``'s batch (as its DataLoader yields it)."""
    return dict(img_ano=clip_input(batch.query), img_good=clip_input(batch.reference),
                img_ano_mask=batch.mask.clone(), img_good_mask=torch.zeros_like(batch.mask),
                cls_name=list(batch.categories), anomaly=batch.label.clone())  # fmt: skip


def official_val_item(batch: TrainingBatch) -> dict[str, Any]:
    """One validation item (``evaluate_epoch`` runs after the epoch; its AP is not compared)."""
    return dict(img_ano=clip_input(batch.query[:1]), img_good=clip_input(batch.reference[None, :1]),
                img_ano_mask=batch.mask[:1].clone(), cls_name=[batch.categories[0]],
                anomaly=batch.label[:1].clone())  # fmt: skip
