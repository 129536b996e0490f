"""Model selection for DictAS on a held-out part of its own training images.

The official code selects its checkpoint (and the epoch at which it freezes the value
generator) by pixel AP on the TARGET dataset's test images. Here a fixed share of the
auxiliary training images (chosen by a hash of category and file name, so the same on every
machine) is kept out of training; each gets a synthetic anomaly (fixed seed) and is looked up
against another held-out image of its category (k = 1), or, alone in its category, an
augmented copy of itself. The score is the pixel AP of each category, averaged, on unblurred
maps of every training layer (as the official validation).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from .synthesis import TextureFolder, augment_references, synthesize_anomalies

#: the validation anomalies and references are the same at every epoch
SEED = 20250601
CHUNK = 8


def holdout_hash(key: str) -> float:
    """A stable number in [0, 1) per image: below the held-out fraction means held out."""
    return zlib.crc32(key.encode()) / 2**32


class Validation:
    """Collects held-out images as training sees them (at most ``capacity``) and scores a model
    on them."""

    def __init__(self, fraction: float, capacity: int, textures: TextureFolder | None = None):
        self.fraction, self.capacity, self.textures = fraction, capacity, textures
        self.images: dict[str, torch.Tensor] = {}
        self.categories: dict[str, str] = {}
        self._pairs: tuple | None = None

    def split(self, images: torch.Tensor, keys: list[str], categories: list[str]) -> list[int]:
        """Indices of the batch to train on; held-out images are kept for validation."""
        keep = []
        for i, (key, category) in enumerate(zip(keys, categories)):
            if holdout_hash(key) >= self.fraction:
                keep.append(i)
            elif key not in self.images and len(self.images) < self.capacity:
                self.images[key] = images[i].detach().float().cpu().clone()
                self.categories[key] = category
                self._pairs = None
        return keep

    def ready(self) -> bool:
        return bool(self.images)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries with synthetic anomalies, their references, masks), fixed for a given set of
        held-out images."""
        if self._pairs is None:
            keys = sorted(self.images)
            clean = torch.stack([self.images[k] for k in keys])
            gen = torch.Generator().manual_seed(SEED)
            query, mask, _ = synthesize_anomalies(clean, gen, p=1.0, textures=self.textures)
            augmented = augment_references(clean, gen, p=1.0)
            refs = []
            for i, key in enumerate(keys):
                same = [j for j, k in enumerate(keys) if self.categories[k] == self.categories[key]]
                if len(same) > 1:  # the next held-out image of the category
                    refs.append(clean[same[(same.index(i) + 1) % len(same)]])
                else:
                    refs.append(augmented[i])
            self._pairs = (query, torch.stack(refs), mask[:, 0])
        return self._pairs

    def score(self, maps_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """Pixel AP of ``maps_of(queries, references)`` against the synthetic masks."""
        query, refs, masks = self.pairs()
        maps = torch.cat(
            [maps_of(q, r).float().cpu() for q, r in zip(query.split(CHUNK), refs.split(CHUNK))]
        )
        if maps.shape[-2:] != masks.shape[-2:]:
            maps = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear")[:, 0]
        labels = masks.flatten().numpy() > 0.5
        if not labels.any():
            return 0.0
        return float(average_precision_score(labels, maps.flatten().numpy()))

    def state_dict(self) -> dict:
        return {"images": self.images, "categories": self.categories}

    def load_state_dict(self, state: dict) -> None:
        self.images, self.categories, self._pairs = state["images"], state["categories"], None
