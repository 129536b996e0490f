"""MVTec AD 2 (real or generated): train/good, a validation set of good images, a public test set
with ground truth and two private test sets without (scored by MVTec's server only).

The layout is that of MVTec's ``MVTecAD2_public_code_utils/mvtec_ad_2_public_offline.py`` and of
anomalib's ``MVTecAD2Dataset``. The test split serves the validation images too, tagged
``meta["role"] = "validation"`` (their maps choose the segmentation threshold), the public test
images as ``"test_public"`` and, with ``private_sets=True``, the private ones as
``"test_private"`` / ``"test_private_mixed"`` (label 0, empty mask, defect "unknown": their truth is
not public). :class:`bench.evaluation_ad2.AD2Evaluator` routes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .builtin import GeneratedRoot
from .common import DatasetLayoutError, ImageCategoryDataset, list_images, scan_categories
from .registry import env_root, register_dataset

LAYOUT = """expected MVTec AD 2 layout:
  <root>/<scenario>/train/good/<id>.png
  <root>/<scenario>/validation/good/<id>.png
  <root>/<scenario>/test_public/{good,bad}/<id>.png
  <root>/<scenario>/test_public/ground_truth/bad/<id>_mask.png   (255 on anomalous pixels)
  <root>/<scenario>/test_private/<id>.png, <root>/<scenario>/test_private_mixed/<id>.png
  (no ground truth; read only with the loader option private_sets = true)"""

#: the eight scenarios of the release (MVTec's utils.py ``OBJECT_FILE_COUNTER``)
SCENARIOS = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
REQUIRED = ("train/good", "validation/good", "test_public")
PRIVATE_SETS = ("test_private", "test_private_mixed")
GROUND_TRUTH = "ground_truth"


def broken_categories(root: str | Path) -> dict[str, str]:
    """Scenario folders that cannot be loaded, with what each lacks."""
    return scan_categories(Path(root), REQUIRED)[1] if Path(root).is_dir() else {}


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MVTec AD 2 root {root} does not exist; {LAYOUT}")
    found = scan_categories(root, REQUIRED)[0]
    if not found:
        raise DatasetLayoutError(
            f"no scenario under {root} has train/good, validation/good and test_public; {LAYOUT}"
        )
    return found


@register_dataset(
    "builtin_ad2",
    categories=categories,
    default_root=GeneratedRoot("ad2"),
    modalities=("image",),
    broken_categories=broken_categories,
    metrics="mvtec_ad2",
)
@register_dataset(
    "mvtec_ad2",
    categories=categories,
    default_root=env_root("MVTEC_AD2_ROOT", "data/mvtec_ad2"),
    modalities=("image",),
    broken_categories=broken_categories,
    metrics="mvtec_ad2",
    download="mvtec_ad2",
)
class MVTecAD2(ImageCategoryDataset):
    """One scenario and split: "train" (train/good), "validation" (validation/good) or "test"
    (validation/good, then test_public, then with ``private_sets`` the private sets). Items:
    ``image`` float [3,h,w] in [0,1], ``mask`` bool at native size, ``label``, ``roi`` and
    ``meta`` with ``role``."""

    modality = "image"
    splits = ("train", "validation", "test")
    gt_key = "mask_path"

    def __init__(
        self,
        root,
        category: str,
        split: str = "train",
        image_size=256,
        crop_size=None,
        resampling: str = "tensor",
        private_sets: bool = False,
    ) -> None:
        """``private_sets``: the test split also serves test_private and test_private_mixed
        (their maps can only be exported for MVTec's server: ``--export-maps``)."""
        self.private_sets = bool(private_sets)
        super().__init__(root, category, split, image_size, crop_size, resampling)

    def _index(self) -> list[dict[str, Any]]:
        base = self.root / self.category
        if not base.is_dir():
            known = scan_categories(self.root, REQUIRED)[0] if self.root.is_dir() else []
            raise DatasetLayoutError(
                f"MVTec AD 2 has no scenario {self.category!r} under {self.root} (found "
                f"{known}); {LAYOUT}"
            )
        if self.split == "train":
            return self._good(base / "train" / "good", "train")
        items = self._good(base / "validation" / "good", "validation")
        if self.split == "test":
            items += self._public(base / "test_public")
            for name in PRIVATE_SETS if self.private_sets else ():
                items += self._private(base / name, name)
        return items

    def _good(self, folder: Path, role: str) -> list[dict[str, Any]]:
        images = list_images(folder) if folder.is_dir() else []
        if not images:
            raise DatasetLayoutError(f"no images under {folder}; {LAYOUT}")
        return [{"path": p, "defect": "good", "mask_path": None, "role": role} for p in images]

    def _public(self, folder: Path) -> list[dict[str, Any]]:
        """test_public: ``good`` and every defect folder (AD 2 has one, ``bad``), each image
        with its ``ground_truth/<defect>/<id>_mask.png``."""
        if not folder.is_dir():
            raise DatasetLayoutError(f"missing folder {folder}; {LAYOUT}")
        items = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != GROUND_TRUTH):
            for path in list_images(sub):
                mask = None
                if sub.name != "good":
                    mask = folder / GROUND_TRUTH / sub.name / f"{path.stem}_mask.png"
                    if not mask.is_file():
                        raise DatasetLayoutError(
                            f"no ground-truth mask for {path}: expected {mask}; {LAYOUT}"
                        )
                items.append({"path": path, "defect": sub.name, "mask_path": mask})
        if not items:
            raise DatasetLayoutError(f"no images under {folder}; {LAYOUT}")
        used = {it["mask_path"] for it in items}
        orphans = sorted(p for p in folder.glob(f"{GROUND_TRUTH}/*/*_mask.png") if p not in used)
        if orphans:
            self.warnings.append(
                f"{self.category}: {len(orphans)} ground-truth mask(s) of test_public have no "
                f"image, e.g. {orphans[0]}"
            )
        return [{**it, "role": "test_public"} for it in items]

    def _private(self, folder: Path, role: str) -> list[dict[str, Any]]:
        images = list_images(folder) if folder.is_dir() else []
        if not images:
            raise DatasetLayoutError(
                f"no images under {folder} (private_sets = true reads test_private and "
                f"test_private_mixed); {LAYOUT}"
            )
        return [{"path": p, "defect": "unknown", "mask_path": None, "role": role} for p in images]

    def target(
        self, item: dict[str, Any], native: tuple[int, int], roi: torch.Tensor
    ) -> dict[str, Any]:
        """As for MVTec AD, with ``meta["role"]``; private images count as good (label 0, empty
        mask) for the loader's sake, their defect is "unknown"."""
        private = item["role"] in PRIVATE_SETS
        out = super().target({**item, "defect": "good"} if private else item, native, roi)
        out["meta"].update(defect=item["defect"], role=item["role"])
        return out
