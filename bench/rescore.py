"""Re-score anomaly maps stored in the official layout, written by this harness or any other code.

Maps: ``<maps>/<category>/test/<defect>/<id>.tiff`` (one float map per test image, finite; at the
ground truth's size, or at another size of the same aspect ratio, then resized bilinearly to it
with a warning). ``<maps>/<category>/crop.json`` (written by a cropped export) restricts the
scoring to a region of each image (protocol ``official-cropped``). Image scores are each map's
maximum (in that region), or come from CSV files with columns ``category, defect, id, score``:
one row per test image of the evaluated categories, each score a finite number. Unorganised clouds
(Real3D-AD / Anomaly-ShapeNet layout): ``<maps>/<category>/test/<defect>/<id>.txt``, one score
per point in the order of the cloud's ground truth (of its .pcd for good clouds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
import torch.nn.functional as F

from bench.datasets import MVTec3D, MVTecAD, PointCloudSet, mvtec_3d, mvtec_ad, real3d
from bench.errors import ConfigError, DataError
from bench.evaluation import CROP_FILE, Evaluator, PointEvaluator, export_path
from bench.types import Batch, Prediction

SCORE_COLUMNS = ("category", "defect", "id", "score")
Key = tuple[str, str, str]


def dataset_kind(root: Path) -> str:
    """ "mvtec_3d" when the categories hold xyz folders, "points" when their test folders hold
    .pcd clouds, else "mvtec_ad"."""
    try:
        mvtec_3d.categories(root)
        return "mvtec_3d"
    except FileNotFoundError:
        pass
    try:
        if any(any((root / c / "test").glob("*.pcd")) for c in real3d.categories(root)):
            return "points"
    except FileNotFoundError:
        pass
    mvtec_ad.categories(root)  # raises with the expected layout when none fits
    return "mvtec_ad"


def _categories(kind: str, root: Path) -> list[str]:
    return {"mvtec_3d": mvtec_3d, "points": real3d, "mvtec_ad": mvtec_ad}[kind].categories(root)


def read_point_scores(path: Path, n: int) -> torch.Tensor:
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as err:
        raise DataError(f"cannot read point scores {path}: {err}") from err
    if values.ndim != 1 or len(values) != n:
        raise DataError(
            f"point scores {path} hold {values.size} values, expected one per line for each of "
            f"the cloud's {n} points"
        )
    _check_finite(values, path, "point scores")
    return torch.from_numpy(values.astype(np.float32))


def read_map(path: Path) -> torch.Tensor:
    try:
        array = tifffile.imread(path)
    except Exception as err:
        raise DataError(f"cannot read anomaly map {path}: {err}") from err
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DataError(f"anomaly map {path} has shape {array.shape}, expected a 2-D map")
    _check_finite(array, path, "anomaly map")
    return torch.from_numpy(array.astype(np.float32))


def _check_finite(values: np.ndarray, path: Path, what: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DataError(
            f"{what} {path} has NaN or infinite values ({bad} of {values.size}); expected finite scores"
        )


def read_scores(paths: list[str | Path]) -> dict[Key, tuple[float, str]]:
    """``{(category, defect, id): (score, "<file>, line <n>")}``; a duplicated row or a score
    that is not a finite number is an error naming the file and line."""
    scores: dict[Key, tuple[float, str]] = {}
    for path in paths:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
        missing = [c for c in SCORE_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(
                f"scores file {path} lacks column(s) {missing}; expected {list(SCORE_COLUMNS)}"
            )
        for line, row in enumerate(frame[list(SCORE_COLUMNS)].itertuples(index=False), start=2):
            if not any(row):
                continue  # a blank line
            key, where = (row.category, row.defect, row.id), f"scores file {path}, line {line}"
            if key in scores:
                raise DataError(
                    f"{where}: row ({', '.join(key)}) repeats the one at {scores[key][1]}; "
                    "expected one row per test image"
                )
            scores[key] = (_score(row.score, where), f"{path}, line {line}")
    return scores


def _score(raw: str, where: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: score {raw!r} is not a finite number")
    return value


def _check_known(
    scores: dict[Key, tuple[float, str]],
    known: set[Key],
    categories: list[str],
    others: list[str],
):
    """Every row of the scores file(s) names a test image of the evaluated categories (rows of
    the dataset's ``others`` categories, not evaluated now, are passed over: one file may hold
    every category)."""
    for key, (_, where) in scores.items():
        if key not in known and key[0] not in others:
            raise DataError(
                f"scores file {where}: row ({', '.join(key)}) matches no test image of the "
                f"evaluated categories {categories}"
            )


def _test_keys(kind: str, root: Path, category: str) -> set[Key]:
    if kind == "points":
        items = PointCloudSet(root, category, "test").items
    else:
        items = (MVTec3D if kind == "mvtec_3d" else MVTecAD)(
            root, category, "test", image_size=None
        ).items
    return {(category, it["defect"], Path(it["path"]).stem) for it in items}


def _image_score(scores: dict | None, key: Key, amap: torch.Tensor) -> float:
    if scores is None:
        return float(amap.max())
    if key not in scores:
        raise DataError(f"category {key[0]}: no score for {key} in the scores file(s)")
    return scores[key][0]


def read_crop(maps: Path, category: str) -> dict | None:
    """The crop record ``<maps>/<category>/crop.json`` of a cropped export, or None."""
    path = maps / category / CROP_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read crop record {path}: {err}") from err
    valid = isinstance(record, dict) and isinstance(record.get("rois", {}), dict)
    if not valid or ("roi" in record) == ("rois" in record):
        raise DataError(
            f'crop record {path} must hold either "roi": [y0, x0, y1, x1] or '
            '"rois": {"<defect>/<id>": [y0, x0, y1, x1], ...}'
        )
    return {**record, "path": path}


def roi_of(crop: dict | None, defect: str, stem: str, native: tuple[int, int]) -> torch.Tensor:
    """The scored region [y0, x0, y1, x1] (native pixels) of one test image."""
    if crop is None:
        return torch.tensor([0, 0, native[0], native[1]])
    roi = crop["roi"] if "roi" in crop else crop["rois"].get(f"{defect}/{stem}")
    if roi is None:
        raise DataError(f"crop record {crop['path']} has no ROI for {defect}/{stem}")
    ok = isinstance(roi, list) and len(roi) == 4 and all(isinstance(v, int) for v in roi)
    if not ok or not (0 <= roi[0] < roi[2] <= native[0] and 0 <= roi[1] < roi[3] <= native[1]):
        raise DataError(
            f"crop record {crop['path']}: ROI {roi} of {defect}/{stem} is not [y0, x0, y1, x1] "
            f"inside its {native[0]}x{native[1]} ground truth"
        )
    return torch.tensor(roi)


def check_geometry(amap: torch.Tensor, native: tuple[int, int], path: Path) -> bool:
    """True when the map must be resized to its ground truth; an error when its aspect ratio
    differs (by more than 1 px of rounding on a side)."""
    (h, w), (gh, gw) = amap.shape, native
    if (h, w) == (gh, gw):
        return False
    if abs(w - h * gw / gh) > 1 and abs(h - w * gh / gw) > 1:
        raise DataError(
            f"anomaly map {path} is {h}x{w} (HxW) but its ground truth is {gh}x{gw}: another "
            "aspect ratio; expected the ground truth's size or a rescale of it"
        )
    return True


def _crop_map(amap: torch.Tensor, roi: torch.Tensor, native: tuple[int, int]) -> torch.Tensor:
    """The map's ROI in the native frame (resized there bilinearly first, as the evaluator would)."""
    y0, x0, y1, x1 = (int(v) for v in roi)
    if (y0, x0, y1, x1) == (0, 0, *native):
        return amap
    if tuple(amap.shape) != native:
        amap = F.interpolate(amap[None, None], size=native, mode="bilinear", align_corners=False)
        amap = amap[0, 0]
    return amap[y0:y1, x0:x1]


