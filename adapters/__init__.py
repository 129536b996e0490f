"""Built-in detectors, one folder each (installed as ``bench.adapters``).

Importing this package registers them; third-party detectors come in through the
``adbench.detectors`` entry-point group instead.
"""

from . import (  # noqa: F401
    autoencoder,
    casl,
    curvature,
    dictas,
    dinomaly,
    feature_stats,
    grid_curvature,
    knn,
)
