"""MVTec AD 2's threshold-dependent metrics: the segmentation threshold chosen from the
defect-free validation images, and SegF1 (with its precision and recall) at that threshold.

The threshold rule follows MVTec's own suggestion in its submission checker
(``MVTecAD2_public_code_utils/check_and_prepare_data_for_upload.py``: "segmentation_threshold =
np.mean(anomaly_scores_val) + 3 * np.std(anomaly_scores_val)"): the mean plus ``k`` population
standard deviations of every pixel score of every validation map (``"mean_std"``, k = 3), or,
as an alternative, the largest validation pixel score (``"max"``). A pixel is anomalous when its
score is strictly above the threshold. The statistics are streamed (count, mean, sum of squared
deviations, maximum), so no validation map is kept.

SegF1 is the pixel-level F1 pooled over every pixel of every test image (good images included):
2 TP / (2 TP + FP + FN). ClassF1 is our reading of the leaderboard's image-level F1 from the
binarised maps: an image is called anomalous when any of its pixels is above the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: how the segmentation threshold is chosen from the validation maps
THRESHOLD_RULES = ("mean_std", "max")


@dataclass
class ValidationStats:
    """Running statistics of every validation pixel score (float64): count, mean, the sum of
    squared deviations from the mean (Chan et al.'s pairwise update) and the maximum."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    max: float = -math.inf

    def update(self, scores: torch.Tensor) -> None:
        """Adds the pixel scores of one map (any shape, any device)."""
        x = scores.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.max = max(self.max, float(x.max()))

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's ``np.std`` default, ddof 0)."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    def threshold(self, rule: str = "mean_std", k: float = 3.0) -> float:
        """The segmentation threshold by ``rule`` (NaN when no validation map was seen)."""
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
        if self.count == 0:
            return math.nan
        return self.mean + k * self.std if rule == "mean_std" else self.max


def seg_metrics(
    maps: list[torch.Tensor], masks: list[torch.Tensor], threshold: float
) -> dict[str, float]:
    """SegF1, precision and recall of ``map > threshold`` against the masks, pooled over every
    pixel of every image. Precision is 0 when no pixel is called anomalous; F1 and recall are NaN
    when no ground-truth pixel is anomalous (undefined), as is everything for a NaN threshold."""
    nan = {"seg_f1": math.nan, "seg_precision": math.nan, "seg_recall": math.nan}
    if math.isnan(threshold):
        return nan
    tp = fp = fn = 0
    for amap, mask in zip(maps, masks):
        pred = amap > threshold
        gt = mask.to(pred.device, torch.bool)
        hit = int((pred & gt).sum())
        tp, fp, fn = tp + hit, fp + int(pred.sum()) - hit, fn + int(gt.sum()) - hit
    if tp + fn == 0:
        return {**nan, "seg_precision": tp / (tp + fp) if tp + fp else 0.0}
    return {
        "seg_f1": 2 * tp / (2 * tp + fp + fn),
        "seg_precision": tp / (tp + fp) if tp + fp else 0.0,
        "seg_recall": tp / (tp + fn),
    }


def class_f1(maps: list[torch.Tensor], labels: list[int], threshold: float) -> float:
    """Image-level F1 where an image is called anomalous when any pixel of its map is above
    ``threshold``; NaN without an anomalous image or for a NaN threshold."""
    if math.isnan(threshold) or not any(labels):
        return math.nan
    called = [bool((amap > threshold).any()) for amap in maps]
    tp = sum(c and y for c, y in zip(called, labels))
    fp = sum(c and not y for c, y in zip(called, labels))
    fn = sum(not c and y for c, y in zip(called, labels))
    return 2 * tp / (2 * tp + fp + fn)
