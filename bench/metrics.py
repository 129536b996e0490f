"""Exact, sort-based anomaly-detection metrics.

All curves use every distinct score as a threshold (ties collapse to one point), as
scikit-learn and the official MVTec evaluation scripts do. AU-PRO follows the official MVTec AD /
MVTec 3D-AD definition: 8-connected ground-truth regions per image, false-positive rate over all
defect-free pixels of the category, PRO = mean over regions of the covered fraction, the curve
from (0,0), trapezoid up to ``limit`` with the PRO value linearly interpolated there, divided by
``limit``.

Pixel metrics come from one sort of all pixels and one streaming pass over the sorted order in
chunks (:func:`integrate_sorted`), which integrates the ROC, precision-recall and PRO curves of
several image subsets at once without materialising the curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

METRIC_VERSION = "1.0"
PROTOCOLS = ("official", "fast")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "au_pro")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CHUNK = 1 << 22


# -- image-level (small inputs) -------------------------------------------------------------------
@dataclass
class Curve:
    """Cumulative counts at each distinct threshold, thresholds descending."""

    thresholds: torch.Tensor
    tps: torch.Tensor  # float64 cumulative positives
    fps: torch.Tensor  # float64 cumulative negatives


def _last_of_ties(sorted_scores: torch.Tensor) -> torch.Tensor:
    """Index of the last element of every run of equal values in a sorted vector."""
    change = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).reshape(-1)
    end = torch.tensor([sorted_scores.numel() - 1], device=sorted_scores.device)
    return torch.cat([change, end])


def binary_curve(scores: torch.Tensor, target: torch.Tensor) -> Curve:
    scores, target = scores.reshape(-1), target.reshape(-1)
    sorted_scores, order = torch.sort(scores, descending=True)
    pos = target[order].to(torch.float64)
    last = _last_of_ties(sorted_scores)
    return Curve(sorted_scores[last], torch.cumsum(pos, 0)[last], torch.cumsum(1.0 - pos, 0)[last])


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
    return float(
        torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), 0.0).max()
    )


def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    return auroc_from_curve(binary_curve(scores, target))


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return ap_from_curve(binary_curve(scores, target))


def f1_max(scores: torch.Tensor, target: torch.Tensor) -> float:
    return f1max_from_curve(binary_curve(scores, target))


def image_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    c = binary_curve(scores.to(torch.float64), labels)
    return {
        "image_auroc": auroc_from_curve(c),
        "image_ap": ap_from_curve(c),
        "image_f1max": f1max_from_curve(c),
    }


def trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Area under y(x) for x in [0, x_max]; y linearly interpolated at x_max (official rule)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    correction = 0.0
    if not bool((x == x_max).any()):
        ins = int(torch.searchsorted(x, torch.tensor(x_max, dtype=x.dtype, device=x.device)))
        if 0 < ins < x.numel():
            x0, x1, y0, y1 = float(x[ins - 1]), float(x[ins]), float(y[ins - 1]), float(y[ins])
            correction = 0.5 * (y0 + y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction


# -- regions ----------------------------------------------------------------------------------------
def label_regions(mask: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 labels, 1..count; count)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    labels, count = ndimage.label(m.astype(bool), structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


def region_labels(masks) -> torch.Tensor:
    """Region ids of [N,H,W] masks, unique across images (0 = defect-free), int32."""
    out, offset = [], 0
    for m in masks:
        labels, count = label_regions(m)
        out.append(torch.from_numpy(np.where(labels > 0, labels + offset, 0).astype(np.int32)))
        offset += count
    return torch.stack(out)


# -- streaming pixel metrics -----------------------------------------------------------------------
def _prepend(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor([value], dtype=x.dtype, device=x.device), x])


@dataclass
class _Running:
    """Integrals of one image subset's pixel curves, fed chunk by chunk in descending order."""

    positives: float
    negatives: float
    regions: int
    limit: float
    tp: float = 0.0  # counts so far
    fp: float = 0.0
    pro: float = 0.0  # PRO so far
    auroc: float = 0.0
    ap: float = 0.0
    f1: float = 0.0
    pro_area: float = 0.0
    pro_done: bool = False

    def add(self, tp: torch.Tensor, fp: torch.Tensor, pro_sum: torch.Tensor) -> None:
        """The next threshold points: cumulative counts from the top score, and the cumulative
        sum of 1/|region| over the region pixels (float64)."""
        if tp.numel() == 0:
            return
        pro = (pro_sum / max(self.regions, 1)).clamp(0, 1)
        if self.positives > 0:
            recall = tp / self.positives
            prev_recall = _prepend(self.tp / self.positives, recall[:-1])
            precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 0.0)
            self.ap += float(torch.sum((recall - prev_recall) * precision))
            self.f1 = max(self.f1, float((2 * tp / (tp + fp + self.positives)).max()))
        if self.positives > 0 and self.negatives > 0:
            x = _prepend(self.fp / self.negatives, fp / self.negatives)
            y = _prepend(self.tp / self.positives, tp / self.positives)
            self.auroc += float(torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])))
        if self.regions > 0 and self.negatives > 0 and not self.pro_done:
            x = _prepend(self.fp / self.negatives, (fp / self.negatives).clamp(0, 1))
            y = _prepend(self.pro, pro)
            inside = x[1:] <= self.limit
            self.pro_area += float(torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]) * inside))
            beyond = torch.nonzero(~inside).reshape(-1)
            if beyond.numel():  # the segment that crosses the limit: interpolate PRO there
                k = int(beyond[0])
                x0, x1, y0, y1 = float(x[k]), float(x[k + 1]), float(y[k]), float(y[k + 1])
                y_lim = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
                self.pro_area += 0.5 * (y0 + y_lim) * (self.limit - x0)
                self.pro_done = True
        self.tp, self.fp, self.pro = float(tp[-1]), float(fp[-1]), float(pro[-1])

    def result(self) -> dict[str, float]:
        has_pos, has_neg = self.positives > 0, self.negatives > 0
        return {
            "pixel_auroc": self.auroc if has_pos and has_neg else math.nan,
            "pixel_ap": self.ap if has_pos else math.nan,
            "pixel_f1max": self.f1 if has_pos else math.nan,
            "au_pro": self.pro_area / self.limit if self.regions > 0 and has_neg else math.nan,
        }


