"""adbench: a benchmarking harness for industrial anomaly detection (MVTec AD, MVTec 3D-AD).

Import names: ``bench`` (this core), ``bench.adapters`` (the ``adapters/`` folder) and
``bench.datasets`` (the ``datasets/`` folder).
"""

__version__ = "0.1.0"


from bench.capabilities import ReferenceStage, TransductiveScores, TypeDiscovery
from bench.detector import Detector
from bench.registry import create_detector, list_detectors, register_detector
from bench.types import Batch, Prediction

__all__ = [
    "Batch",
    "Detector",
    "Prediction",
    "ReferenceStage",
    "TransductiveScores",
    "TypeDiscovery",
    "__version__",
    "create_detector",
    "list_detectors",
    "register_detector",
]
