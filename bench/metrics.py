"""Exact, sort-based anomaly-detection metrics and the streaming evaluator.

All curves use every distinct score as a threshold (ties collapse to one point), as
scikit-learn and the official MVTec evaluation scripts do. AU-PRO follows the official MVTec AD /
MVTec 3D-AD definition: 8-connected ground-truth regions per image, false-positive rate over all
defect-free pixels of the category, PRO = mean over regions of the covered fraction, trapezoid
up to ``limit`` with the PRO value linearly interpolated there, divided by ``limit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bench.types import Batch, Prediction

METRIC_VERSION = "1.0"
PROTOCOLS = ("official", "fast")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Curve:
    """Cumulative counts at each distinct threshold, thresholds descending."""

    thresholds: torch.Tensor
    tps: torch.Tensor  # float64 cumulative positive weight
    fps: torch.Tensor  # float64 cumulative negative weight


def binary_curve(scores: torch.Tensor, target: torch.Tensor) -> Curve:
    scores = scores.reshape(-1)
    target = target.reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    pos = target[order].to(torch.float64)
    tps = torch.cumsum(pos, 0)
    fps = torch.cumsum(1.0 - pos, 0)
    last = _last_of_ties(sorted_scores)
    return Curve(sorted_scores[last], tps[last], fps[last])


def _last_of_ties(sorted_scores: torch.Tensor) -> torch.Tensor:
    """Index of the last element of every run of equal values in a sorted vector."""
    change = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).reshape(-1)
    end = torch.tensor([sorted_scores.numel() - 1], device=sorted_scores.device)
    return torch.cat([change, end])


def auroc_from_curve(c: Curve) -> float:
    if c.tps[-1] == 0 or c.fps[-1] == 0:
        return math.nan
    zero = torch.zeros(1, dtype=torch.float64, device=c.tps.device)
    tpr = torch.cat([zero, c.tps / c.tps[-1]])
    fpr = torch.cat([zero, c.fps / c.fps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def ap_from_curve(c: Curve) -> float:
    if c.tps[-1] == 0:
        return math.nan
    precision = c.tps / (c.tps + c.fps)
    recall = c.tps / c.tps[-1]
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype, device=recall.device))
    return float(torch.sum(steps * precision))


def f1max_from_curve(c: Curve) -> float:
    if c.tps[-1] == 0:
        return math.nan
    precision = c.tps / (c.tps + c.fps)
    recall = c.tps / c.tps[-1]
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), 0.0)
    return float(f1.max())


def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    return auroc_from_curve(binary_curve(scores, target))


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return ap_from_curve(binary_curve(scores, target))


def f1_max(scores: torch.Tensor, target: torch.Tensor) -> float:
    return f1max_from_curve(binary_curve(scores, target))


def trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Area under y(x) for x in [0, x_max]; y linearly interpolated at x_max (official rule)."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    correction = 0.0
    if not bool((x == x_max).any()):
        ins = int(torch.searchsorted(x, torch.tensor(x_max, dtype=x.dtype, device=x.device)))
        if 0 < ins < x.numel():
            x0, x1, y0, y1 = float(x[ins - 1]), float(x[ins]), float(y[ins - 1]), float(y[ins])
            y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction


def region_labels(masks: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Ids of the 8-connected regions of each mask, unique across the masks (0 = defect-free)."""
    out, offset = [], 0
    for m in masks:
        labels, count = ndimage.label(m.cpu().numpy().astype(bool), structure=_EIGHT_CONNECTED)
        labels = torch.from_numpy(labels.astype(np.int64))
        out.append(torch.where(labels > 0, labels + offset, 0))
        offset += count
    return torch.stack(out) if isinstance(masks, torch.Tensor) else out


def _region_sizes(regions: torch.Tensor) -> torch.Tensor:
    return torch.bincount(regions.reshape(-1)).to(torch.float64)


def _sorted_pixel_curves(scores: torch.Tensor, regions: torch.Tensor, sizes: torch.Tensor):
    """ROC and (FPR, PRO) curves from pixels sorted by descending score and their region ids
    (0 = defect-free), both at every distinct threshold.

    Returns (Curve, fpr, pro); fpr/pro start at (0,0) and are None when there is no region or
    no defect-free pixel.
    """
    last = _last_of_ties(scores)
    positive = regions > 0
    pos = positive.to(torch.float64)
    tps = torch.cumsum(pos, 0)[last]
    fps = torch.cumsum(1.0 - pos, 0)[last]
    curve = Curve(scores[last], tps, fps)
    counts = torch.bincount(regions, minlength=sizes.numel())[1:]
    n_regions = int((counts > 0).sum())
    if n_regions == 0 or fps[-1] == 0:
        return curve, None, None
    weight = torch.where(positive, 1.0 / (n_regions * sizes[regions]), 0.0)
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    fpr = torch.cat([zero, (fps / fps[-1]).clamp(0, 1)])
    pro = torch.cat([zero, torch.cumsum(weight, 0)[last].clamp(0, 1)])
    return curve, fpr, pro


