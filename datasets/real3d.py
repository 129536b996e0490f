"""Real3D-AD / Anomaly-ShapeNet style folders: unorganised point clouds with per-point labels.

Layout (both datasets; the ground-truth folder is ``gt`` in Real3D-AD, ``GT`` in Anomaly-ShapeNet):
  <root>/<category>/train/<id>.pcd          defect-free prototypes / templates
  <root>/<category>/test/<id>_<defect>.pcd  test clouds ("good" or "positive" = defect-free)
  <root>/<category>/gt/<id>_<defect>.txt    one "x y z label" line per point of the test cloud
As in the official Real3D-AD loader, test files whose name holds "temp" are not test clouds, and
a defective cloud's points are read from its ground-truth file (the labelled points are the
evaluated ones). The defect type is the last alphabetic token of the file name that is not a
view suffix (``1_bulge`` -> bulge, ``482_sink_cut`` -> sink, ``ashtray0_bulge2`` -> bulge).
Items hold ``points`` [N,3] float32, ``point_labels`` [N] bool, ``label`` and ``meta``; clouds
keep their own sizes (no batching into one tensor). Every .pcd is checked against its header
(``pcd.py``: a truncated or inconsistent file, or a NaN coordinate, is an error naming it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import DataError

from .common import DatasetLayoutError, scan_categories
from .pcd import check_finite, check_pcd, read_pcd

LAYOUT = """expected Real3D-AD / Anomaly-ShapeNet layout:
  <root>/<category>/train/<id>.pcd
  <root>/<category>/test/<id>_<defect or good>.pcd
  <root>/<category>/gt/<id>_<defect>.txt  (or GT/; lines 'x y z label', one per test point)"""
GOOD = ("good", "positive")
VIEW_SUFFIXES = ("cut", "copy")  # partial-view variants of a test cloud, not defect types


REQUIRED = ("train", "test")


def broken_categories(root: str | Path) -> dict[str, str]:
    """Category folders that cannot be loaded, with what each lacks."""
    return scan_categories(Path(root), REQUIRED)[1] if Path(root).is_dir() else {}


def categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"point-cloud root {root} does not exist; {LAYOUT}")
    found = scan_categories(root, REQUIRED)[0]
    if not found:
        raise DatasetLayoutError(f"no category under {root} has train/ and test/; {LAYOUT}")
    return found


def defect_of(stem: str) -> str:
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", stem)]
    if any(w in GOOD for w in words):
        return "good"
    words = [w for w in words if w not in VIEW_SUFFIXES]
    if not words:
        raise DatasetLayoutError(f"cannot tell the defect type of {stem!r}; {LAYOUT}")
    return words[-1]


def read_labelled_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points [N,3] float32 and labels [N] bool of a ground-truth file of 'x y z label' lines."""
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DataError(f"ground truth {path} is not 'x y z label' lines: {err}") from err
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] != 4:
        raise DataError(
            f"ground truth {path} has {table.shape[0]} rows of {table.shape[-1]} values, "
            "expected one row of 4 values (x y z label) per point"
        )
    if not np.isin(table[:, 3], (0, 1)).all():
        raise DataError(f"ground truth {path}: labels (4th column) must be 0 or 1")
    check_finite(table[:, :3], f"ground truth {path}")
    return table[:, :3].astype(np.float32), table[:, 3] > 0.5


class PointCloudSet:
    """One category and split of a Real3D-AD / Anomaly-ShapeNet style folder."""

    modality = "points"
    splits = ("train", "test")

    def __init__(
        self,
        root,
        category: str,
        split: str = "train",
        image_size: int | None = None,
        crop_size: int | None = None,
    ) -> None:
        """``image_size`` and ``crop_size`` are accepted for a uniform loader signature and
        ignored: clouds are scored at their own resolution, every point of them."""
        if split not in self.splits:
            raise ValueError(f"PointCloudSet split must be one of {self.splits}, got {split!r}")
        self.root, self.category, self.split = Path(root), category, split
        folder = self.root / category / split
        if not folder.is_dir():
            raise DatasetLayoutError(f"missing folder {folder}; {LAYOUT}")
        files = sorted(f for f in folder.glob("*.pcd") if split == "train" or "temp" not in f.name)
        if not files:
            raise DatasetLayoutError(f"no .pcd files under {folder}; {LAYOUT}")
        gt_dir = next(
            (self.root / category / g for g in ("gt", "GT") if (self.root / category / g).is_dir()),
            None,
        )
        self.items = []
        for f in files:
            defect = "good" if split == "train" else defect_of(f.stem)
            gt = None
            if defect != "good":
                gt = None if gt_dir is None else gt_dir / f"{f.stem}.txt"
                if gt is None or not gt.is_file():
                    raise DatasetLayoutError(
                        f"no ground truth for {f}: expected {self.root / category / 'gt' / (f.stem + '.txt')}; {LAYOUT}"
                    )
            self.items.append({"path": f, "gt_path": gt, "defect": defect})

    @property
    def defect_types(self) -> list[str]:
        return sorted({it["defect"] for it in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if item["gt_path"] is None:
            points = read_pcd(item["path"])
            labels = np.zeros(len(points), dtype=bool)
        else:  # the labelled points are scored; the cloud itself must still be whole
            check_pcd(item["path"])
            points, labels = read_labelled_points(item["gt_path"])
        return {
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(labels),
            "label": torch.tensor(int(item["defect"] != "good")),
            "meta": {
                "path": str(item["path"]),
                "category": self.category,
                "defect": item["defect"],
                "split": self.split,
            },
        }
