"""Re-score anomaly maps stored in the official layout, written by this harness or any other code.

Maps: ``<maps>/<category>/test/<defect>/<id>.tiff`` (one float map per test image, finite; at the
ground truth's size, or at another size of the same aspect ratio, then resized bilinearly to it
with a warning). ``<maps>/<category>/crop.json`` (written by a cropped export) restricts the
scoring to a region of each image (protocol ``official-cropped``). Image scores are each map's
maximum (in that region), or come from CSV files with columns ``category, defect, id, score``:
one row per test image of the evaluated categories, each score a finite number. Unorganised clouds
(Real3D-AD / Anomaly-ShapeNet layout): ``<maps>/<category>/test/<defect>/<id>.txt``, one score
per point in the order of the cloud's ground truth (of its .pcd for good clouds).

Each dataset is scored as the job pipeline scores it: MVTec LOCO AD by
:class:`~bench.evaluation_loco.LocoEvaluator` (official protocol only), MVTec AD 2 by
:class:`~bench.evaluation_ad2.AD2Evaluator`, which first reads the validation maps
``<maps>/<category>/validation/good/<id>.tiff`` (they set SegF1's threshold) and scores
test_public; its private sets have no public ground truth and are not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from bench.datasets import (
    MVTec3D,
    MVTecAD,
    PointCloudSet,
    mvtec_3d,
    mvtec_ad,
    mvtec_ad2,
    mvtec_loco,
    real3d,
)
from bench.datasets.common import ImageCategoryDataset
from bench.datasets.mvtec_ad2 import MVTecAD2
from bench.datasets.mvtec_loco import MVTecLOCO
from bench.errors import ConfigError, DataError
from bench.evaluation import CROP_FILE, Evaluator, PointEvaluator, export_path
from bench.evaluation_ad2 import VALIDATION, AD2Evaluator, validation_path
from bench.evaluation_loco import LocoEvaluator
from bench.exported import (
    Key,
    MissingInput,
    _check_known,
    read_map,
    read_point_scores,
    read_scores,
)
from bench.per_image import collect
from bench.types import Batch, Prediction

#: each kind of root (``dataset_kind``): the module listing its categories, its test loader and
#: its evaluator (the job pipeline's, ``bench.job.predicting.EVALUATORS``)
MODULES = {
    "mvtec_ad": mvtec_ad,
    "mvtec_3d": mvtec_3d,
    "loco": mvtec_loco,
    "mvtec_ad2": mvtec_ad2,
    "points": real3d,
}
LOADERS = {"mvtec_ad": MVTecAD, "mvtec_3d": MVTec3D, "loco": MVTecLOCO, "mvtec_ad2": MVTecAD2}
EVALUATORS = {
    "mvtec_ad": Evaluator,
    "mvtec_3d": Evaluator,
    "loco": LocoEvaluator,
    "mvtec_ad2": AD2Evaluator,
}


def dataset_kind(root: Path) -> str:
    """ "mvtec_3d" when the categories hold xyz folders, "points" when their test folders hold
    .pcd clouds, "loco" when a category holds ``defects_config.json`` (MVTec LOCO AD),
    "mvtec_ad2" when one holds ``test_public/`` (MVTec AD 2), else "mvtec_ad"."""
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
    if any(root.glob(f"*/{mvtec_loco.CONFIG}")):
        return "loco"
    if any(p.is_dir() for p in root.glob("*/test_public")):
        return "mvtec_ad2"
    mvtec_ad.categories(root)  # raises with the expected layout when none fits
    return "mvtec_ad"


def _categories(kind: str, root: Path) -> list[str]:
    return MODULES[kind].categories(root)


def _scored_items(kind: str, items: list[dict]) -> list[dict]:
    """The test items that are scored: MVTec AD 2's test split also serves its validation
    images (role "validation"), which only set SegF1's threshold."""
    if kind == "mvtec_ad2":
        return [it for it in items if it["role"] == "test_public"]
    return items


