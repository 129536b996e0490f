"""MVTec AD 2's evaluation: AU-PRO to FPR 0.05 (and 0.3), SegF1 at a threshold chosen from the
defect-free validation images, and the private test sets exported for MVTec's server.

The AD 2 loader's test split holds three kinds of items, told apart by ``meta["role"]``:

- ``validation`` (validation/good): their maps only choose the segmentation threshold; only
  running statistics are kept (count, mean, sum of squared deviations, maximum: 4 numbers), no
  map. With ``export_dir`` each is written as ``<export_dir>/<category>/validation/good/<id>.tiff``
  (float32, native frame, like the test maps), so that ``bench evaluate`` can choose the
  threshold again;
- ``test_public``: scored like MVTec AD by :class:`bench.evaluation.Evaluator`, plus
  ``au_pro_05``, ``seg_f1``, ``seg_precision``, ``seg_recall``, ``class_f1`` and
  ``seg_threshold``;
- ``test_private`` / ``test_private_mixed`` (ground truth not public): only exported, in the
  layout and formats of MVTec's submission checker, under ``<export_dir>/submission/``:
  ``anomaly_images/<object>/<set>/<id>.tiff`` (float16, single channel, the image's native
  size) and ``anomaly_images_thresholded/<object>/<set>/<id>.png`` (8-bit, 0 or 255), the latter
  binarised in :meth:`AD2Evaluator.compute` from the written float16 map (exactly the map the
  server scores) once the threshold is known. Those sets are scored by MVTec's server only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from bench.errors import ConfigError
from bench.evaluation import Evaluator, _resize, native_frame
from bench.metrics import CHUNK
from bench.metrics.segf1 import THRESHOLD_RULES, ValidationStats, class_f1, seg_metrics
from bench.types import Batch, Prediction

#: the test-split roles of the AD 2 loader (``meta["role"]``)
ROLES = ("validation", "test_public", "test_private", "test_private_mixed")
PRIVATE_SETS = ("test_private", "test_private_mixed")
#: the submission's folder below the evaluator's export folder
SUBMISSION = "submission"
MAPS, THRESHOLDED = "anomaly_images", "anomaly_images_thresholded"
#: the validation maps' folder below a category's export folder (and their key in crop.json)
VALIDATION = "validation/good"


def validation_path(export_dir: str | Path, meta: dict) -> Path:
    """``<export_dir>/<category>/validation/good/<id>.tiff``: a validation image's exported map."""
    return Path(export_dir) / meta["category"] / VALIDATION / f"{Path(meta['path']).stem}.tiff"


def submission_path(export_dir: str | Path, meta: dict, thresholded: bool = False) -> Path:
    """``<export_dir>/submission/anomaly_images[_thresholded]/<object>/<set>/<id>.tiff|png``,
    the image's own name (MVTec's ``get_relative_anomaly_image_out_path``)."""
    kind, suffix = (THRESHOLDED, ".png") if thresholded else (MAPS, ".tiff")
    name = Path(meta["path"]).stem + suffix
    return Path(export_dir) / SUBMISSION / kind / meta["category"] / meta["role"] / name


