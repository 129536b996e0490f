"""Shared helpers of the loaders: reading files with errors that name them, resize and crop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from bench.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetLayoutError(DataError, FileNotFoundError):
    """A dataset folder is missing or does not have the expected layout."""


def read_rgb(path: Path) -> torch.Tensor:
    """uint8 [3,H,W]; grayscale images are expanded to three channels."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_mask(path: Path, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """bool [H,W]; any non-zero pixel is anomalous."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L")) > 0
    except Exception as err:
        raise DataError(f"cannot read ground-truth mask {path}: {err}") from err
    if shape is not None and array.shape != tuple(shape):
        raise DataError(f"ground-truth mask {path} is {array.shape}, expected {tuple(shape)}")
    return torch.from_numpy(array.copy())


def mask_of_image(
    mask: np.ndarray, path: Path, shape: tuple[int, int], image: Path
) -> torch.Tensor:
    """bool [H,W] ``mask`` read from ``path``, checked to have its image's size ``shape``."""
    if mask.shape != tuple(shape):
        raise DataError(
            f"ground-truth mask {path} is {mask.shape}, expected {tuple(shape)} as its image {image}"
        )
    return torch.from_numpy(np.ascontiguousarray(mask))


#: sub-folders that make a folder of a dataset root look like a category
CATEGORY_MARKERS = ("train", "test", "ground_truth", "validation", "gt", "GT")


def scan_categories(root: Path, required: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(loadable categories, {broken category: what it lacks}) of a dataset root: a folder
    with any of ``CATEGORY_MARKERS`` is a category, loadable when it has every ``required``
    sub-folder."""
    found, broken = [], {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        if not any((folder / m).is_dir() for m in CATEGORY_MARKERS):
            continue
        missing = [r for r in required if not (folder / r).is_dir()]
        if missing:
            broken[folder.name] = f"{folder} has no {' and no '.join(missing)} folder"
        else:
            found.append(folder.name)
    return found, broken


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _pair(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def input_geometry(
    native: tuple[int, int], image_size, crop_size
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None, torch.Tensor]:
    """Resized size, crop box in resized pixels (or None), and the ROI in native pixels."""
    h0, w0 = native
    size = _pair(image_size) or (h0, w0)
    crop = _pair(crop_size)
    if crop is None or crop == size:
        return size, None, torch.tensor([0, 0, h0, w0])
    if crop[0] > size[0] or crop[1] > size[1]:
        raise ConfigError(f"crop_size {crop} is larger than image_size {size}")
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    box = (top, left, top + crop[0], left + crop[1])
    sy, sx = h0 / size[0], w0 / size[1]
    roi = torch.tensor(
        [round(box[0] * sy), round(box[1] * sx), round(box[2] * sy), round(box[3] * sx)]
    )
    return size, box, roi


#: how a loader resizes a decoded 8-bit RGB image (a detector's ``resampling``): "tensor" =
#: antialiased bilinear on the float image (torch); "pil-bilinear" / "pil-bicubic" = PIL's resize of
#: the uint8 image with that filter (its own antialiasing, uint8 output), as torchvision's Resize
#: does on a PIL image in the official Dinomaly, PatchCore and DictAS loaders
RESAMPLINGS = ("tensor", "pil-bilinear", "pil-bicubic")
_PIL_FILTERS = {"pil-bilinear": Image.Resampling.BILINEAR, "pil-bicubic": Image.Resampling.BICUBIC}


def check_resampling(resampling: str) -> str:
    if resampling not in RESAMPLINGS:
        raise ConfigError(f"resampling must be one of {RESAMPLINGS}, got {resampling!r}")
    return resampling


def resize_rgb(raw: torch.Tensor, size: tuple[int, int], box, resampling: str) -> torch.Tensor:
    """uint8 [3,H,W] -> float [3,h,w] in [0,1]: resized to ``size`` by ``resampling`` (one of
    ``RESAMPLINGS``), then ``box`` cropped."""
    if check_resampling(resampling) == "tensor" or tuple(raw.shape[-2:]) == size:
        return resize_crop(raw.float() / 255.0, size, box, "bilinear").clamp_(0, 1)
    image = Image.fromarray(raw.permute(1, 2, 0).numpy())
    image = image.resize((size[1], size[0]), _PIL_FILTERS[resampling])
    resized = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return resize_crop(resized.float() / 255.0, size, box, "bilinear")  # crops only


def resize_crop(x: torch.Tensor, size: tuple[int, int], box, mode: str) -> torch.Tensor:
    """Resizes [C,H,W] to ``size`` (bilinear with antialias, or nearest) and crops ``box``."""
    if tuple(x.shape[-2:]) != size:
        if mode == "nearest":
            x = F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)
        else:
            x = F.interpolate(
                x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )[0]
    if box is not None:
        x = x[..., box[0] : box[2], box[1] : box[3]]
    return x


class CategoryDataset(Dataset):
    """One category and split of an MVTec-style folder; subclasses index ``items`` (dicts with at
    least "path", "defect" and the ground-truth path under ``gt_key``) and load the inputs."""

    modality = "image"
    splits: tuple[str, ...] = ("train", "test")
    gt_key = "gt_path"

    def __init__(
        self,
        root,
        category: str,
        split: str = "train",
        image_size=256,
        crop_size=None,
        resampling: str = "tensor",
    ) -> None:
        """``resampling``: how RGB images are resized (one of ``RESAMPLINGS``)."""
        if split not in self.splits:
            raise ValueError(
                f"{type(self).__name__} split must be one of {self.splits}, got {split!r}"
            )
        self.root, self.category, self.split = Path(root), category, split
        self.image_size, self.crop_size = image_size, crop_size
        self.resampling = check_resampling(resampling)
        #: problems found while indexing that do not stop a run (shown and recorded per job)
        self.warnings: list[str] = []
        self.items = self._index()

    def _index(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    @property
    def defect_types(self) -> list[str]:
        return sorted({it["defect"] for it in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        """Mask at native size (empty for good samples), label, ROI and metadata of ``item``."""
        gt = item[self.gt_key]
        return {
            "mask": torch.zeros(native, dtype=torch.bool) if gt is None else read_mask(gt, native),
            "label": torch.tensor(int(item["defect"] != "good")),
            "roi": roi,
            "meta": {
                "path": str(item["path"]),
                "category": self.category,
                "defect": item["defect"],
                "split": self.split,
            },
        }


class ImageCategoryDataset(CategoryDataset):
    """A category of RGB images: ``image`` float [3,h,w] in [0,1] (resized by ``resampling``,
    optionally centre-cropped) with the target of :meth:`CategoryDataset.target`."""

    def native_size(self, item: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of an item's image, read from the file header only."""
        with Image.open(item["path"]) as img:
            return img.size[1], img.size[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        raw = read_rgb(item["path"])
        native = (raw.shape[1], raw.shape[2])
        size, box, roi = input_geometry(native, self.image_size, self.crop_size)
        image = resize_rgb(raw, size, box, self.resampling)
        return {"image": image, **self.target(item, native, roi)}
