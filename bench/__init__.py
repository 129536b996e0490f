"""adbench: a benchmarking harness for industrial anomaly detection (MVTec AD, MVTec 3D-AD).

Import names: ``bench`` (this core), ``bench.adapters`` (the ``adapters/`` folder) and
``bench.datasets`` (the ``datasets/`` folder).
"""

__version__ = "0.1.0"

from bench.detector import Detector  # noqa: E402
from bench.registry import create_detector, list_detectors, register_detector  # noqa: E402
from bench.types import Batch, Prediction  # noqa: E402

__all__ = [
    "Batch",
    "Detector",
    "Prediction",
    "__version__",
    "create_detector",
    "list_detectors",
    "register_detector",
]
