"""What knn's two parity comparisons share (:mod:`bench.parity.knn_parity` with the official
PatchCore, :mod:`bench.parity.knn_anomalib` with anomalib's): the setting, the images, one
wide_resnet50_2 with random weights, our detector on it, the official sampler's start points
and the explanation of float32 distance rounding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.adapters.knn import KNNPatchDistance
from bench.parity import share_weights
from bench.types import Batch

SIZE, N_TRAIN, N_TEST, RATIO, STARTS, SEED = 128, 6, 3, 0.1, 10, 0
LAYERS = ["layer2", "layer3"]
SIGMA = 4  # PatchCore's smoothing (the official RescaleSegmentor, anomalib's default)


def textures(n: int, seed: int, defect: bool = False) -> torch.Tensor:
    """[n, 3, SIZE, SIZE] smooth random textures in [0, 1]; with ``defect`` a bright square
    touching the left border of the first image (where border handling matters)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    x = F.interpolate(coarse, size=SIZE, mode="bicubic", align_corners=False)
    x = (x + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    if defect:
        x[0, :, 40:60, :14] = 1.0
    return x


def random_backbone() -> torch.nn.Module:
    """torchvision's wide_resnet50_2, random weights, batch norms with random statistics."""
    from torchvision.models import wide_resnet50_2

    torch.manual_seed(SEED)
    model = wide_resnet50_2(weights=None)
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def our_knn(reference: torch.nn.Module, **params) -> KNNPatchDistance:
    """knn in the parity setting, with ``reference``'s weights."""
    det = KNNPatchDistance(
        backbone="wide_resnet50_2",
        weights="random",
        layers=(2, 3),
        coreset_ratio=RATIO,
        coreset_starts=STARTS,
        sigma=SIGMA,
        discover_types=False,
        seed=SEED,
        **params,
    )
    share_weights(reference, det.extractor)
    return det


def as_batch(images: torch.Tensor) -> Batch:
    """Unlabelled test images as a batch."""
    return Batch(label=torch.zeros(len(images), dtype=torch.long), image=images)


def official_starts(n: int) -> np.ndarray:
    """The official sampler's start points: ``np.random.choice`` right after seeding NumPy."""
    np.random.seed(SEED)
    return np.random.choice(n, STARTS, replace=False)


def our_coreset(ours: KNNPatchDistance, bank: torch.Tensor) -> torch.Tensor:
    """Our coreset picks from the official sampler's start points."""
    return ours.coreset(bank, int(RATIO * len(bank)), torch.from_numpy(official_starts(len(bank))))


def rel_error(values, exact: np.ndarray) -> float:
    """Largest difference from ``exact`` relative to its largest magnitude."""
    return float(np.abs(np.asarray(values, dtype=np.float64) - exact).max() / np.abs(exact).max())


def rounding_note(name: str, where: str, theirs, ours, exact: np.ndarray) -> str:
    """The explanation of a float32 distance difference, with both sides' errors."""
    theirs_off, ours_off = rel_error(theirs, exact), rel_error(ours, exact)
    return (
        f"{name} computes |q|^2 + |b|^2 - 2 q.b in float32 ({where}): {theirs_off:.1e} "
        f"of the largest score off the float64 distance to the same entries, ours (from q - b "
        f"on the entry found, adapters/knn/neighbours.py) {ours_off:.1e}"
    )
