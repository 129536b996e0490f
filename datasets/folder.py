"""A user's own folders of images, as anomalib's ``Folder`` data module takes them: normal,
abnormal and mask folders, and a seeded, recorded split of the normal images when no folder of
normal test images is given."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.errors import ConfigError, DataError

from .builtin import GeneratedRoot
from .common import DatasetLayoutError, ImageCategoryDataset, read_mask
from .folder_masks import match_masks, shown_names
from .registry import env_root, register_dataset

LAYOUT = """expected folder layout (options of the dataset entry; each folder relative to <root>
or absolute, one folder or a list; sub-folders are searched too):
  <normal_dir>/<name>.<ext>        normal images: training, and the held-out test normals
  <abnormal_dir>/<name>.<ext>      anomalous test images (defect: the abnormal folder's name)
  <mask_dir>/<name>[_mask].<ext>   one mask per anomalous image, matched by stem (non-zero = anomalous)
  <normal_test_dir>/<name>.<ext>   optional normal test images (else a seeded split of normal_dir)"""

#: anomalib's default (torchvision's ``IMG_EXTENSIONS``); masks are searched with these too
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the folder options, in the order their files are listed
FOLDER_OPTIONS = ("normal_dir", "normal_test_dir", "abnormal_dir", "mask_dir")
#: anomalib's default share of the normal images held out for testing
SPLIT_RATIO = 0.2
#: how many file names an error message lists


def category_name(root: str | Path) -> str:
    """The folder dataset's one category: the name of its root folder."""
    return Path(root).resolve().name or "folder"


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"folder dataset root {root} does not exist; {LAYOUT}")
    return [category_name(root)]


def resolve_folders(value: Any, option: str, root: Path) -> list[Path]:
    """The folders an option names (one or a list, relative to ``root`` or absolute); none for
    None, "", false or []. A folder that does not exist is an error."""
    if value is None or value is False or value == "" or value == []:
        return []
    values = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (str, Path)) and str(v) for v in values
    ):
        raise ConfigError(
            f"folder dataset option {option} must be a folder or a list of folders, got {value!r}"
        )
    folders = []
    for v in values:
        path = Path(v).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            none = "" if option == "normal_dir" else f' (set {option} = "" for none)'
            raise DatasetLayoutError(f"{option} folder {path} does not exist{none}; {LAYOUT}")
        folders.append(path)
    return folders


def check_extensions(value: Any) -> tuple[str, ...]:
    """Lower-case suffixes with their dot ("png" and ".PNG" both give ".png")."""
    if value is None:
        return EXTENSIONS
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"folder dataset option extensions must be a list, got {value!r}")
    if not all(isinstance(v, str) and v.strip(".") for v in values):
        raise ConfigError(f"folder dataset option extensions holds a non-suffix: {value!r}")
    return tuple("." + v.lower().lstrip(".") for v in values)


def scan(folder: Path, extensions: tuple[str, ...], option: str) -> tuple[list[Path], int]:
    """The image files below ``folder`` (sorted, sub-folders included) and how many hidden
    ones (a name or folder starting with ".") were skipped. An empty folder is an error."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file()]
    visible = sorted(
        p for p in found if not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not visible:
        raise DatasetLayoutError(
            f"{option} folder {folder} holds no image with extension {', '.join(extensions)} "
            f"(sub-folders searched too); {LAYOUT}"
        )
    return visible, len(found) - len(visible)


def split_key(path: Path, root: Path, folder: Path) -> str:
    """What the seeded split ranks a normal image by: its path below the root, else below its
    folder's parent (so the split does not depend on where the data lives)."""
    base = root if path.is_relative_to(root) else folder.parent
    return path.relative_to(base).as_posix()


def held_out_keys(keys: list[str], ratio: float, seed: int) -> set[str]:
    """The ``round(ratio * n)`` keys (at least one, never all) that rank first by
    ``sha256("<seed>/<key>")``: deterministic, platform-independent, and adding or removing
    one image moves at most one other between train and test."""
    if ratio == 0:
        return set()
    if len(keys) < 2:
        raise DatasetLayoutError(
            f"normal_dir holds {len(keys)} image(s): too few to hold out a share for testing; "
            "add normal images or give normal_test_dir"
        )
    k = min(max(math.floor(ratio * len(keys) + 0.5), 1), len(keys) - 1)
    ranked = sorted(keys, key=lambda key: hashlib.sha256(f"{seed}/{key}".encode()).digest())
    return set(ranked[:k])


