"""MVTec LOCO AD (real or generated): train/validation/test, one ground-truth PNG per defect.

As MVTec's evaluation code (``mvtec_loco_ad_evaluation``, ``src/image.py``) reads them: each PNG
of ``ground_truth/<kind>/<id>/`` is one defect ("channel"), storing a single non-zero value, its
defect's ``pixel_value`` in ``defects_config.json``; the channel is one region however many
connected components it has, and channels may overlap. Items carry the union of the channels as
``mask``; ``meta`` names the ground-truth folder and the config for :class:`LocoEvaluator`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError

from .builtin import GeneratedRoot
from .common import DatasetLayoutError, ImageCategoryDataset, list_images, scan_categories
from .registry import env_root, register_dataset

LAYOUT = """expected MVTec LOCO AD layout:
  <root>/<category>/defects_config.json
  <root>/<category>/{train,validation}/good/<id>.png
  <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/<id>.png
  <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/<id>/<nnn>.png
    (one PNG per defect: its pixel_value on the defect, 0 elsewhere)"""

KINDS = ("logical_anomalies", "structural_anomalies")
CONFIG = "defects_config.json"
REQUIRED = ("train/good", "validation/good", "test")
FIELDS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


@dataclass(frozen=True)
class DefectConfig:
    """One entry of ``defects_config.json``."""

    name: str
    pixel_value: int
    saturation_threshold: int | float
    relative: bool

    def saturation_area(self, area: int) -> int:
        """Defective pixels that saturate a channel of ``area`` pixels (official
        ``get_saturation_area``): ``int(threshold * area)`` if relative, else
        ``min(threshold, area)``; at least 1 (the official 0 divides by zero)."""
        if self.relative:
            return max(1, int(self.saturation_threshold * area))
        return int(min(self.saturation_threshold, area))


def _entry(path: Path, i: int, raw: Any) -> DefectConfig:
    where = f"{path} entry {i}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with the fields {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise DataError(f"{where}: lacks field(s) {', '.join(missing)}; expected {FIELDS}")
    name, value = raw["defect_name"], raw["pixel_value"]
    threshold, relative = raw["saturation_threshold"], raw["relative_saturation"]
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: field 'defect_name' must be a non-empty string, got {name!r}")
    where = f"{where} ({name!r})"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
        raise DataError(f"{where}: field 'pixel_value' must be an integer in 1..255, got {value!r}")
    if not isinstance(relative, bool):
        raise DataError(
            f"{where}: field 'relative_saturation' must be true or false, got {relative!r}"
        )
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if relative and not (number and 0 < threshold <= 1):
        raise DataError(
            f"{where}: field 'saturation_threshold' must be a fraction in (0, 1] when "
            f"relative_saturation is true, got {threshold!r}"
        )
    if not relative and not (number and isinstance(threshold, int) and threshold >= 1):
        raise DataError(
            f"{where}: field 'saturation_threshold' must be a positive integer (a pixel count) "
            f"when relative_saturation is false, got {threshold!r}"
        )
    return DefectConfig(name, value, threshold, relative)


def read_defects_config(path: str | Path) -> dict[int, DefectConfig]:
    """pixel value -> :class:`DefectConfig` of a ``defects_config.json``, every field checked."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"defects config {path} is missing; {LAYOUT}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read defects config {path}: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty list of defect entries with {FIELDS}")
    configs: dict[int, DefectConfig] = {}
    for i, raw in enumerate(entries):
        entry = _entry(path, i, raw)
        if entry.pixel_value in configs:
            other = configs[entry.pixel_value].name
            raise DataError(
                f"{path} entry {i} ({entry.name!r}): pixel_value {entry.pixel_value} is "
                f"already taken by {other!r}; each defect needs its own value"
            )
        configs[entry.pixel_value] = entry
    return configs


def read_channel(
    path: Path, configs: dict[int, DefectConfig], shape: tuple[int, int], config_path: Path
) -> tuple[np.ndarray, DefectConfig]:
    """(bool [H,W] defect, its config) of one ground-truth PNG."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except Exception as err:
        raise DataError(f"cannot read ground-truth channel {path}: {err}") from err
    if array.ndim != 2 or array.dtype.kind not in "ub":
        raise DataError(
            f"ground-truth channel {path} must be a single-channel 8- or 16-bit PNG, got "
            f"shape {array.shape} of {array.dtype}"
        )
    if array.shape != tuple(shape):
        raise DataError(
            f"ground-truth channel {path} is {array.shape}, expected {tuple(shape)} as its image"
        )
    values = np.flatnonzero(np.bincount(array.reshape(-1)))
    values = values[values != 0]
    if values.size != 1:
        raise DataError(
            f"ground-truth channel {path} must store one non-zero pixel value (its defect's "
            f"pixel_value), found {values.tolist() or 'none'}"
        )
    value = int(values[0])
    if value not in configs:
        raise DataError(
            f"ground-truth channel {path}: pixel value {value} matches no entry of "
            f"{config_path} (its pixel values: {sorted(configs)})"
        )
    return array != 0, configs[value]


def read_channels(
    folder: str | Path,
    configs: dict[int, DefectConfig],
    shape: tuple[int, int],
    config_path: str | Path,
) -> list[tuple[np.ndarray, DefectConfig]]:
    """The defects of one image: each PNG of its ground-truth folder, in sorted order."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not paths:
        raise DatasetLayoutError(f"ground-truth folder {folder} holds no PNG; {LAYOUT}")
    return [read_channel(p, configs, shape, Path(config_path)) for p in paths]


