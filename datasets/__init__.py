"""Dataset loaders (installed as ``bench.datasets``; the folder name is kept for the layout).

Each named dataset knows its loader class, where its root is by default, and which detector
modalities it feeds natively.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import mvtec_3d, mvtec_ad, real3d
from .builtin import ensure_generated
from .common import DatasetLayoutError
from .mvtec_3d import MVTec3D
from .mvtec_ad import MVTecAD
from .real3d import PointCloudSet

__all__ = [
    "DATASETS",
    "DatasetLayoutError",
    "DatasetSpec",
    "MVTec3D",
    "MVTecAD",
    "PointCloudSet",
    "get_dataset",
]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: type
    list_categories: Callable[[str | Path], list[str]]
    default_root: Callable[[], Path]
    modalities: tuple[str, ...]  # detectors it serves unless a detector names its datasets
    feeds: tuple[str, ...]  # every modality its samples can provide
    #: category folders that cannot be loaded, with what each lacks
    broken_categories: Callable[[str | Path], dict[str, str]] = lambda root: {}

    def root(self, root: str | Path | None = None) -> Path:
        return Path(root) if root else self.default_root()

    def categories(
        self, root: str | Path | None = None, named: list[str] | None = None
    ) -> list[str]:
        """The loadable categories. A category folder that cannot be loaded is an error
        naming what it lacks: every such folder when categories are discovered (``named``
        None), else those of ``named``."""
        root = self.root(root)
        found = self.list_categories(root)
        broken = self.broken_categories(root)
        bad = {c: why for c, why in broken.items() if named is None or c in named}
        if bad:
            raise DatasetLayoutError(
                f"{self.name}: categor(ies) {sorted(bad)} cannot be loaded: "
                + "; ".join(bad.values())
                + ". Complete or remove the folder, or pass --categories to run the others"
            )
        return found

    def open(self, category: str, split: str, root: str | Path | None = None, **options):
        return self.loader(self.root(root), category, split, **options)


def _env_root(var: str, fallback: str) -> Callable[[], Path]:
    return lambda: Path(os.environ.get(var, fallback))


DATASETS: dict[str, DatasetSpec] = {
    "mvtec_ad": DatasetSpec(
        "mvtec_ad",
        MVTecAD,
        mvtec_ad.categories,
        _env_root("MVTEC_AD_ROOT", "data/mvtec_ad"),
        ("image",),
        ("image",),
        mvtec_ad.broken_categories,
    ),
    "mvtec_3d": DatasetSpec(
        "mvtec_3d",
        MVTec3D,
        mvtec_3d.categories,
        _env_root("MVTEC_3D_ROOT", "data/mvtec_3d"),
        ("point_cloud", "rgb+point_cloud"),
        ("image", "point_cloud", "rgb+point_cloud"),
        mvtec_3d.broken_categories,
    ),
    "builtin_ad": DatasetSpec(
        "builtin_ad",
        MVTecAD,
        mvtec_ad.categories,
        lambda: ensure_generated("ad"),
        ("image",),
        ("image",),
        mvtec_ad.broken_categories,
    ),
    "builtin_3d": DatasetSpec(
        "builtin_3d",
        MVTec3D,
        mvtec_3d.categories,
        lambda: ensure_generated("3d"),
        ("point_cloud", "rgb+point_cloud"),
        ("image", "point_cloud", "rgb+point_cloud"),
        mvtec_3d.broken_categories,
    ),
    # unorganised clouds with per-point labels (object- and point-level metrics)
    "real3d_ad": DatasetSpec(
        "real3d_ad",
        PointCloudSet,
        real3d.categories,
        _env_root("REAL3D_AD_ROOT", "data/real3d_ad"),
        ("points",),
        ("points",),
        real3d.broken_categories,
    ),
    "anomaly_shapenet": DatasetSpec(
        "anomaly_shapenet",
        PointCloudSet,
        real3d.categories,
        _env_root("ANOMALY_SHAPENET_ROOT", "data/anomaly_shapenet"),
        ("points",),
        ("points",),
        real3d.broken_categories,
    ),
    "builtin_points": DatasetSpec(
        "builtin_points",
        PointCloudSet,
        real3d.categories,
        lambda: ensure_generated("points"),
        ("points",),
        ("points",),
        real3d.broken_categories,
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