def _resize_warning(category: str, resized: list[str], n: int) -> list[str]:
    if not resized:
        return []
    return [
        f"category {category}: {len(resized)} of {n} anomaly maps are not at their ground "
        f"truth's size and were resized bilinearly to it (same aspect ratio), e.g. {resized[0]}"
    ]


def _check_complete(maps: Path, category: str, expected: set, missing: list, n: int, points: bool):
    """Every test sample has its file and every file its sample."""
    sample, file = ("clouds", "point-score file") if points else ("images", "anomaly map")
    if missing:
        raise FileNotFoundError(
            f"category {category}: {len(missing)} of {n} test {sample} have no {file}, e.g. {missing[:3]}"
        )
    found = {
        p.resolve() for p in (maps / category / "test").glob("*/*.txt" if points else "*/*.tif*")
    }
    extra = sorted(str(p) for p in found - expected)
    if extra:
        raise DataError(
            f"category {category}: {len(extra)} {file}(s) match no test {sample[:-1]}, e.g. {extra[:3]}"
        )


def evaluate_point_category(
    maps: Path, root: Path, category: str, scores: dict | None, device: str = "cpu"
) -> dict:
    """Object- and point-level metrics of per-point score files for one category."""
    dataset = PointCloudSet(root, category, "test")
    evaluator = PointEvaluator()
    expected, missing = set(), []
    for index, item in enumerate(dataset.items):
        meta = {"path": str(item["path"]), "category": category, "defect": item["defect"]}
        path = export_path(maps, meta).with_suffix(".txt")
        expected.add(path.resolve())
        if not path.is_file():
            missing.append(str(path))
            continue
        sample = dataset[index]
        point = read_point_scores(path, len(sample["point_labels"])).to(device)
        score = _image_score(scores, (category, item["defect"], path.stem), point)
        batch = Batch(
            label=sample["label"][None], meta=[meta], point_labels=[sample["point_labels"]]
        )
        evaluator.update(Prediction(score=torch.tensor([score]), point_scores=[point]), batch)
    _check_complete(maps, category, expected, missing, len(dataset.items), points=True)
    return {"category": category, "dataset": "points", **evaluator.record()}