def _test_keys(kind: str, root: Path, category: str) -> set[Key]:
    if kind == "points":
        items = PointCloudSet(root, category, "test").items
    else:
        items = LOADERS[kind](root, category, "test", image_size=None).items
    return {(category, it["defect"], Path(it["path"]).stem) for it in _scored_items(kind, items)}


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
        raise MissingInput(
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
    maps: Path,
    root: Path,
    category: str,
    scores: dict | None,
    device: str = "cpu",
    bootstrap: int = 0,
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
    record = evaluator.record()
    return {
        "category": category,
        "dataset": "points",
        **record,
        **_intervals(evaluator, root, bootstrap),
    }


def _read_target(
    path: Path,
    dataset: ImageCategoryDataset,
    item: dict,
    crop_key: str,
    crop: dict | None,
    resized: list[str],
    device: str,
) -> tuple[torch.Tensor, dict]:
    """(the map of ``path`` in the item's ROI, the item's target); a map of another size is
    noted in ``resized``. ``crop_key``: the item's folder in ``crop.json``'s per-image keys."""
    amap, native = read_map(path).to(device), dataset.native_size(item)
    if check_geometry(amap, native, path):
        resized.append(f"{path} is {amap.shape[0]}x{amap.shape[1]}, not {native[0]}x{native[1]}")
    roi = roi_of(crop, crop_key, path.stem, native)
    return _crop_map(amap, roi, native), dataset.target(item, native, roi)


def _batch(target: dict, path: Path) -> Batch:
    return Batch(
        label=target["label"][None],
        mask=target["mask"][None],
        roi=target["roi"][None],
        meta=[{**target["meta"], "map_path": str(path)}],
    )


def _feed_validation(
    maps: Path,
    dataset: MVTecAD2,
    crop: dict | None,
    evaluator: AD2Evaluator,
    resized: list[str],
    device: str,
) -> None:
    """MVTec AD 2: every validation map, ``<maps>/<category>/validation/good/<id>.tiff``, into
    the evaluator, in the loader's order (they set SegF1's threshold); a missing or extra one is
    an error naming the folder."""
    category = dataset.category
    items = [it for it in dataset.items if it["role"] == "validation"]
    paths = [validation_path(maps, {"category": category, "path": it["path"]}) for it in items]
    folder = maps / category / VALIDATION
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"category {category}: {len(missing)} of {len(items)} validation images have no "
            f"anomaly map in {folder} (e.g. {missing[:3]}); MVTec AD 2's SegF1 threshold is "
            "chosen from them: export them there (bench run --export-maps writes them)"
        )
    extra = sorted(str(p) for p in set(folder.glob("*.tif*")) - set(paths))
    if extra:
        raise DataError(
            f"category {category}: {len(extra)} anomaly map(s) in {folder} match no validation "
            f"image, e.g. {extra[:3]}"
        )
    for item, path in zip(items, paths):
        amap, target = _read_target(path, dataset, item, VALIDATION, crop, resized, device)
        prediction = Prediction(score=amap.max()[None], anomaly_map=amap[None])
        evaluator.update(prediction, _batch(target, path))


def evaluate_category(
    maps: Path,
    root: Path,
    category: str,
    kind: str,
    scores: dict | None,
    protocol: str = "official",
    pro_limit: float = 0.3,
    device: str = "cpu",
    bootstrap: int = 0,
) -> dict:
    """Metrics of one category's maps by its dataset's evaluator (``EVALUATORS``); only each
    image's ROI when ``crop.json`` records one. MVTec AD 2: the validation maps first."""
    dataset = LOADERS[kind](root, category, "test", image_size=None)
    crop = read_crop(maps, category)
    expected, missing, resized = set(), [], []
    evaluator = EVALUATORS[kind](protocol, pro_limit)
    if kind == "mvtec_ad2":
        _feed_validation(maps, dataset, crop, evaluator, resized, device)
    items = _scored_items(kind, dataset.items)
    for item in items:
        meta = {"path": str(item["path"]), "category": category, "defect": item["defect"]}
        path = export_path(maps, meta)
        expected.add(path.resolve())
        if not path.is_file():
            missing.append(str(path))
            continue
        amap, target = _read_target(path, dataset, item, item["defect"], crop, resized, device)
        score = _image_score(scores, (category, item["defect"], path.stem), amap)
        prediction = Prediction(score=torch.tensor([score]), anomaly_map=amap[None])
        evaluator.update(prediction, _batch(target, path))
    _check_complete(maps, category, expected, missing, len(items), points=False)
    record = evaluator.record()
    record["warnings"] += _resize_warning(category, resized, len(dataset.items))
    return {
        "category": category,
        "dataset": kind,
        **record,
        **_intervals(evaluator, root, bootstrap),
    }


def _intervals(evaluator, root: Path, resamples: int) -> dict:
    """``{"ci": ...}``: the 95% intervals a run records (:mod:`bench.per_image`), seed 0, so a
    re-scored export pairs with the run's resamples; nothing when ``resamples`` is 0."""
    if resamples <= 0:
        return {}
    return {"ci": collect(evaluator, str(root), resamples, 0)[1].record()}


def evaluate_maps(
    maps: str | Path,
    root: str | Path,
    categories: list[str] | None = None,
    score_files: list[str | Path] | None = None,
    protocol: str = "official",
    pro_limit: float = 0.3,
    device: str = "cpu",
    bootstrap: int = 0,
) -> list[dict]:
    """Every category's metrics (with ``bootstrap`` > 0 their 95% intervals from that many
    resamples, the record's ``ci``)."""
    maps, root = Path(maps), Path(root)
    if not maps.is_dir():
        raise MissingInput(f"anomaly-map folder {maps} does not exist")
    kind = dataset_kind(root)
    if kind == "loco" and protocol != "official":
        raise ConfigError(
            f"{root} is an MVTec LOCO AD root, scored with the official protocol only (sPRO's "
            f"saturation areas are pixel counts at native resolution), got --protocol {protocol}"
        )
    available = _categories(kind, root)
    if categories is None:
        categories = [c for c in available if (maps / c).is_dir()]
        if not categories:
            raise MissingInput(
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
        return [
            evaluate_point_category(maps, root, c, scores, device, bootstrap) for c in categories
        ]
    return [
        evaluate_category(maps, root, c, kind, scores, protocol, pro_limit, device, bootstrap)
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