def header_size(path: Path, what: str) -> tuple[int, int]:
    """(H, W) from the file's header; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err


@register_dataset(
    "builtin_folder",
    categories=categories,
    default_root=GeneratedRoot("folder"),
    modalities=("image",),
)
@register_dataset(
    "folder",
    categories=categories,
    default_root=env_root("FOLDER_ROOT", "data/folder"),
    modalities=("image",),
)
class FolderDataset(ImageCategoryDataset):
    """A user's folders as one category (named after the root folder). Train: the normal
    images not held out. Test: the held-out normal images (or those of ``normal_test_dir``),
    defect "good", and the abnormal images, defect = their folder's name, with their masks at
    native size (empty without ``mask_dir``: image-level metrics only). ``held_out`` lists the
    normal images of the seeded split (paths below the root); a test sample's
    ``meta["held_out"]`` says whether it is one of them."""

    modality = "image"
    splits = ("train", "test")
    gt_key = "mask_path"

    def __init__(
        self,
        root,
        category: str,
        split: str = "train",
        image_size=256,
        crop_size=None,
        resampling: str = "tensor",
        *,
        normal_dir: Any = "normal",
        abnormal_dir: Any = "abnormal",
        mask_dir: Any = "masks",
        normal_test_dir: Any = None,
        normal_split_ratio: float | None = None,
        test_split_ratio: float | None = None,
        extensions: Any = None,
        seed: int = 0,
    ) -> None:
        """Folder options as anomalib's ``Folder`` takes them; ``test_split_ratio`` (the
        ratio anomalib's data module applies) is an alias of ``normal_split_ratio``."""
        self.folders = {
            "normal_dir": normal_dir,
            "normal_test_dir": normal_test_dir,
            "abnormal_dir": abnormal_dir,
            "mask_dir": mask_dir,
        }
        self.split_ratio = _ratio(normal_split_ratio, test_split_ratio)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"folder dataset option seed must be an integer, got {seed!r}")
        self.seed, self.extensions = seed, check_extensions(extensions)
        #: the normal images held out for testing (paths below the root), sorted
        self.held_out: list[str] = []
        super().__init__(root, category, split, image_size, crop_size, resampling)

    @property
    def split_record(self) -> dict[str, Any]:
        """How the test normals were chosen, for the job record."""
        if self.dirs["normal_test_dir"]:
            return {"normal_test_dir": [str(d) for d in self.dirs["normal_test_dir"]]}
        return {
            "normal_split_ratio": self.split_ratio,
            "seed": self.seed,
            "held_out": self.held_out,
        }

    def _index(self) -> list[dict[str, Any]]:
        categories(self.root)
        if self.category != category_name(self.root):
            raise DatasetLayoutError(
                f"the folder dataset at {self.root} has one category, "
                f"{category_name(self.root)!r} (its folder's name), not {self.category!r}"
            )
        self.dirs = {o: resolve_folders(v, o, self.root) for o, v in self.folders.items()}
        if not self.dirs["normal_dir"]:
            raise ConfigError("folder dataset option normal_dir is required; " + LAYOUT)
        files = self._scan_all()
        items = self._normal_items(files)
        if self.split == "test":
            items += self._abnormal_items(files)
        for item in items:
            item["native"] = header_size(item["path"], "image")
            if item["mask_path"] is not None:
                self._check_mask_size(item)
        return items

    def _scan_all(self) -> dict[str, list[tuple[Path, Path]]]:
        """(file, its folder) per option; a file listed under two options is an error."""
        files: dict[str, list[tuple[Path, Path]]] = {}
        owner: dict[Path, str] = {}
        for option, folders in self.dirs.items():
            extensions = EXTENSIONS if option == "mask_dir" else self.extensions
            files[option] = []
            for folder in folders:
                found, hidden = scan(folder, extensions, option)
                if hidden:
                    self.warnings.append(f"{folder}: skipped {hidden} hidden image file(s)")
                for path in found:
                    key = path.resolve()
                    if owner.get(key) == option:  # listed twice by one option's folders
                        continue
                    if key in owner:
                        raise DatasetLayoutError(
                            f"{path} is both in {owner[key]} and in {option}: the folders "
                            f"overlap; point each option at its own folder; {LAYOUT}"
                        )
                    owner[key] = option
                    files[option].append((path, folder))
        return files

    def _normal_items(self, files) -> list[dict[str, Any]]:
        normals = files["normal_dir"]
        held: set[Path] = set()
        if not self.dirs["normal_test_dir"]:
            keys = {split_key(p, self.root, f): p for p, f in normals}
            held = {keys[k] for k in held_out_keys(sorted(keys), self.split_ratio, self.seed)}
        self.held_out = sorted(self._relative(p) for p in held)
        if self.split == "train":
            chosen = [p for p, _ in normals if p not in held]
        else:
            chosen = [p for p, _ in normals if p in held] + [p for p, _ in files["normal_test_dir"]]
            if not chosen:
                self.warnings.append(
                    f"{self.category}: no normal test image (normal_split_ratio is 0 and no "
                    "normal_test_dir): image metrics are undefined"
                )
        return [
            {"path": p, "defect": "good", "mask_path": None, "held_out": p in held} for p in chosen
        ]

    def _abnormal_items(self, files) -> list[dict[str, Any]]:
        abnormal = files["abnormal_dir"]
        masks = [p for p, _ in files["mask_dir"]]
        if not abnormal:
            self.warnings.append(f"{self.category}: no abnormal_dir: no anomalous test image")
            return []
        if masks:
            where = (
                f"abnormal_dir {shown_names(self.dirs['abnormal_dir'])}, "
                f"mask_dir {shown_names(self.dirs['mask_dir'])}"
            )
            pairs = match_masks([p for p, _ in abnormal], masks, where)
            lossy = [m for m in masks if m.suffix.lower() in (".jpg", ".jpeg", ".webp")]
            if lossy:
                self.warnings.append(
                    f"{self.category}: {len(lossy)} mask(s) are lossy ({lossy[0].name}, ...): "
                    "every non-zero pixel counts as anomalous, compression noise included"
                )
        else:
            pairs = {}
            self.warnings.append(
                f"{self.category}: no mask_dir: anomalous images have empty masks, so the pixel "
                "metrics are undefined (NaN); image-level metrics only"
            )
        return [
            {
                "path": p,
                "defect": _defect_name(folder),
                "mask_path": pairs.get(p),
                "held_out": False,
            }
            for p, folder in abnormal
        ]

    def _relative(self, path: Path) -> str:
        inside = path.is_relative_to(self.root)
        return (path.relative_to(self.root) if inside else path).as_posix()

    def _check_mask_size(self, item: dict[str, Any], size: tuple[int, int] | None = None) -> None:
        size = size or header_size(item["mask_path"], "ground-truth mask")
        if tuple(size) != tuple(item["native"]):
            raise DataError(
                f"ground-truth mask {item['mask_path']} is {size[0]}x{size[1]} (HxW) but its "
                f"image {item['path']} is {item['native'][0]}x{item['native'][1]}"
            )

    def native_size(self, item: dict[str, Any]) -> tuple[int, int]:
        return item["native"]

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        out = super().target({**item, "mask_path": None}, native, roi)
        if item["mask_path"] is not None:
            out["mask"] = read_mask(item["mask_path"])
            self._check_mask_size({**item, "native": native}, tuple(out["mask"].shape))
        if self.split == "test":
            out["meta"]["held_out"] = item["held_out"]
        return out


def _ratio(normal_split_ratio: float | None, test_split_ratio: float | None) -> float:
    given = {
        k: v
        for k, v in (
            ("normal_split_ratio", normal_split_ratio),
            ("test_split_ratio", test_split_ratio),
        )
        if v is not None
    }
    if len(set(given.values())) > 1:
        raise ConfigError(f"folder dataset options {given} disagree: give one of them")
    ratio = next(iter(given.values()), SPLIT_RATIO)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(
            f"folder dataset option {next(iter(given), 'normal_split_ratio')} must be a number "
            f"in [0, 1), got {ratio!r}"
        )
    return float(ratio)


def _defect_name(folder: Path) -> str:
    """An abnormal folder's defect name ("anomaly" where it would be "good", which is reserved
    for normal images)."""
    name = folder.resolve().name
    return "anomaly" if name in ("", "good") else name
