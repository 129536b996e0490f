"""Dataset loaders (installed as ``bench.datasets``; the folder name is kept for the layout).

Each named dataset knows its loader class, where its root is by default, and which detector
modalities it feeds natively. Datasets register like detectors: ``@register_dataset`` (or
``add_dataset``) for built-ins, the ``adbench.datasets`` entry-point group for plugins (see
:mod:`.registry`).
"""

from __future__ import annotations

from . import (
    btad,  # noqa: F401  (registers btad, mpdd and their builtin_ twins)
    folder,  # noqa: F401  (registers folder and builtin_folder)
    mvtec_3d,
    mvtec_ad,
    mvtec_ad2,  # noqa: F401  (registers mvtec_ad2 and builtin_ad2)
    mvtec_loco,  # noqa: F401  (registers mvtec_loco and builtin_loco)
    real3d,
)
from .builtin import GeneratedRoot, ensure_generated
from .common import DatasetLayoutError
from .mvtec_3d import MVTec3D
from .mvtec_ad import MVTecAD
from .real3d import PointCloudSet
from .registry import (
    DATASETS,
    ENTRY_POINT_GROUP,
    DatasetInfo,
    DatasetSpec,
    DefaultRoot,
    UnknownDatasetError,
    add_dataset,
    env_root,
    get_dataset,
    list_datasets,
    register_dataset,
)
from .visa import VisA  # registers visa and builtin_visa

__all__ = [
    "DATASETS",
    "ENTRY_POINT_GROUP",
    "DatasetInfo",
    "DatasetLayoutError",
    "DatasetSpec",
    "DefaultRoot",
    "GeneratedRoot",
    "MVTec3D",
    "MVTecAD",
    "PointCloudSet",
    "UnknownDatasetError",
    "VisA",
    "add_dataset",
    "ensure_generated",
    "env_root",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]

_env_root = env_root

_CLOUD = ("point_cloud", "rgb+point_cloud")
_CLOUD_FEEDS = ("image", *_CLOUD)

for _name, _root, _download in (
    ("mvtec_ad", _env_root("MVTEC_AD_ROOT", "data/mvtec_ad"), "mvtec_ad"),
    ("builtin_ad", GeneratedRoot("ad"), None),
):
    register_dataset(
        _name,
        categories=mvtec_ad.categories,
        default_root=_root,
        modalities=("image",),
        broken_categories=mvtec_ad.broken_categories,
        download=_download,
    )(MVTecAD)

for _name, _root, _download in (
    ("mvtec_3d", _env_root("MVTEC_3D_ROOT", "data/mvtec_3d"), "mvtec_3d"),
    ("builtin_3d", GeneratedRoot("3d"), None),
):
    register_dataset(
        _name,
        categories=mvtec_3d.categories,
        default_root=_root,
        modalities=_CLOUD,
        feeds=_CLOUD_FEEDS,
        broken_categories=mvtec_3d.broken_categories,
        download=_download,
    )(MVTec3D)

# unorganised clouds with per-point labels (object- and point-level metrics)
for _name, _root, _download in (
    ("real3d_ad", _env_root("REAL3D_AD_ROOT", "data/real3d_ad"), "real3d_ad"),
    (
        "anomaly_shapenet",
        _env_root("ANOMALY_SHAPENET_ROOT", "data/anomaly_shapenet"),
        "anomaly_shapenet",
    ),
    ("builtin_points", GeneratedRoot("points"), None),
):
    register_dataset(
        _name,
        categories=real3d.categories,
        default_root=_root,
        modalities=("points",),
        broken_categories=real3d.broken_categories,
        download=_download,
    )(PointCloudSet)
