"""MVTec AD folders (real or generated): official train/test split, native-size masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import (
    DatasetLayoutError,
    ImageCategoryDataset,
    list_images,
    scan_categories,
)

LAYOUT = """expected MVTec AD layout:
  <root>/<category>/train/good/<id>.png
  <root>/<category>/test/<defect or good>/<id>.png
  <root>/<category>/ground_truth/<defect>/<id>_mask.png"""


REQUIRED = ("train/good", "test")


def broken_categories(root: str | Path) -> dict[str, str]:
    """Category folders that cannot be loaded, with what each lacks."""
    return scan_categories(Path(root), REQUIRED)[1] if Path(root).is_dir() else {}


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MVTec AD root {root} does not exist; {LAYOUT}")
    found = scan_categories(root, REQUIRED)[0]
    if not found:
        raise DatasetLayoutError(f"no category under {root} has a train/good folder; {LAYOUT}")
    return found


class MVTecAD(ImageCategoryDataset):
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
        if self.split == "test":
            self._warn_orphan_masks(items)
        return items

    def _warn_orphan_masks(self, items: list[dict[str, Any]]) -> None:
        """Ground-truth masks that belong to no test image (a missing or renamed image)."""
        gt_dir = self.root / self.category / "ground_truth"
        if not gt_dir.is_dir():
            return
        used = {it["mask_path"] for it in items if it["mask_path"] is not None}
        orphans = sorted(p for p in gt_dir.glob("*/*_mask.png") if p not in used)
        if orphans:
            self.warnings.append(
                f"{self.category}: {len(orphans)} ground-truth mask(s) have no test image, "
                f"e.g. {orphans[0]} (expected {self._image_of(orphans[0])})"
            )

    def _image_of(self, mask: Path) -> Path:
        stem = mask.name.removesuffix("_mask.png")
        return self.root / self.category / "test" / mask.parent.name / f"{stem}.png"
