"""Exact, sort-based anomaly-detection metrics.

All curves use every distinct score as a threshold (ties collapse to one point), as
scikit-learn and the official MVTec evaluation scripts do. AU-PRO follows the official MVTec AD /
MVTec 3D-AD definition: 8-connected ground-truth regions per image, false-positive rate over all
defect-free pixels of the category, PRO = mean over regions of the covered fraction, the curve
from (0,0), trapezoid up to ``limit`` with the PRO value linearly interpolated there, divided by
``limit``.

Pixel metrics sort only the defective pixels and count every other pixel into the interval of
defective scores it falls in (:func:`score_metrics`), which determines the ROC, precision-recall
and PRO curves exactly without sorting or copying all pixels.

- :mod:`bench.metrics.names`: the version, protocols and headline metrics.
- :mod:`bench.metrics.curves`: ROC and precision-recall from per-threshold increments (image-
  and point-level metrics), the bounded trapezoid, curves for plotting.
- :mod:`bench.metrics.events`: the event of each pixel score among the defective pixels' scores.
- :mod:`bench.metrics.sweep`: the pixel curve metrics, swept over the events block by block.
- :mod:`bench.metrics.pixel`: pixel-level metrics and AU-PRO.
- :mod:`bench.metrics.spro`: MVTec LOCO AD's AU-sPRO (saturated per-region overlap).
- :mod:`bench.metrics.aupimo`: AUPIMO, the per-image overlap in a low-FPR range.
- :mod:`bench.metrics.curve_stats`, :mod:`bench.metrics.resample_sweep`,
  :mod:`bench.metrics.bootstrap`: every metric on bootstrap resamples of the test images.
- :mod:`bench.metrics.significance`: DeLong, the paired bootstrap, Holm, Wilcoxon.
"""

from bench.metrics.curves import (
    CURVE_POINTS,
    auroc,
    average_precision,
    evenly_spaced,
    f1_max,
    image_metrics,
    point_metrics,
    trapezoid_to,
)
from bench.metrics.events import _bin_of, _binning, _events, _resolve_numpy, _resolve_torch
from bench.metrics.names import (
    HEADLINE,
    IMAGE_METRICS,
    LABELS,
    METRIC_VERSION,
    PIXEL_METRICS,
    PROTOCOLS,
    headline,
)
from bench.metrics.pixel import CHUNK, au_pro, label_regions, pixel_metrics, score_metrics
from bench.metrics.spro import SPRO_LIMITS, au_spro, spro_metrics

__all__ = [
    "CHUNK",
    "CURVE_POINTS",
    "HEADLINE",
    "IMAGE_METRICS",
    "LABELS",
    "METRIC_VERSION",
    "PIXEL_METRICS",
    "PROTOCOLS",
    "SPRO_LIMITS",
    "_bin_of",
    "_binning",
    "_events",
    "_resolve_numpy",
    "_resolve_torch",
    "au_pro",
    "au_spro",
    "auroc",
    "average_precision",
    "evenly_spaced",
    "f1_max",
    "headline",
    "image_metrics",
    "label_regions",
    "pixel_metrics",
    "point_metrics",
    "score_metrics",
    "spro_metrics",
    "trapezoid_to",
]