def integrate_sorted(
    scores: torch.Tensor,
    regions: torch.Tensor,
    image: torch.Tensor | None,
    subsets: dict[str, torch.Tensor],
    image_positives: torch.Tensor,
    image_pixels: torch.Tensor,
    region_sizes: torch.Tensor,
    region_image: torch.Tensor,
    limit: float = 0.3,
    chunk: int = CHUNK,
) -> dict[str, dict[str, float]]:
    """Pixel metrics of several image subsets from one descending sort of all pixels.

    ``scores`` [P] sorted descending, ``regions`` [P] their region ids (0 = defect-free),
    ``image`` [P] their image index (None when every subset is all images); ``subsets`` maps a
    name to a bool selection [n_images]; ``image_positives``/``image_pixels`` [n_images] count
    defective/all pixels per image; ``region_sizes`` [R+1] and ``region_image`` [R+1] give each
    region id's size and image. Threshold points are taken at every distinct score of the whole
    set: a subset's repeated points add no area, so each subset gets its exact curve. Work
    memory is O(chunk) on top of the inputs.
    """
    device = scores.device
    inv_size = torch.where(region_sizes > 0, 1.0 / region_sizes.clamp_min(1), 0.0).to(
        device, torch.float64
    )
    running = {}
    for name, sel in subsets.items():
        sel_cpu = sel.cpu()
        in_regions = sel_cpu[region_image.cpu().long()]
        in_regions[0] = False
        pos = float(image_positives.cpu()[sel_cpu].sum())
        running[name] = _Running(
            pos, float(image_pixels.cpu()[sel_cpu].sum()) - pos, int(in_regions.sum()), limit
        )
    subsets = {name: sel.to(device) for name, sel in subsets.items()}
    # totals of every pixel before the current chunk: a tie run may span chunks
    base = {name: torch.zeros(3, dtype=torch.float64, device=device) for name in subsets}
    n = scores.numel()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        s = scores[start:end]
        tail = (
            torch.ones(1, dtype=torch.bool, device=device)
            if end == n
            else scores[end - 1 : end] != scores[end : end + 1]
        )
        last = torch.nonzero(torch.cat([s[1:] != s[:-1], tail])).reshape(-1)
        r = regions[start:end].long()
        img = None if image is None else image[start:end].long()
        for name, sel in subsets.items():
            pos, neg = r > 0, r == 0
            if img is not None and not bool(sel.all()):
                keep = sel[img]
                pos, neg = pos & keep, neg & keep
            sums = (
                torch.stack(
                    [
                        pos.to(torch.float64),
                        neg.to(torch.float64),
                        torch.where(pos, inv_size[r], 0.0),
                    ]
                ).cumsum(1)
                + base[name][:, None]
            )
            running[name].add(sums[0, last], sums[1, last], sums[2, last])
            base[name] = sums[:, -1]
    return {name: run.result() for name, run in running.items()}


def pixel_metrics(
    maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3, chunk: int = CHUNK
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AU-PRO of maps/masks [N,H,W] of the same size."""
    device = maps.device
    regions = region_labels(masks).to(device)
    sizes = torch.bincount(regions.reshape(-1)).to(torch.float64)
    region_image = torch.zeros(sizes.numel(), dtype=torch.int32)
    scores, order = torch.sort(maps.reshape(-1).to(torch.float32), descending=True)
    subsets = {"all": torch.ones(maps.shape[0], dtype=torch.bool)}
    positives = masks.reshape(masks.shape[0], -1).sum(1).to(torch.float64)
    pixels = torch.full((maps.shape[0],), float(masks[0].numel()), dtype=torch.float64)
    out = integrate_sorted(
        scores,
        regions.reshape(-1)[order],
        None,
        subsets,
        positives,
        pixels,
        sizes,
        region_image,
        limit,
        chunk,
    )
    return out["all"]


def au_pro(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``limit`` (official MVTec definition)."""
    return pixel_metrics(maps, masks, limit)["au_pro"]
