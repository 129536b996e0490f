"""MVTec AD folders (real or generated): official train/test split, native-size masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from .common import (
    CategoryDataset,
    DatasetLayoutError,
    input_geometry,
    list_images,
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


class MVTecAD(CategoryDataset):
    """One category and split. Items: ``image`` float [3,h,w] in [0,1] (resized, optionally
    centre-cropped), ``mask`` bool at native size, ``label``, ``roi``, ``meta``."""

    modality = "image"
    splits = ("train", "test")
    gt_key = "mask_path"

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

    def native_size(self, item: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of an item's image, read from the file header only."""
        with Image.open(item["path"]) as img:
            return img.size[1], img.size[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        raw = read_rgb(item["path"])
        native = (raw.shape[1], raw.shape[2])
        size, box, roi = input_geometry(native, self.image_size, self.crop_size)
        image = resize_crop(raw.float() / 255.0, size, box, "bilinear").clamp_(0, 1)
        return {"image": image, **self.target(item, native, roi)}
