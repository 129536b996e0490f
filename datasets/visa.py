"""VisA (real or generated): the official ``split_csv/1cls.csv`` split, native-size masks."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError

from .builtin import GeneratedRoot
from .common import DatasetLayoutError, ImageCategoryDataset, mask_of_image
from .registry import env_root, register_dataset

LAYOUT = """expected VisA layout (the official release with its split file):
  <root>/split_csv/1cls.csv   header object,split,label,image,mask; paths relative to <root>
  <root>/<object>/Data/Images/Normal/<id>.JPG
  <root>/<object>/Data/Images/Anomaly/<id>.JPG
  <root>/<object>/Data/Masks/Anomaly/<id>.png   (any non-zero pixel is anomalous)"""

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = ("train", "test")
LABELS = ("normal", "anomaly")


@dataclass(frozen=True)
class Row:
    """One row of the split file; ``line`` is its line number in the file (header: 1)."""

    line: int
    object: str
    split: str
    label: str
    image: str
    mask: str


def read_split(root: str | Path) -> list[Row]:
    """The rows of ``<root>/split_csv/1cls.csv``, checked for header, split and label."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"VisA root {root} does not exist; {LAYOUT}")
    path = root / SPLIT_CSV
    if not path.is_file():
        raise DatasetLayoutError(f"VisA split file {path} is missing; {LAYOUT}")
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DatasetLayoutError(
                f"{path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
                f"expected the columns {','.join(COLUMNS)}; {LAYOUT}"
            )
        at = [header.index(c) for c in COLUMNS]
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            values = [v.strip() for v in values] + [""] * (len(header) - len(values))
            row = Row(reader.line_num, *(values[i] for i in at))
            if row.split not in SPLITS:
                raise DatasetLayoutError(
                    f"{path} row {row.line}: split {row.split!r} is not one of {SPLITS}; {LAYOUT}"
                )
            if row.label not in LABELS:
                raise DatasetLayoutError(
                    f"{path} row {row.line}: label {row.label!r} is not one of {LABELS}; {LAYOUT}"
                )
            rows.append(row)
    return rows


def broken_categories(root: str | Path) -> dict[str, str]:
    """Categories of the split file whose ``<root>/<category>/Data/Images`` folder is missing."""
    try:
        rows = read_split(root)
    except DatasetLayoutError:  # categories() names the problem
        return {}
    images = {c: Path(root) / c / "Data" / "Images" for c in sorted({r.object for r in rows})}
    return {
        c: f"{folder} is missing (listed in {Path(root) / SPLIT_CSV})"
        for c, folder in images.items()
        if not folder.is_dir()
    }


def categories(root: str | Path) -> list[str]:
    """The split file's categories (sorted) that have their image folder."""
    rows = read_split(root)
    found = sorted({r.object for r in rows} - set(broken_categories(root)))
    if not found:
        raise DatasetLayoutError(f"{Path(root) / SPLIT_CSV} lists no loadable category; {LAYOUT}")
    return found


def read_nonzero_mask(path: Path, shape: tuple[int, int], image: Path) -> torch.Tensor:
    """bool [H,W]: every non-zero value is anomalous (VisA masks store small integers; of a
    palette image the index counts, of an image with alpha the colour channels)."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
            alpha = img.mode.endswith("A")
    except Exception as err:
        raise DataError(f"cannot read ground-truth mask {path}: {err}") from err
    if array.ndim == 3:
        array = (array[..., :-1] if alpha else array).any(axis=2)
    mask = array != 0
    return mask_of_image(mask, path, shape, image)


@register_dataset(
    "builtin_visa",
    categories=categories,
    default_root=GeneratedRoot("visa"),
    modalities=("image",),
    broken_categories=broken_categories,
)
@register_dataset(
    "visa",
    categories=categories,
    default_root=env_root("VISA_ROOT", "data/visa"),
    modalities=("image",),
    broken_categories=broken_categories,
    download="visa",
)
class VisA(ImageCategoryDataset):
    """One category and split of VisA's ``1cls`` split. Items: ``image`` float [3,h,w] in [0,1]
    (resized, optionally centre-cropped), ``mask`` bool at native size, ``label``, ``roi``,
    ``meta``; defect "good" for normal images, "anomaly" for the others."""

    modality = "image"
    splits = SPLITS
    gt_key = "mask_path"

    def _index(self) -> list[dict[str, Any]]:
        rows = read_split(self.root)
        csv_path = self.root / SPLIT_CSV
        mine = [r for r in rows if r.object == self.category]
        if not mine:
            known = sorted({r.object for r in rows})
            raise DatasetLayoutError(
                f"VisA has no category {self.category!r}: {csv_path} lists {known}; {LAYOUT}"
            )
        items = []
        for row in (r for r in mine if r.split == self.split):
            where = f"{csv_path} row {row.line}"
            image = self.root / row.image
            if not row.image or not image.is_file():
                raise DatasetLayoutError(f"{where}: image {image} does not exist; {LAYOUT}")
            mask = None
            if row.label == "anomaly":
                if row.split == "train":
                    raise DatasetLayoutError(
                        f"{where}: train holds only normal images, {image} is labelled anomaly"
                    )
                if not row.mask:
                    raise DatasetLayoutError(
                        f"{where}: anomaly image {image} has no mask (the mask column is empty); "
                        f"{LAYOUT}"
                    )
                mask = self.root / row.mask
                if not mask.is_file():
                    raise DatasetLayoutError(
                        f"{where}: mask {mask} of anomaly image {image} does not exist; {LAYOUT}"
                    )
            defect = "good" if mask is None else "anomaly"
            items.append({"path": image, "defect": defect, "mask_path": mask, "row": row.line})
        if not items:
            raise DatasetLayoutError(
                f"{csv_path} lists no {self.split} image of {self.category!r}; {LAYOUT}"
            )
        return items

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        out = super().target({**item, "mask_path": None}, native, roi)
        if item["mask_path"] is not None:
            out["mask"] = read_nonzero_mask(item["mask_path"], native, item["path"])
        return out
