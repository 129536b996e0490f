"""MVTec AD folders (real or generated): official train/test split, native-size masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .common import (
    DatasetLayoutError,
    input_geometry,
    list_images,
    read_mask,
    read_rgb,
    resize_crop,
)

LAYOUT = """expected MVTec AD layout:
  <root>/<category>/train/good/<id>.png
  <root>/<category>/test/<defect or good>/<id>.png
  <root>/<category>/ground_truth/<defect>/<id>_mask.png"""


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MVTec AD root {root} does not exist; {LAYOUT}")
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise DatasetLayoutError(f"no category under {root} has a train/good folder; {LAYOUT}")
    return found


class MVTecAD(Dataset):
    """One category and split. Items: ``image`` float [3,h,w] in [0,1] (resized, optionally
    centre-cropped), ``mask`` bool at native size, ``label``, ``roi``, ``meta``."""

    modality = "image"

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        image_size: int | tuple[int, int] | None = 256,
        crop_size: int | tuple[int, int] | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"MVTec AD split must be 'train' or 'test', got {split!r}")
        self.root, self.category, self.split = Path(root), category, split
        self.image_size, self.crop_size = image_size, crop_size
        self.items = self._index()

    def _index(self) -> list[dict[str, Any]]:
        base = self.root / self.category
        split_dir = base / self.split
        if not split_dir.is_dir():
            raise DatasetLayoutError(f"missing folder {split_dir}; {LAYOUT}")
        items = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            if self.split == "train" and defect != "good":
                raise DatasetLayoutError(
                    f"unexpected folder {defect_dir}: train holds only 'good'; {LAYOUT}"
                )
            for path in list_images(defect_dir):
                mask_path = None
                if defect != "good":
                    mask_path = base / "ground_truth" / defect / f"{path.stem}_mask.png"
                    if not mask_path.is_file():
                        raise DatasetLayoutError(
                            f"no ground-truth mask for {path}: expected {mask_path}; {LAYOUT}"
                        )
                items.append({"path": path, "defect": defect, "mask_path": mask_path})
        if not items:
            raise DatasetLayoutError(f"no images under {split_dir}; {LAYOUT}")
        return items

    @property
    def defect_types(self) -> list[str]:
        return sorted({it["defect"] for it in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        raw = read_rgb(item["path"])
        native = (raw.shape[1], raw.shape[2])
        size, box, roi = input_geometry(native, self.image_size, self.crop_size)
        image = resize_crop(raw.float() / 255.0, size, box, "bilinear").clamp_(0, 1)
        if item["mask_path"] is None:
            mask = torch.zeros(native, dtype=torch.bool)
        else:
            mask = read_mask(item["mask_path"], native)
        return {
            "image": image,
            "mask": mask,
            "label": torch.tensor(int(item["defect"] != "good")),
            "roi": roi,
            "meta": {
                "path": str(item["path"]),
                "category": self.category,
                "defect": item["defect"],
                "split": self.split,
            },
        }
