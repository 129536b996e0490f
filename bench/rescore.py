"""Re-score anomaly maps stored in the official layout, written by this harness or any other code.

Maps: ``<maps>/<category>/test/<defect>/<id>.tiff`` (one float map per test image; any size, the
official protocol upsamples bilinearly to the ground truth). Image scores are each map's maximum,
or come from CSV files with columns ``category, defect, id, score``. Unorganised clouds
(Real3D-AD / Anomaly-ShapeNet layout): ``<maps>/<category>/test/<defect>/<id>.txt``, one score
per point in the order of the cloud's ground truth (of its .pcd for good clouds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

from bench.datasets import MVTec3D, MVTecAD, PointCloudSet, mvtec_3d, mvtec_ad, real3d
from bench.evaluation import Evaluator, PointEvaluator, export_path
from bench.types import Batch, Prediction

SCORE_COLUMNS = ("category", "defect", "id", "score")


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
        raise ValueError(f"cannot read point scores {path}: {err}") from err
    if values.ndim != 1 or len(values) != n:
        raise ValueError(
            f"point scores {path} hold {values.size} values, expected one per line for each of "
            f"the cloud's {n} points"
        )
    return torch.from_numpy(values.astype(np.float32))


def read_map(path: Path) -> torch.Tensor:
    try:
        array = tifffile.imread(path)
    except Exception as err:
        raise ValueError(f"cannot read anomaly map {path}: {err}") from err
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"anomaly map {path} has shape {array.shape}, expected a 2-D map")
    return torch.from_numpy(array.astype(np.float32))


def read_scores(paths: list[str | Path]) -> dict[tuple[str, str, str], float]:
    scores: dict[tuple[str, str, str], float] = {}
    for path in paths:
        frame = pd.read_csv(path, dtype={"id": str, "category": str, "defect": str})
        missing = [c for c in SCORE_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"scores file {path} lacks column(s) {missing}; expected {list(SCORE_COLUMNS)}"
            )
        for row in frame.itertuples(index=False):
            scores[(row.category, row.defect, str(row.id))] = float(row.score)
    return scores


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
        raise ValueError(
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
        key = (category, item["defect"], path.stem)
        if scores is not None and key not in scores:
            raise ValueError(f"category {category}: no score for {key} in the scores file(s)")
        score = scores[key] if scores is not None else float(point.max())
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
    loader = MVTec3D if kind == "mvtec_3d" else MVTecAD
    dataset = loader(root, category, "test", image_size=None)
    expected, missing = set(), []
    evaluator = Evaluator(protocol, pro_limit)
    for item in dataset.items:
        meta = {"path": str(item["path"]), "category": category, "defect": item["defect"]}
        path = export_path(maps, meta)
        expected.add(path.resolve())
        if not path.is_file():
            missing.append(str(path))
            continue
        amap = read_map(path).to(device)
        native = dataset.native_size(item)
        target = dataset.target(item, native, torch.tensor([0, 0, native[0], native[1]]))
        key = (category, item["defect"], Path(item["path"]).stem)
        if scores is not None and key not in scores:
            raise ValueError(f"category {category}: no score for {key} in the scores file(s)")
        score = scores[key] if scores is not None else float(amap.max())
        batch = Batch(
            label=target["label"][None],
            mask=target["mask"][None],
            roi=target["roi"][None],
            meta=[target["meta"]],
        )
        evaluator.update(Prediction(score=torch.tensor([score]), anomaly_map=amap[None]), batch)
    _check_complete(maps, category, expected, missing, len(dataset.items), points=False)
    return {"category": category, "dataset": kind, **evaluator.record()}


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
        raise ValueError(f"categor(ies) {unknown} are not in {root} ({available})")
    scores = read_scores(score_files) if score_files else None
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
