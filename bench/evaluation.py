"""The streaming evaluator: ``update(prediction, batch)`` per test batch, ``compute()`` at the end.

Memory: each map is kept once, as float32 at the ground truth's size (official protocol) on the
device that produced it, and each mask as one byte per pixel on the host: 5 bytes a pixel, about
550 MiB for 110 maps of 1024x1024. ``compute`` adds, on the host, 8 bytes per defective pixel
(its score and region, sorted together), 4 bytes per group (good, each defect type) and event
(two events per distinct defective score) and work buffers (about 40 MB per CPU thread); no
sort or copy of all pixels is made. Measured (``python -m bench.perf metrics-memory``,
results/perf/metrics-memory.md): 659 MiB for 60 maps of 1100x1600 with 18.8 M defective pixels
(35 bytes per defective pixel in all) with 2 CPU threads, 1049 MiB with 8.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from bench.metrics import (
    CHUNK,
    METRIC_VERSION,
    PROTOCOLS,
    image_metrics,
    point_metrics,
    score_metrics,
)
from bench.metrics.aupimo import FPR_BOUNDS, AupimoUndefined, aupimo_scores
from bench.types import Batch, Prediction


def export_path(root: str | Path, meta: dict) -> Path:
    """``<root>/<category>/test/<defect>/<id>.tiff``: the official evaluation scripts' layout."""
    return (
        Path(root) / meta["category"] / "test" / meta["defect"] / f"{Path(meta['path']).stem}.tiff"
    )


