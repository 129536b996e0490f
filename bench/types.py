"""Plain data types that flow between the stages: batches in, predictions out."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

#: "point_cloud" is an organised grid (MVTec 3D-AD); "points" an unorganised cloud (Real3D-AD)
MODALITIES = ("image", "point_cloud", "rgb+point_cloud", "points")
_MODEL_INPUTS = ("image", "xyz", "valid", "rgb")


@dataclass
class Batch:
    """A batch of samples. 2D: ``image``; 3D: ``xyz`` + ``valid`` (+ ``rgb``); unorganised
    clouds: ``points`` and ``point_labels``, lists of [N_i,3] and [N_i] (sizes differ per cloud).

    ``mask`` stays at the ground truth's native size [B,H0,W0] (None in training batches, which
    are defect-free and may mix native sizes); ``roi`` [B,4] is the box
    (y0, x0, y1, x1) of the native frame that the model input covers (the whole frame unless
    the input was cropped). Both are None for unorganised clouds.
    """

    label: torch.Tensor
    #: a list of [H0_i,W0_i] masks when the native sizes in the batch differ
    mask: torch.Tensor | list[torch.Tensor] | None = None
    roi: torch.Tensor | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)
    image: torch.Tensor | None = None
    xyz: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    rgb: torch.Tensor | None = None
    points: list[torch.Tensor] | None = None
    point_labels: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Moves model inputs to ``device``; labels, masks and meta stay on the host."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _MODEL_INPUTS and value is not None:
                value = value.to(device, non_blocking=non_blocking)
            elif f.name == "points" and value is not None:
                value = [v.to(device, non_blocking=non_blocking) for v in value]
            moved[f.name] = value
        return Batch(**moved)


@dataclass
class Prediction:
    """Detector output: image scores [B] and anomaly maps [B,h,w] at any size, or for
    unorganised clouds ``point_scores``, one [N_i] tensor per cloud of the batch."""

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    point_scores: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.score.ndim != 1:
            raise ValueError(f"Prediction.score must be [B], got shape {tuple(self.score.shape)}")
        if (self.anomaly_map is None) == (self.point_scores is None):
            raise ValueError("Prediction needs exactly one of anomaly_map and point_scores")
        if self.point_scores is not None:
            if len(self.point_scores) != self.score.shape[0]:
                raise ValueError(
                    f"Prediction has {self.score.shape[0]} scores but "
                    f"{len(self.point_scores)} point-score tensors"
                )
            return
        if self.anomaly_map.ndim != 3:
            raise ValueError(
                f"Prediction.anomaly_map must be [B,h,w], got shape {tuple(self.anomaly_map.shape)}"
            )
        if self.anomaly_map.shape[0] != self.score.shape[0]:
            raise ValueError(
                f"Prediction has {self.score.shape[0]} scores but {self.anomaly_map.shape[0]} maps"
            )


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Stacks per-sample dicts (as returned by the dataset classes) into a :class:`Batch`."""
    out: dict[str, Any] = {"meta": [s["meta"] for s in samples]}
    for key in ("points", "point_labels"):
        if key in samples[0]:
            out[key] = [s[key] for s in samples]
    for key in ("label", "mask", "roi", "image", "xyz", "valid", "rgb"):
        if key not in samples[0]:
            continue
        values = [s[key] for s in samples]
        if key in ("mask", "image", "xyz") and len({tuple(v.shape) for v in values}) > 1:
            if key == "mask" and "image" in samples[0]:  # inputs resized alike, masks native
                out[key] = values
                continue
            raise ValueError(_mixed_sizes(key, values, samples))
        out[key] = torch.stack(values)
    return Batch(**out)


def collate_training(samples: list[dict[str, Any]]) -> Batch:
    """:func:`collate` for training batches: their ground truth (defect-free, empty) is left
    out, so a unified fit can batch categories whose native sizes differ (VisA, MVTec 3D-AD)."""
    return collate([{k: v for k, v in s.items() if k != "mask"} for s in samples])


def _mixed_sizes(key: str, values: list[torch.Tensor], samples: list[dict[str, Any]]) -> str:
    """Names the files whose size differs from the batch's most common size."""
    shapes = [tuple(v.shape[-2:]) for v in values]
    common = max(set(shapes), key=shapes.count)
    odd = [
        f"{s['meta'].get('path')} ({shape[0]}x{shape[1]})"
        for s, shape in zip(samples, shapes)
        if shape != common
    ]
    what = "ground-truth masks" if key == "mask" else "inputs"
    return (
        f"{what} of one batch differ in size: most are {common[0]}x{common[1]}, but "
        f"{', '.join(odd)}. Use batch_size=1 for categories with mixed image sizes."
    )