class AD2Evaluator(Evaluator):
    """Routes each item by ``meta["role"]`` (items without one count as ``test_public``): see
    the module's docstring. ``threshold_rule``: "mean_std" (mean + ``threshold_k`` standard
    deviations of every validation pixel score, MVTec's suggested baseline) or "max" (the
    largest validation pixel score); a pixel above the threshold is anomalous."""

    more_pro_limits = {"au_pro_05": 0.05}

    def __init__(
        self,
        protocol: str = "official",
        pro_limit: float = 0.3,
        fast_size: int = 256,
        export_dir: str | Path | None = None,
        chunk: int = CHUNK,
        threshold_rule: str = "mean_std",
        threshold_k: float = 3.0,
    ) -> None:
        super().__init__(protocol, pro_limit, fast_size, export_dir, chunk)
        if threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(
                f"threshold_rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}"
            )
        self.threshold_rule, self.threshold_k = threshold_rule, float(threshold_k)
        self.validation = ValidationStats()
        self.n_validation = 0
        #: every item's role in the order given (``replace_scores`` picks the public ones)
        self.roles: list[str] = []
        #: the float16 maps written for the server
        self.private_maps: list[Path] = []

    @property
    def protocol_label(self) -> str:
        return f"{self.protocol}-ad2" + ("-cropped" if self.cropped else "")

    @property
    def threshold(self) -> float:
        """The segmentation threshold from the validation maps seen so far (NaN: none)."""
        return self.validation.threshold(self.threshold_rule, self.threshold_k)

    def update(self, prediction: Prediction, batch: Batch) -> None:
        if len(prediction.score) != len(batch):
            raise ValueError(
                f"{len(prediction.score)} predictions for a batch of {len(batch)} samples"
            )
        roles = [str(meta.get("role", "test_public")) for meta in batch.meta]
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown MVTec AD 2 role(s) {unknown} in meta; known: {ROLES}")
        public = [i for i, role in enumerate(roles) if role == "test_public"]
        if len(public) == len(roles):
            super().update(prediction, batch)
        elif public:
            super().update(*_subset(prediction, batch, public))
        maps = prediction.anomaly_map.detach()
        for i, role in enumerate(roles):
            if role == "validation":
                self._validation(maps[i], batch, i)
            elif role in PRIVATE_SETS:
                self._export_private(maps[i], batch, i)
        self.roles += roles

    def _checked_map(self, amap: torch.Tensor, batch: Batch, i: int) -> torch.Tensor:
        """The map at the scored resolution of the input's region (native, or ``fast_size``)."""
        amap = amap.float()
        if not torch.isfinite(amap).all():
            raise ValueError(f"anomaly map has NaN or infinite values for {batch.meta[i]['path']}")
        y0, x0, y1, x1 = (int(v) for v in batch.roi[i])
        size = (self.fast_size,) * 2 if self.protocol == "fast" else (y1 - y0, x1 - x0)
        return _resize(amap, size)

    def _validation(self, amap: torch.Tensor, batch: Batch, i: int) -> None:
        scored = self._checked_map(amap, batch, i)
        self.validation.update(scored)
        if self.export_dir is not None:
            self._export_validation(amap if self.protocol == "fast" else scored, batch, i)
        self.n_validation += 1
        self.categories.add(str(batch.meta[i].get("category", "unknown category")))

    def _export_validation(self, amap: torch.Tensor, batch: Batch, i: int) -> None:
        """Writes a validation map at native size in the native frame (``validation_path``);
        its crop goes to ``crop.json`` under the key ``validation/good/<id>``."""
        meta, roi = batch.meta[i], tuple(int(v) for v in batch.roi[i])
        shape = tuple(int(n) for n in batch.mask[i].shape)
        native = _resize(amap.float(), (roi[2] - roi[0], roi[3] - roi[1])).cpu().numpy()
        path = validation_path(self.export_dir, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, native_frame(native, roi, shape))
        self._crops.append((meta["category"], VALIDATION, path.stem, roi, shape))

    def _export_private(self, amap: torch.Tensor, batch: Batch, i: int) -> None:
        meta = batch.meta[i]
        if self.export_dir is None:
            raise ConfigError(
                f"{meta['path']} belongs to MVTec AD 2's {meta['role']} set, whose ground truth "
                "is not public: its maps can only be exported for MVTec's evaluation server. "
                "Pass --export-maps DIR (or leave the loader option private_sets off)"
            )
        y0, x0, y1, x1 = (int(v) for v in batch.roi[i])
        native = _resize(amap.float(), (y1 - y0, x1 - x0)).cpu().numpy()
        full = native_frame(native, (y0, x0, y1, x1), tuple(batch.mask[i].shape))
        if not np.isfinite(full).all():
            raise ValueError(f"anomaly map has NaN or infinite values for {meta['path']}")
        if np.abs(full).max() > np.finfo(np.float16).max:
            raise ValueError(
                f"the anomaly map of {meta['path']} reaches {float(np.abs(full).max()):.6g}, "
                f"beyond float16 (at most {float(np.finfo(np.float16).max):.6g}), the format "
                "MVTec's server requires; the detector's maps need a smaller scale"
            )
        path = submission_path(self.export_dir, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, full.astype(np.float16))
        self.private_maps.append(path)
        self.categories.add(str(meta["category"]))

    def replace_scores(self, scores: torch.Tensor) -> None:
        """Replaces the image scores of every item given (validation and private ones too, in
        the order given); only the test_public ones are kept."""
        if tuple(scores.shape) != (len(self.roles),):
            raise ValueError(
                f"{self.category}: {tuple(scores.shape)} replacement scores for the "
                f"{len(self.roles)} images of the test split"
            )
        keep = [i for i, role in enumerate(self.roles) if role == "test_public"]
        super().replace_scores(scores.detach()[keep])

    def compute(self) -> dict[str, dict[str, float]]:
        """The base metrics with ``au_pro_05``, plus SegF1 and the rest in "all"; first writes
        the thresholded private maps. Only "all" is kept unless test_public has several defect
        folders (AD 2 has one, "bad")."""
        threshold = self.threshold
        self._write_thresholded(threshold)
        out = super().compute()
        if math.isnan(threshold):
            self.warnings.append(
                f"{self.category}: no validation image; SegF1, its precision and recall, "
                "ClassF1 and the thresholded private maps are undefined"
            )
        kinds = [k for k in out if k != "all"]
        out = {k: v for k, v in out.items() if k == "all" or len(kinds) > 1}
        out["all"].update(seg_metrics(self.maps, self.masks, threshold))
        out["all"]["class_f1"] = class_f1(self.maps, self.labels, threshold)
        out["all"]["seg_threshold"] = threshold
        return out

    def _write_thresholded(self, threshold: float) -> None:
        """``anomaly_images_thresholded/.../<id>.png`` of every exported private map: 255 where
        the written float16 map is above ``threshold``, else 0."""
        if math.isnan(threshold):
            return
        for path in self.private_maps:
            half = tifffile.imread(path)
            binary = np.where(half.astype(np.float32) > threshold, 255, 0).astype(np.uint8)
            rel = path.relative_to(self.export_dir / SUBMISSION / MAPS)
            out = self.export_dir / SUBMISSION / THRESHOLDED / rel.with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(binary).save(out)

    def record(self) -> dict:
        return {
            **super().record(),
            "threshold_rule": self.threshold_rule,
            "threshold_k": self.threshold_k,
            "n_validation": self.n_validation,
            "submission": str(self.export_dir / SUBMISSION) if self.private_maps else None,
        }


def _subset(prediction: Prediction, batch: Batch, keep: list[int]) -> tuple[Prediction, Batch]:
    """The items ``keep`` of a batch and its prediction (what the base evaluator reads)."""
    idx = torch.tensor(keep)
    maps = prediction.anomaly_map
    sub = Prediction(prediction.score[idx.to(prediction.score.device)], maps[idx.to(maps.device)])
    part = Batch(
        label=batch.label[idx],
        mask=batch.mask[idx],
        roi=batch.roi[idx],
        meta=[batch.meta[i] for i in keep],
    )
    return sub, part
