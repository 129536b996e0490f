"""MVTec 3D-AD folders (real or generated): organised xyz point clouds with rgb and masks.

xyz is an organised float32 HxWx3 tiff aligned pixel for pixel with rgb and gt (sizes checked:
a mismatch or an unreadable, e.g. truncated, tiff is an error naming the file); missing points
are (0,0,0), and NaN or infinite coordinates are taken as missing too. Sizes vary per category,
so nothing assumes 800x800.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from bench.errors import DataError

from .common import (
    CategoryDataset,
    DatasetLayoutError,
    input_geometry,
    read_rgb,
    resize_crop,
    resize_rgb,
    scan_categories,
)
from .preprocess_3d import Preprocess3D, cached_valid_mask

LAYOUT = """expected MVTec 3D-AD layout:
  <root>/<category>/{train,validation,test}/<defect or good>/rgb/<id>.png
  <root>/<category>/{train,validation,test}/<defect or good>/xyz/<id>.tiff
  <root>/<category>/{train,validation,test}/<defect or good>/gt/<id>.png  (defects; optional for good)"""

SPLITS = ("train", "validation", "test")


REQUIRED = ("train/good/xyz", "test")


def broken_categories(root: str | Path) -> dict[str, str]:
    """Category folders that cannot be loaded, with what each lacks."""
    return scan_categories(Path(root), REQUIRED)[1] if Path(root).is_dir() else {}


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MVTec 3D-AD root {root} does not exist; {LAYOUT}")
    found = scan_categories(root, REQUIRED)[0]
    if not found:
        raise DatasetLayoutError(f"no category under {root} has a train/good/xyz folder; {LAYOUT}")
    return found


def read_xyz(path: Path) -> np.ndarray:
    """The organised point cloud as float32 HxWx3; errors name the file."""
    try:
        xyz = tifffile.imread(path)
    except Exception as err:
        raise DataError(
            f"cannot read point-cloud tiff {path} (truncated or not a tiff?): {err}; "
            "re-download or re-extract it"
        ) from err
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(
            f"point-cloud tiff {path} has shape {xyz.shape}, expected HxWx3 (organised xyz)"
        )
    if not np.issubdtype(xyz.dtype, np.floating):
        raise DataError(f"point-cloud tiff {path} has dtype {xyz.dtype}, expected float32")
    xyz = xyz.astype(np.float32)
    xyz[~np.isfinite(xyz).all(axis=2)] = 0.0  # a point with any NaN / inf coordinate is missing
    return xyz


class MVTec3D(CategoryDataset):
    """One category and split. Items: ``xyz`` float [3,h,w] (nearest-resized organised grid),
    ``valid`` bool [h,w], ``rgb`` (also as ``image``) float [3,h,w] in [0,1], ``mask`` bool at
    native size, ``label``, ``roi``, ``meta``."""

    modality = "point_cloud"
    splits = SPLITS

    def __init__(
        self,
        root,
        category,
        split="train",
        image_size=224,
        crop_size=None,
        preprocess=None,
        resampling: str = "tensor",
    ) -> None:
        """``resampling`` resizes the RGB image (xyz and the valid mask: nearest)."""
        super().__init__(root, category, split, image_size, crop_size, resampling)
        self.preprocess = Preprocess3D.from_option(preprocess)

    def _index(self) -> list[dict[str, Any]]:
        split_dir = self.root / self.category / self.split
        if not split_dir.is_dir():
            raise DatasetLayoutError(f"missing folder {split_dir}; {LAYOUT}")
        items = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            xyz_dir = defect_dir / "xyz"
            if not xyz_dir.is_dir():
                raise DatasetLayoutError(f"missing folder {xyz_dir}; {LAYOUT}")
            for xyz_path in sorted(xyz_dir.glob("*.tif*")):
                rgb_path = defect_dir / "rgb" / f"{xyz_path.stem}.png"
                gt_path = defect_dir / "gt" / f"{xyz_path.stem}.png"
                if not rgb_path.is_file():
                    raise DatasetLayoutError(
                        f"no rgb image for {xyz_path}: expected {rgb_path}; {LAYOUT}"
                    )
                if not gt_path.is_file():
                    if defect != "good":
                        raise DatasetLayoutError(
                            f"no ground truth for {xyz_path}: expected {gt_path}; {LAYOUT}"
                        )
                    gt_path = None
                items.append(
                    {"path": xyz_path, "rgb_path": rgb_path, "gt_path": gt_path, "defect": defect}
                )
        if not items:
            raise DatasetLayoutError(f"no xyz tiffs under {split_dir}; {LAYOUT}")
        return items

    def native_size(self, item: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of an item's organised grid, read from the tiff header only."""
        with tifffile.TiffFile(item["path"]) as tif:
            return tuple(tif.pages[0].shape[:2])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        xyz = torch.from_numpy(read_xyz(item["path"])).permute(2, 0, 1).contiguous()
        native = (xyz.shape[1], xyz.shape[2])
        rgb = read_rgb(item["rgb_path"])
        if tuple(rgb.shape[1:]) != native:
            raise DataError(
                f"rgb image {item['rgb_path']} is {tuple(rgb.shape[1:])} (HxW) but its point "
                f"cloud {item['path']} is {native}; an organised scan and its image must match"
            )
        size, box, roi = input_geometry(native, self.image_size, self.crop_size)
        valid = (xyz != 0).any(0)
        if self.preprocess is not None:  # on the native grid, before any resizing
            grid = xyz.permute(1, 2, 0).numpy()
            valid = torch.from_numpy(
                cached_valid_mask(item["path"], grid, valid.numpy(), self.preprocess)
            )
            xyz = xyz * valid
        xyz = resize_crop(xyz, size, box, "nearest")
        valid = resize_crop(valid[None], size, box, "nearest")[0].bool()
        rgb = resize_rgb(rgb, size, box, self.resampling)
        return {
            "xyz": xyz,
            "valid": valid,
            "rgb": rgb,
            "image": rgb,
            **self.target(item, native, roi),
        }