def broken_categories(root: str | Path) -> dict[str, str]:
    """Category folders that cannot be loaded, with what each lacks."""
    if not Path(root).is_dir():
        return {}
    found, broken = scan_categories(Path(root), REQUIRED)
    for category in found:
        if not (Path(root) / category / CONFIG).is_file():
            broken[category] = f"{Path(root) / category} has no {CONFIG}"
    return dict(sorted(broken.items()))


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MVTec LOCO AD root {root} does not exist; {LAYOUT}")
    found = [c for c in scan_categories(root, REQUIRED)[0] if c not in broken_categories(root)]
    if not found:
        raise DatasetLayoutError(f"no category under {root} is complete; {LAYOUT}")
    return found


@register_dataset(
    "builtin_loco",
    categories=categories,
    default_root=GeneratedRoot("loco"),
    modalities=("image",),
    broken_categories=broken_categories,
    metrics="loco",
)
@register_dataset(
    "mvtec_loco",
    categories=categories,
    default_root=env_root("MVTEC_LOCO_ROOT", "data/mvtec_loco"),
    modalities=("image",),
    broken_categories=broken_categories,
    metrics="loco",
    download="mvtec_loco",
)
class MVTecLOCO(ImageCategoryDataset):
    """One category and split (train, validation or test). Items: ``image`` float [3,h,w]
    (resized, optionally centre-cropped), ``mask`` bool at native size (any defect), ``label``,
    ``roi`` and ``meta`` with ``gt_dir`` (the image's ground-truth folder, "" for good images)
    and ``defects_config`` (the category's config file); defects ``good``,
    ``logical_anomalies`` and ``structural_anomalies``."""

    modality = "image"
    splits = ("train", "validation", "test")
    gt_key = "gt_dir"

    def _index(self) -> list[dict[str, Any]]:
        base = self.root / self.category
        self.config_path = base / CONFIG
        self.defects = read_defects_config(self.config_path)
        split_dir = base / self.split
        if not split_dir.is_dir():
            raise DatasetLayoutError(f"missing folder {split_dir}; {LAYOUT}")
        allowed = ("good", *KINDS) if self.split == "test" else ("good",)
        items = []
        for kind_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if kind_dir.name not in allowed:
                raise DatasetLayoutError(
                    f"unexpected folder {kind_dir}: {self.split} holds only {allowed}; {LAYOUT}"
                )
            for path in list_images(kind_dir):
                gt_dir = None
                if kind_dir.name != "good":
                    gt_dir = base / "ground_truth" / kind_dir.name / path.stem
                    if not gt_dir.is_dir():
                        raise DatasetLayoutError(
                            f"no ground truth for {path}: expected the folder {gt_dir}; {LAYOUT}"
                        )
                items.append({"path": path, "defect": kind_dir.name, "gt_dir": gt_dir})
        if not items:
            raise DatasetLayoutError(f"no images under {split_dir}; {LAYOUT}")
        if self.split == "test":
            self._warn_orphans(items)
        return items

    def _warn_orphans(self, items: list[dict[str, Any]]) -> None:
        """Ground-truth folders that belong to no test image."""
        used = {it["gt_dir"] for it in items}
        gt = self.root / self.category / "ground_truth"
        orphans = sorted(p for kind in KINDS for p in (gt / kind).glob("*") if p not in used)
        if orphans:
            self.warnings.append(
                f"{self.category}: {len(orphans)} ground-truth folder(s) have no test image, "
                f"e.g. {orphans[0]}"
            )

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        out = super().target({**item, "gt_dir": None}, native, roi)
        if item["gt_dir"] is not None:
            channels = read_channels(item["gt_dir"], self.defects, native, self.config_path)
            out["mask"] = torch.from_numpy(np.logical_or.reduce([c for c, _ in channels]))
        out["meta"]["gt_dir"] = "" if item["gt_dir"] is None else str(item["gt_dir"])
        out["meta"]["defects_config"] = str(self.config_path)
        return out