def pro_curve(maps: torch.Tensor, masks: torch.Tensor):
    """(FPR, PRO) at every distinct threshold, from (0,0) to (1,1), for maps/masks [N,H,W]."""
    regions = region_labels(masks).reshape(-1).to(maps.device)
    order = torch.argsort(maps.reshape(-1), descending=True, stable=True)
    _, fpr, pro = _sorted_pixel_curves(
        maps.reshape(-1)[order], regions[order], _region_sizes(regions)
    )
    return fpr, pro


def au_pro(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``limit`` (official MVTec definition)."""
    fpr, pro = pro_curve(maps, masks)
    if fpr is None:
        return math.nan
    return trapezoid_to(fpr, pro, limit) / limit


class Evaluator:
    """Streaming evaluator: ``update(prediction, batch)`` per test batch, then ``compute()``.

    ``protocol="official"`` upsamples each map bilinearly to its ground truth's native size;
    ``"fast"`` compares both at ``fast_size`` (maps bilinear, masks nearest) and is labelled so.
    """

    def __init__(self, protocol: str = "official", pro_limit: float = 0.3, fast_size: int = 256):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol, self.pro_limit, self.fast_size = protocol, pro_limit, fast_size
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.defects: list[str] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.cropped = False

    def update(self, prediction: Prediction, batch: Batch) -> None:
        if len(prediction.score) != len(batch):
            raise ValueError(
                f"{len(prediction.score)} predictions for a batch of {len(batch)} samples"
            )
        scores = prediction.score.detach().float().cpu()
        maps = prediction.anomaly_map.detach().float().cpu()
        for i in range(len(batch)):
            where = batch.meta[i].get("path", f"sample {len(self.scores)}")
            if not torch.isfinite(scores[i]):
                raise ValueError(f"image score is {float(scores[i])} for {where}")
            if not torch.isfinite(maps[i]).all():
                raise ValueError(f"anomaly map has NaN or infinite values for {where}")
            y0, x0, y1, x1 = (int(v) for v in batch.roi[i])
            mask = batch.mask[i]
            self.cropped |= (y0, x0, y1, x1) != (0, 0, mask.shape[0], mask.shape[1])
            mask = mask[y0:y1, x0:x1].bool()
            amap = maps[i][None, None]
            if self.protocol == "official":
                size = tuple(mask.shape)
            else:
                size = (self.fast_size, self.fast_size)
                mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[
                    0, 0
                ].bool()
            if tuple(amap.shape[-2:]) != size:
                amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
            self.maps.append(amap[0, 0].contiguous())
            self.masks.append(mask)
            self.scores.append(float(scores[i]))
            self.labels.append(int(batch.label[i]))
            self.defects.append(str(batch.meta[i].get("defect", "unknown")))

    @property
    def protocol_label(self) -> str:
        return self.protocol + ("-cropped" if self.cropped else "")

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics for all test images (key "all") and per defect type (vs the good images).

        The pixels of the whole category are sorted once; a subset keeps its pixels in that order.
        """
        if not self.scores:
            raise ValueError("no predictions were given to the evaluator")
        regions = torch.cat([r.reshape(-1) for r in region_labels(self.masks)])
        sizes = _region_sizes(regions)
        image_of = torch.cat(
            [torch.full((m.numel(),), i, dtype=torch.int32) for i, m in enumerate(self.maps)]
        )
        scores, order = torch.sort(torch.cat([m.reshape(-1) for m in self.maps]), descending=True)
        pixels = (scores, regions[order], image_of[order])
        del regions, image_of, order
        out = {"all": self._metrics(list(range(len(self.scores))), pixels, sizes)}
        good = [i for i, y in enumerate(self.labels) if y == 0]
        for defect in sorted({d for d, y in zip(self.defects, self.labels) if y == 1}):
            bad = [i for i, d in enumerate(self.defects) if d == defect and self.labels[i] == 1]
            out[defect] = self._metrics(good + bad, pixels, sizes)
        return out

    def _metrics(self, idx: list[int], pixels, sizes) -> dict[str, float]:
        scores = torch.tensor([self.scores[i] for i in idx], dtype=torch.float64)
        labels = torch.tensor([self.labels[i] for i in idx])
        image = binary_curve(scores, labels)
        px_scores, px_regions, px_image = pixels
        if len(idx) < len(self.scores):
            keep = torch.zeros(len(self.scores), dtype=torch.bool)
            keep[idx] = True
            keep = keep[px_image.long()]
            px_scores, px_regions = px_scores[keep], px_regions[keep]
        pixel, fpr, pro = _sorted_pixel_curves(px_scores, px_regions, sizes)
        limit = self.pro_limit
        return {
            "image_auroc": auroc_from_curve(image),
            "image_ap": ap_from_curve(image),
            "image_f1max": f1max_from_curve(image),
            "pixel_auroc": auroc_from_curve(pixel),
            "pixel_ap": ap_from_curve(pixel),
            "pixel_f1max": f1max_from_curve(pixel),
            "au_pro": math.nan if fpr is None else trapezoid_to(fpr, pro, limit) / limit,
        }
