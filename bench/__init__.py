"""adbench: a benchmarking harness for industrial anomaly detection (MVTec AD, MVTec 3D-AD).

Import names: ``bench`` (this core), ``bench.adapters`` (the ``adapters/`` folder) and
``bench.datasets`` (the ``datasets/`` folder).
"""

__version__ = "0.1.0"


def _map_checkout_folders() -> None:
    """Run from an uninstalled checkout (``make gpu-check`` on an air-gapped GPU machine, whose
    python cannot install the package): ``bench.adapters`` and ``bench.datasets`` are found in
    the ``adapters/`` and ``datasets/`` folders beside ``bench/``, as the install maps them. The
    finder goes last on ``sys.meta_path``: an installed package is always found first."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folders = {f"bench.{name}": root / name for name in ("adapters", "datasets")}
    if not all((folder / "__init__.py").is_file() for folder in folders.values()):
        return  # an installed copy: its own mapping holds

    class CheckoutFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            folder = folders.get(fullname)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(
                fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )

    if not any(type(f).__name__ == "CheckoutFolders" for f in sys.meta_path):
        sys.meta_path.append(CheckoutFolders())


_map_checkout_folders()

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