def evaluate_category(
    maps: Path,
    root: Path,
    category: str,
    kind: str,
    scores: dict | None,
    protocol: str = "official",
    pro_limit: float = 0.3,
    device: str = "cpu",
) -> dict:
    """Metrics of one category's maps; only each image's ROI when ``crop.json`` records one."""
    loader = MVTec3D if kind == "mvtec_3d" else MVTecAD
    dataset = loader(root, category, "test", image_size=None)
    crop = read_crop(maps, category)
    expected, missing, resized = set(), [], []
    evaluator = Evaluator(protocol, pro_limit)
    for item in dataset.items:
        meta = {"path": str(item["path"]), "category": category, "defect": item["defect"]}
        path = export_path(maps, meta)
        expected.add(path.resolve())
        if not path.is_file():
            missing.append(str(path))
            continue
        amap, native = read_map(path).to(device), dataset.native_size(item)
        if check_geometry(amap, native, path):
            resized.append(
                f"{path} is {amap.shape[0]}x{amap.shape[1]}, not {native[0]}x{native[1]}"
            )
        roi = roi_of(crop, item["defect"], path.stem, native)
        amap = _crop_map(amap, roi, native)
        target = dataset.target(item, native, roi)
        score = _image_score(scores, (category, item["defect"], path.stem), amap)
        batch = Batch(
            label=target["label"][None],
            mask=target["mask"][None],
            roi=target["roi"][None],
            meta=[{**target["meta"], "map_path": str(path)}],
        )
        evaluator.update(Prediction(score=torch.tensor([score]), anomaly_map=amap[None]), batch)
    _check_complete(maps, category, expected, missing, len(dataset.items), points=False)
    record = evaluator.record()
    record["warnings"] += _resize_warning(category, resized, len(dataset.items))
    return {"category": category, "dataset": kind, **record}


def evaluate_maps(
    maps: str | Path,
    root: str | Path,
    categories: list[str] | None = None,
    score_files: list[str | Path] | None = None,
    protocol: str = "official",
    pro_limit: float = 0.3,
    device: str = "cpu",
) -> list[dict]:
    maps, root = Path(maps), Path(root)
    if not maps.is_dir():
        raise FileNotFoundError(f"anomaly-map folder {maps} does not exist")
    kind = dataset_kind(root)
    available = _categories(kind, root)
    if categories is None:
        categories = [c for c in available if (maps / c).is_dir()]
        if not categories:
            raise FileNotFoundError(
                f"{maps} holds no folder named after a category of {root} ({available})"
            )
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise ConfigError(f"categor(ies) {unknown} are not in {root} ({available})")
    scores = read_scores(score_files) if score_files else None
    if scores is not None:
        known = set().union(*(_test_keys(kind, root, c) for c in categories))
        _check_known(scores, known, categories, sorted(set(available) - set(categories)))
    if kind == "points":
        return [evaluate_point_category(maps, root, c, scores, device) for c in categories]
    return [
        evaluate_category(maps, root, c, kind, scores, protocol, pro_limit, device)
        for c in categories
    ]


def records_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        for group, values in rec["metrics"].items():
            rows.append(
                {
                    "category": rec["category"],
                    "defect": group,
                    **values,
                    "protocol": rec["protocol"],
                    "metric_version": rec["metric_version"],
                }
            )
    table = pd.DataFrame(rows)
    overall = table[table.defect == "all"]
    numeric = overall.select_dtypes("number").mean()
    mean_row = {
        "category": "mean",
        "defect": "all",
        **numeric.to_dict(),
        "protocol": records[0]["protocol"],
        "metric_version": records[0]["metric_version"],
    }
    return pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)