class Evaluator:
    """Collects predictions of one category and computes every metric exactly.

    ``protocol="official"`` upsamples each map bilinearly to its ground truth's native size;
    ``"fast"`` compares both at ``fast_size`` (maps bilinear, masks nearest) and is labelled so.
    ``export_dir`` writes every map in the official layout, in the native frame (the whole
    ground truth); with a crop, pixels outside it hold the map's lowest score and the crop is
    recorded in ``<category>/crop.json`` (see ``write_crops``).
    """

    #: further AU-PRO integration limits a subclass reports (metric name -> FPR limit)
    more_pro_limits: dict[str, float] = {}

    def __init__(
        self,
        protocol: str = "official",
        pro_limit: float = 0.3,
        fast_size: int = 256,
        export_dir: str | Path | None = None,
        chunk: int = CHUNK,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not 0 < pro_limit <= 1:
            raise ValueError(f"pro_limit must be in (0, 1], got {pro_limit}")
        self.protocol, self.pro_limit, self.fast_size, self.chunk = (
            protocol,
            pro_limit,
            fast_size,
            chunk,
        )
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.defects: list[str] = []
        self.ids: list[str] = []  # "<defect>/<file stem>" of each test image
        self.paths: list[str] = []
        self.aupimo: np.ndarray | None = None  # per image, after compute()
        self.categories: set[str] = set()
        self.maps: list[torch.Tensor] = []
        self.curves: dict = {}  # ROC and PRO curves of the whole category, after compute()
        self.masks: list[torch.Tensor] = []
        self.cropped = False
        self.warnings: list[str] = []
        self._exported: list[tuple[str, str, str, float]] = []
        self._crops: list[tuple[str, str, str, tuple[int, ...], tuple[int, int]]] = []

    @property
    def protocol_label(self) -> str:
        return self.protocol + ("-cropped" if self.cropped else "")

    @property
    def category(self) -> str:
        return ", ".join(sorted(self.categories)) or "unknown category"

    def update(self, prediction: Prediction, batch: Batch) -> None:
        if len(prediction.score) != len(batch):
            raise ValueError(
                f"{len(prediction.score)} predictions for a batch of {len(batch)} samples"
            )
        scores = prediction.score.detach().float()
        maps = prediction.anomaly_map.detach().float()
        for i in range(len(batch)):
            meta = batch.meta[i]
            where = meta.get("map_path") or meta.get("path", f"sample {len(self.scores)}")
            if not torch.isfinite(maps[i]).all():
                raise ValueError(f"anomaly map has NaN or infinite values for {where}")
            if not torch.isfinite(scores[i]):
                raise ValueError(f"image score is {float(scores[i])} for {where}")
            y0, x0, y1, x1 = (int(v) for v in batch.roi[i])
            mask = batch.mask[i].bool().cpu()
            self.cropped |= (y0, x0, y1, x1) != (0, 0, mask.shape[0], mask.shape[1])
            mask = mask[y0:y1, x0:x1]
            native = None
            if self.export_dir is not None or self.protocol == "official":
                native = _resize(maps[i], tuple(mask.shape))
            if self.export_dir is not None:
                roi = (y0, x0, y1, x1)
                self._export(meta, native, roi, tuple(batch.mask[i].shape), float(scores[i]))
            if self.protocol == "fast":
                size = (self.fast_size, self.fast_size)
                native = _resize(maps[i], size)
                mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[
                    0, 0
                ].bool()
            self.maps.append(native.contiguous())
            self.masks.append(mask.contiguous())
            self.scores.append(float(scores[i]))
            self.labels.append(int(batch.label[i]))
            _identify(self, meta)

    def replace_scores(self, scores: torch.Tensor) -> None:
        """Replaces every image score (in the order given), e.g. by scores normalised over the
        whole test set (``Detector.test_scores``)."""
        scores = scores.detach().float().cpu()
        if scores.shape != (len(self.scores),):
            raise ValueError(
                f"{self.category}: {tuple(scores.shape)} replacement scores for "
                f"{len(self.scores)} test images"
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"{self.category}: a replacement image score is not finite")
        self.scores = [float(s) for s in scores]
        self._exported = [(*row[:3], s) for row, s in zip(self._exported, self.scores)]

    def _export(
        self, meta: dict, amap: torch.Tensor, roi: tuple[int, ...], shape: tuple, score: float
    ) -> None:
        """Writes ``amap`` (the crop region's map at native resolution) in the native frame."""
        path = export_path(self.export_dir, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, native_frame(amap.cpu().numpy(), roi, shape))
        key = (meta["category"], meta["defect"], Path(meta["path"]).stem)
        self._exported.append((*key, score))
        self._crops.append((*key, roi, (int(shape[0]), int(shape[1]))))

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics for all test images (key "all") and per defect type (each vs the good images).

        A metric that is undefined (no anomalous or no good image) is NaN, with a message in
        ``self.warnings`` naming the category.
        """
        n = len(self.scores)
        if n == 0:
            raise ValueError("no predictions were given to the evaluator")
        self.warnings = []
        labels = torch.tensor(self.labels)
        if not (labels == 1).any() or not (labels == 0).any():
            missing = "anomalous" if not (labels == 1).any() else "good"
            self.warnings.append(
                f"{self.category}: no {missing} test image; image AUROC/AP/F1 are undefined (NaN)"
            )
        kinds = sorted({d for d, y in zip(self.defects, self.labels) if y == 1})
        group_of = {"good": 0, **{d: i + 1 for i, d in enumerate(kinds)}}
        groups = [group_of[d] if y == 1 else 0 for d, y in zip(self.defects, self.labels)]
        subsets = {"all": list(range(len(kinds) + 1)), **{d: [0, group_of[d]] for d in kinds}}
        self.curves: dict = {}
        write_scores(self.export_dir, self._exported)  # first: the export is complete even
        write_crops(self.export_dir, self._crops)  # if the metrics fail
        pixel = score_metrics(
            self.maps,
            self.masks,
            groups,
            subsets,
            self.pro_limit,
            self.chunk,
            self.curves,
            self.more_pro_limits,
        )
        out = {}
        scores = torch.tensor(self.scores, dtype=torch.float64)
        for name, members in subsets.items():
            sel = torch.tensor([g in members for g in groups])
            out[name] = {**image_metrics(scores[sel], labels[sel]), **pixel[name]}
        self._add_aupimo(out, groups, group_of)
        if math.isnan(out["all"]["au_pro"]):
            self.warnings.append(
                f"{self.category}: no ground-truth region or no defect-free pixel; AU-PRO is undefined (NaN)"
            )
        return out

    def _add_aupimo(self, out: dict, groups: list[int], group_of: dict[str, int]) -> None:
        """Per-image AUPIMO (``self.aupimo``) and its mean over the anomalous images of each
        subset (``aupimo``); NaN where it is undefined, with a warning unless the test set
        has fewer than 1 / 1e-5 normal pixels (then the shared FPR cannot reach the range)."""
        try:
            self.aupimo = aupimo_scores(self.maps, self.masks, self.labels).aupimo
        except AupimoUndefined as err:
            self.aupimo = np.full(len(self.labels), np.nan)
            normal = sum(m.numel() for m, y in zip(self.maps, self.labels) if y == 0)
            if normal >= 1 / FPR_BOUNDS[0]:  # a test set this small is expected to lack it
                self.warnings.append(f"{self.category}: AUPIMO is undefined (NaN): {err}")
        except ValueError as err:  # e.g. a good image whose mask is not empty: the rest stands
            self.aupimo = np.full(len(self.labels), np.nan)
            self.warnings.append(f"{self.category}: AUPIMO not computed (NaN): {err}")
        groups_ = np.asarray(groups)
        for name, values in out.items():
            chosen = self.aupimo[groups_ == group_of[name]] if name != "all" else self.aupimo
            finite = chosen[np.isfinite(chosen)]
            values["aupimo"] = float(finite.mean()) if finite.size else math.nan

    def record(self) -> dict:
        return {**record(self), "pro_limit": self.pro_limit}


def _identify(evaluator, meta: dict) -> None:
    """Keeps a test image's defect type, id ("<defect>/<file stem>") and path."""
    defect = str(meta.get("defect", "unknown"))
    path = str(meta.get("path", f"sample {len(evaluator.ids)}"))
    evaluator.defects.append(defect)
    evaluator.ids.append(f"{defect}/{Path(path).stem}")
    evaluator.paths.append(path)
    evaluator.categories.add(str(meta.get("category", "unknown category")))


def write_scores(export_dir: Path | None, rows: list[tuple[str, str, str, float]]) -> None:
    """Image (object) scores next to the exported maps, ``<category>/scores.csv``, as
    ``bench evaluate --scores`` reads them."""
    if export_dir is None or not rows:
        return
    for category in sorted({row[0] for row in rows}):
        mine = [r for r in rows if r[0] == category]
        lines = ["category,defect,id,score", *(f"{c},{d},{i},{s!r}" for c, d, i, s in mine)]
        (export_dir / category / "scores.csv").write_text("\n".join(lines) + "\n")


def native_frame(amap: np.ndarray, roi: tuple[int, ...], shape: tuple[int, int]) -> np.ndarray:
    """float32 map of the whole ground truth (``shape``): ``amap`` inside ``roi`` = [y0, x0, y1,
    x1], the map's lowest score outside (no pixel there outranks one inside)."""
    y0, x0, y1, x1 = roi
    if (y0, x0, y1, x1) == (0, 0, shape[0], shape[1]):
        return amap.astype(np.float32)
    full = np.full(shape, amap.min(), dtype=np.float32)
    full[y0:y1, x0:x1] = amap
    return full


CROP_FILE = "crop.json"


def write_crops(export_dir: Path | None, rows: list[tuple[str, str, str, tuple, tuple]]) -> None:
    """``<category>/crop.json`` when a crop was evaluated: ``{"roi": [y0, x0, y1, x1]}`` (native
    pixels, end exclusive) when every test image has the same, else ``{"rois": {"<defect>/<id>":
    [...]}}``; ``bench evaluate`` scores only that region. An uncropped export removes a stale
    one."""
    if export_dir is None or not rows:
        return
    for category in sorted({row[0] for row in rows}):
        mine = [r for r in rows if r[0] == category]
        path = export_dir / category / CROP_FILE
        if all(roi == (0, 0, *shape) for *_, roi, shape in mine):
            path.unlink(missing_ok=True)
            continue
        rois = {f"{d}/{i}": list(roi) for _, d, i, roi, _ in mine}
        same = len({tuple(r) for r in rois.values()}) == 1
        record = {"roi": list(mine[0][3])} if same else {"rois": rois}
        path.write_text(json.dumps(record) + "\n")


class PointEvaluator:
    """The evaluator of unorganised clouds (Real3D-AD, Anomaly-ShapeNet): object-level
    (``image_*``, one score per cloud) and point-level (``point_*``) AUROC, AP and F1-max, for
    all test clouds and per defect type (each vs the good clouds). Point scores are kept on the
    host, 4 bytes and 1 label byte per point. ``export_dir`` writes each cloud's point scores
    as ``<category>/test/<defect>/<id>.txt`` (one score per line, the cloud's point order) and
    the object scores as ``<category>/scores.csv``."""

    protocol_label = "points"

    def __init__(self, export_dir: str | Path | None = None) -> None:
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.defects: list[str] = []
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.point_scores: list[torch.Tensor] = []
        self.point_labels: list[torch.Tensor] = []
        self.categories: set[str] = set()
        self.curves: dict = {}
        self.warnings: list[str] = []
        self._exported: list[tuple[str, str, str, float]] = []

    def update(self, prediction: Prediction, batch: Batch) -> None:
        if prediction.point_scores is None or batch.point_labels is None:
            raise ValueError(
                "PointEvaluator needs point_scores and point_labels (unorganised clouds)"
            )
        if len(prediction.score) != len(batch):
            raise ValueError(f"{len(prediction.score)} predictions for {len(batch)} clouds")
        for i, (scores, labels) in enumerate(zip(prediction.point_scores, batch.point_labels)):
            meta = batch.meta[i]
            where = meta.get("path", f"cloud {len(self.scores)}")
            scores = scores.detach().float().reshape(-1).cpu()
            if scores.shape[0] != labels.numel():
                raise ValueError(
                    f"{scores.shape[0]} point scores for the {labels.numel()} points of {where}"
                )
            if not torch.isfinite(scores).all() or not torch.isfinite(prediction.score[i]):
                raise ValueError(f"point or object scores have NaN or infinite values for {where}")
            if self.export_dir is not None:
                path = export_path(self.export_dir, meta).with_suffix(".txt")
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savetxt(path, scores.numpy(), fmt="%.9g")  # float32 round-trips
                self._exported.append(
                    (meta["category"], meta["defect"], path.stem, float(prediction.score[i]))
                )
            self.point_scores.append(scores)
            self.point_labels.append(labels.reshape(-1).bool().cpu())
            self.scores.append(float(prediction.score[i]))
            self.labels.append(int(batch.label[i]))
            _identify(self, meta)

    def compute(self) -> dict[str, dict[str, float]]:
        if not self.scores:
            raise ValueError("no predictions were given to the evaluator")
        self.warnings, self.curves = [], {}
        write_scores(self.export_dir, self._exported)
        labels = torch.tensor(self.labels)
        scores = torch.tensor(self.scores, dtype=torch.float64)
        if not (labels == 1).any() or not (labels == 0).any():
            category = ", ".join(sorted(self.categories))
            self.warnings.append(f"{category}: the test clouds are all of one class; AUROC is NaN")
        kinds = sorted({d for d, y in zip(self.defects, self.labels) if y == 1})
        subsets = {"all": None, **{k: k for k in kinds}}
        out = {}
        for name, kind in subsets.items():
            idx = [
                i
                for i, (d, y) in enumerate(zip(self.defects, self.labels))
                if y == 0 or kind in (None, d)
            ]
            points = point_metrics(
                [self.point_scores[i] for i in idx],
                [self.point_labels[i] for i in idx],
                self.curves if kind is None else None,
            )
            out[name] = {**image_metrics(scores[idx], labels[idx]), **points}
        return out

    def record(self) -> dict:
        return record(self)


def record(evaluator: Evaluator | PointEvaluator) -> dict:
    """An evaluator's metrics with their provenance, for results files."""
    metrics = evaluator.compute()
    return {
        "metrics": metrics,
        "protocol": evaluator.protocol_label,
        "metric_version": METRIC_VERSION,
        "warnings": list(evaluator.warnings),
    }


def _resize(amap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(amap.shape) == size:
        return amap
    return F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
