"""BTAD (beanTech, real or generated) and MPDD (MVTec AD's layout, read by :class:`MVTecAD`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError

from . import mvtec_ad
from .builtin import GeneratedRoot
from .common import (
    DatasetLayoutError,
    ImageCategoryDataset,
    list_images,
    mask_of_image,
    scan_categories,
)
from .mvtec_ad import MVTecAD
from .registry import env_root, register_dataset

LAYOUT = """expected BTAD layout (the release's BTech_Dataset_transformed folder):
  <root>/<01|02|03>/train/ok/<id>.{bmp,png}
  <root>/<category>/test/{ok,ko}/<id>.{bmp,png}
  <root>/<category>/ground_truth/ko/<id>.{png,bmp}   (mask of test/ko/<id>; white = anomalous)"""

REQUIRED = ("train/ok", "test")
#: the folders of each split: "ok" images are normal (defect "good"), "ko" anomalous
FOLDERS = {"train": ("ok",), "test": ("ok", "ko")}
#: mask suffixes by preference: 01 and 02 store png masks, 03 bmp ones
MASK_SUFFIXES = (".png", ".bmp")


def broken_categories(root: str | Path) -> dict[str, str]:
    """Category folders that cannot be loaded, with what each lacks."""
    return scan_categories(Path(root), REQUIRED)[1] if Path(root).is_dir() else {}


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"BTAD root {root} does not exist; {LAYOUT}")
    found = scan_categories(root, REQUIRED)[0]
    if not found:
        raise DatasetLayoutError(f"no category under {root} has a train/ok folder; {LAYOUT}")
    return found


def read_white_mask(path: Path, shape: tuple[int, int], image: Path) -> torch.Tensor:
    """bool [H,W]: the white pixels (255 once converted to grey) are anomalous, as anomalib's
    loader reads BTAD masks (its ``read_mask`` keeps ``value / 255`` as uint8)."""
    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) == 255
    except Exception as err:
        raise DataError(f"cannot read ground-truth mask {path}: {err}") from err
    return mask_of_image(mask, path, shape, image)


@register_dataset(
    "builtin_btad",
    categories=categories,
    default_root=GeneratedRoot("btad"),
    modalities=("image",),
    broken_categories=broken_categories,
)
@register_dataset(
    "btad",
    categories=categories,
    default_root=env_root("BTAD_ROOT", "data/btad"),
    modalities=("image",),
    broken_categories=broken_categories,
    download="btad",
)
class BTAD(ImageCategoryDataset):
    """One category and split of BTAD. Items: ``image`` float [3,h,w] in [0,1] (resized,
    optionally centre-cropped), ``mask`` bool at native size, ``label``, ``roi``, ``meta``;
    defect "good" for ``ok`` images, "ko" for the anomalous ones."""

    modality = "image"
    splits = ("train", "test")
    gt_key = "mask_path"

    def _index(self) -> list[dict[str, Any]]:
        split_dir = self.root / self.category / self.split
        if not split_dir.is_dir():
            raise DatasetLayoutError(f"missing folder {split_dir}; {LAYOUT}")
        items = []
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if folder.name not in FOLDERS[self.split]:
                raise DatasetLayoutError(
                    f"unexpected folder {folder}: {self.split} holds only "
                    f"{' and '.join(FOLDERS[self.split])}; {LAYOUT}"
                )
            for path in list_images(folder):
                ko = folder.name == "ko"
                mask = self._mask_of(path) if ko else None
                items.append({"path": path, "defect": "ko" if ko else "good", "mask_path": mask})
        if not items:
            raise DatasetLayoutError(f"no images under {split_dir}; {LAYOUT}")
        return items

    def _mask_of(self, image: Path) -> Path:
        gt = self.root / self.category / "ground_truth" / "ko"
        found = [
            gt / f"{image.stem}{s}" for s in MASK_SUFFIXES if (gt / f"{image.stem}{s}").is_file()
        ]
        if not found:
            raise DatasetLayoutError(
                f"no ground-truth mask for {image}: expected {gt / image.stem}.png or .bmp; {LAYOUT}"
            )
        return found[0]

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        out = super().target({**item, "mask_path": None}, native, roi)
        if item["mask_path"] is not None:
            out["mask"] = read_white_mask(item["mask_path"], native, item["path"])
        return out


# MPDD: MVTec AD's layout (<category>/{train/good, test/<defect>, ground_truth/<defect>/<id>_mask.png})
for _name, _root, _download in (
    ("mpdd", env_root("MPDD_ROOT", "data/mpdd"), "mpdd"),
    ("builtin_mpdd", GeneratedRoot("mpdd"), None),
):
    register_dataset(
        _name,
        categories=mvtec_ad.categories,
        default_root=_root,
        modalities=("image",),
        broken_categories=mvtec_ad.broken_categories,
        download=_download,
    )(MVTecAD)
