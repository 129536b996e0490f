"""The MVTec LOCO AD evaluator: the base metrics plus AU-sPRO per anomaly kind.

Reported per subset "all", "logical_anomalies" and "structural_anomalies" (each kind with the
good images, as the official ``evaluate_experiment.py`` groups them; "all" pools every test
image): the base :class:`~bench.evaluation.Evaluator`'s image and pixel metrics plus
``au_spro_01`` ... ``au_spro_100`` (:data:`~bench.metrics.spro.SPRO_LIMITS`; ``au_spro_05`` is
the paper's headline). "all" also holds the official summary, the mean of the logical and the
structural value: ``image_auroc_mean`` and ``au_spro_<limit>_mean``.

Memory: what the base keeps (each map at native size, each union mask), plus each channel's
flat pixel indices (4 bytes per defective pixel and channel) and saturation area. ``compute``
scores the base metrics, then AU-sPRO, each adding 35-60 bytes per defective pixel while it
runs (measured, ``python -m bench.perf metrics-memory``: 659 and 606 MiB for 60 maps of
1100x1600 with 18.8 M defective pixels with 2 CPU threads, 1049 and 980 MiB with 8;
results/perf/metrics-memory.md): a whole category, about 173 anomalous images of 1600x1100 or
more, needs a few GB beyond its maps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.datasets.mvtec_loco import KINDS, DefectConfig, read_channels, read_defects_config
from bench.errors import ConfigError, DataError
from bench.evaluation import Evaluator
from bench.metrics import CHUNK
from bench.metrics.spro import SPRO_LIMITS, Channel, spro_metrics
from bench.types import Batch, Prediction


class LocoEvaluator(Evaluator):
    """Collects the predictions of one MVTec LOCO AD category (samples whose ``meta`` carries
    ``gt_dir`` and ``defects_config``, as :class:`~bench.datasets.mvtec_loco.MVTecLOCO` gives
    them) and computes every metric exactly. Only the official protocol: saturation thresholds
    are pixel counts at native resolution. With a crop, only the cropped part of each channel is
    scored (its saturation area taken from that part) and the protocol reads
    ``official-loco-cropped``."""

    def __init__(
        self,
        protocol: str = "official",
        pro_limit: float = 0.3,
        export_dir: str | Path | None = None,
        chunk: int = CHUNK,
        spro_limits: dict[str, float] = SPRO_LIMITS,
    ) -> None:
        if protocol != "official":
            raise ConfigError(
                f"MVTec LOCO AD is scored with the official protocol only (sPRO's saturation "
                f"thresholds are pixel counts at native resolution), got {protocol!r}"
            )
        super().__init__(protocol, pro_limit, export_dir=export_dir, chunk=chunk)
        self.spro_limits = dict(spro_limits)
        self.channels: list[list[Channel]] = []
        self._configs: dict[str, dict[int, DefectConfig]] = {}

    @property
    def protocol_label(self) -> str:
        return "official-loco" + ("-cropped" if self.cropped else "")

    def update(self, prediction: Prediction, batch: Batch) -> None:
        channels = [self._channels(batch, i) for i in range(len(batch))]
        super().update(prediction, batch)
        self.channels.extend(channels)

    def _channels(self, batch: Batch, i: int) -> list[Channel]:
        """The ground-truth channels of sample ``i`` inside its ROI: flat pixel indices into
        the (cropped) native frame and saturation areas."""
        meta = batch.meta[i]
        where = meta.get("path", f"sample {len(self.channels) + i}")
        if "gt_dir" not in meta or "defects_config" not in meta:
            raise ValueError(
                f"LocoEvaluator needs meta 'gt_dir' and 'defects_config' (MVTec LOCO AD ground "
                f"truth) for {where}; the dataset does not provide them"
            )
        if not meta["gt_dir"]:
            if int(batch.label[i]) != 0:
                raise DataError(f"anomalous test image {where} has no ground-truth folder")
            return []
        config = meta["defects_config"]
        if config not in self._configs:
            self._configs[config] = read_defects_config(config)
        mask = batch.mask[i].bool().cpu().numpy()
        read = read_channels(meta["gt_dir"], self._configs[config], mask.shape, config)
        if not np.array_equal(np.logical_or.reduce([c for c, _ in read]), mask):
            raise DataError(f"the mask of {where} is not the union of {meta['gt_dir']}/*.png")
        y0, x0, y1, x1 = (int(v) for v in batch.roi[i])
        out = []
        for channel, defect in read:
            pixels = np.flatnonzero(channel[y0:y1, x0:x1]).astype(np.int32)
            if pixels.size:
                out.append((pixels, defect.saturation_area(int(pixels.size))))
        return out

    def compute(self) -> dict[str, dict[str, float]]:
        out = super().compute()
        kinds = sorted({d for d, y in zip(self.defects, self.labels) if y == 1})
        group_of = {d: i + 1 for i, d in enumerate(kinds)}
        groups = [group_of[d] if y == 1 else 0 for d, y in zip(self.defects, self.labels)]
        subsets = {"all": list(range(len(kinds) + 1)), **{d: [0, group_of[d]] for d in kinds}}
        spro = spro_metrics(
            self.maps, self.masks, self.channels, groups, subsets, self.spro_limits, self.chunk
        )
        for name, values in spro.items():
            out[name].update(values)
        if set(KINDS) <= set(out):
            logical, structural = (out[k] for k in KINDS)
            for name in ("image_auroc", *self.spro_limits):
                out["all"][f"{name}_mean"] = 0.5 * (logical[name] + structural[name])
        else:
            self.warnings.append(
                f"{self.category}: the test set lacks {' or '.join(set(KINDS) - set(out))}; "
                "the official means of logical and structural anomalies are not reported"
            )
        if any(math.isnan(out["all"][name]) for name in self.spro_limits):
            self.warnings.append(
                f"{self.category}: no ground-truth channel or no defect-free pixel; "
                "AU-sPRO is undefined (NaN)"
            )
        return out

    def record(self) -> dict:
        return {**super().record(), "spro_limits": self.spro_limits}
