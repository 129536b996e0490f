"""Unorganised clouds (Real3D-AD / Anomaly-ShapeNet layout) on generated .pcd files: the loader,
point-level metrics, planning and whole benchmark runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_metrics import f1_max
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.benchmark import run_benchmark
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.datasets import synthetic_real3d
from bench.datasets.common import DatasetLayoutError
from bench.datasets.real3d import PointCloudSet, categories, defect_of
from bench.evaluation import PointEvaluator
from bench.metrics import auroc, point_metrics
from bench.plan import plan_jobs
from bench.pointcloud import multiscale_surface_variation
from bench.report import write_report
from bench.rescore import evaluate_maps
from bench.types import Batch, Prediction


@pytest.fixture(scope="module")
def real3d_root(tmp_path_factory):
    return synthetic_real3d.generate(tmp_path_factory.mktemp("real3d"), n_points=3000)


def test_loader_reads_counts_defects_and_point_labels(real3d_root):
    assert categories(real3d_root) == ["ellipsoid"]
    train = PointCloudSet(real3d_root, "ellipsoid", "train")
    test = PointCloudSet(real3d_root, "ellipsoid", "test")
    assert len(train) == 4 and train.defect_types == ["good"]
    assert len(test) == 12 and test.defect_types == ["bulge", "good", "sink"]
    for i in range(len(test)):
        item = test[i]
        assert item["points"].shape == (3000, 3) and item["points"].dtype == torch.float32
        defective = item["meta"]["defect"] != "good"
        assert bool(item["point_labels"].any()) == defective == bool(item["label"])
    assert defect_of("ashtray0_positive3") == "good" and defect_of("12_sink") == "sink"
    assert defect_of("482_bulge_cut") == "bulge" and defect_of("7_good_cut") == "good"


def test_defective_clouds_are_the_labelled_points_and_bad_ground_truth_is_named(
    real3d_root, tmp_path
):
    """As the official Real3D-AD loader does, a defective cloud is read from its 'x y z label'
    file; files named *temp* are skipped; malformed ground truth names the file."""
    import shutil

    root = shutil.copytree(real3d_root, tmp_path / "copy")
    (root / "ellipsoid" / "test" / "0_good_temp.pcd").write_text("not a test cloud")
    test = PointCloudSet(root, "ellipsoid", "test")
    assert len(test) == 12 and "bulge" in [defect_of(it["path"].stem) for it in test.items]
    gt = next(it["gt_path"] for it in test.items if it["path"].stem.endswith("_cut"))
    index = next(i for i, it in enumerate(test.items) if it["gt_path"] == gt)
    table = np.loadtxt(gt)
    item = test[index]
    assert np.allclose(item["points"].numpy(), table[:, :3], atol=1e-6)
    assert (item["point_labels"].numpy() == (table[:, 3] == 1)).all()

    gt.write_text("\n".join(line.rsplit(" ", 1)[0] for line in gt.read_text().splitlines()))
    with pytest.raises(ValueError, match=f"{gt.name}.*3 values.*x y z label"):
        test[index]
    np.savetxt(gt, np.c_[table[:, :3], 2 * table[:, 3]])
    with pytest.raises(ValueError, match=f"{gt.name}.*0 or 1"):
        test[index]
    (root / "ellipsoid" / "test" / "99_dent.pcd").write_text("")
    with pytest.raises(DatasetLayoutError, match="99_dent"):
        PointCloudSet(root, "ellipsoid", "test")


def test_point_metrics_on_unorganised_clouds(real3d_root):
    """Per-point curvature finds the bulges and sinks; values checked against scikit-learn."""
    test = PointCloudSet(real3d_root, "ellipsoid", "test")
    scores, labels, object_scores, object_labels = [], [], [], []
    for i in range(len(test)):
        item = test[i]
        sv = multiscale_surface_variation(item["points"].double(), (16, 32)).mean(0)
        scores.append(sv)
        labels.append(item["point_labels"])
        object_scores.append(sv.max())
        object_labels.append(item["label"])
    result = point_metrics(scores, labels)
    flat_s, flat_l = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    assert result["point_auroc"] == pytest.approx(roc_auc_score(flat_l, flat_s), abs=1e-12)
    assert result["point_ap"] == pytest.approx(average_precision_score(flat_l, flat_s), abs=1e-12)
    assert result["point_f1max"] == pytest.approx(f1_max(flat_l, flat_s), abs=1e-12)
    # measured: point AUROC 0.9795; object AUROC 1.0 (every defective cloud above every good one)
    assert result["point_auroc"] > 0.97
    assert auroc(torch.stack(object_scores), torch.stack(object_labels)) == 1.0


def test_point_evaluator_per_defect_subsets_match_scikit_learn():
    """Each defect subset is its clouds plus the good ones; object and point metrics both."""
    gen = torch.Generator().manual_seed(0)
    clouds = [("good", 0), ("good", 0), ("bulge", 1), ("bulge", 1), ("sink", 1), ("sink", 1)]
    ev = PointEvaluator()
    point_scores, point_labels = [], []
    for i, (defect, label) in enumerate(clouds):
        n = 50 + 10 * i
        y = torch.zeros(n, dtype=torch.bool)
        if label:
            y[: n // 4] = True
        s = torch.rand(n, generator=gen) + 0.6 * y
        point_scores.append(s)
        point_labels.append(y)
        batch = Batch(
            label=torch.tensor([label]),
            meta=[{"path": f"{i}_{defect}.pcd", "defect": defect, "category": "c"}],
            points=[torch.zeros(n, 3)],
            point_labels=[y],
        )
        ev.update(Prediction(score=s.max()[None], point_scores=[s]), batch)
    out = ev.compute()
    assert set(out) == {"all", "bulge", "sink"}
    for name, members in (("all", range(6)), ("sink", [0, 1, 4, 5])):
        s = torch.cat([point_scores[i] for i in members]).numpy()
        y = torch.cat([point_labels[i] for i in members]).numpy()
        assert out[name]["point_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert out[name]["point_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        objects = [float(point_scores[i].max()) for i in members]
        truth = [clouds[i][1] for i in members]
        assert out[name]["image_auroc"] == pytest.approx(roc_auc_score(truth, objects))
    assert ev.curves["fpr"][0] == 0 and ev.curves["tpr"][-1] == 1 and "pro" not in ev.curves


def test_prediction_needs_maps_or_point_scores_not_both():
    with pytest.raises(ValueError, match="exactly one"):
        Prediction(score=torch.zeros(1))
    with pytest.raises(ValueError, match="exactly one"):
        Prediction(score=torch.zeros(1), anomaly_map=torch.zeros(1, 2, 2), point_scores=[])
    with pytest.raises(ValueError, match="2 point-score"):
        Prediction(score=torch.zeros(1), point_scores=[torch.zeros(3), torch.zeros(3)])


def test_planning_matches_detectors_to_unorganised_clouds(real3d_root, tmp_path):
    cfg = BenchConfig(
        detectors=[DetectorEntry("curvature"), DetectorEntry("grid_curvature")],
        datasets=[DatasetEntry("real3d_ad", root=str(real3d_root))],
        output=str(tmp_path),
    )
    assert [j.run_name for j in plan_jobs(cfg)] == ["curvature/real3d_ad/ellipsoid/seed0"]
    cfg.detectors = [DetectorEntry("grid_curvature", datasets=["real3d_ad"])]
    with pytest.raises(ConfigError, match="grid_curvature.*'point_cloud' input.*real3d_ad"):
        plan_jobs(cfg)


@pytest.mark.slow
def test_benchmark_on_unorganised_clouds_end_to_end(real3d_root, tmp_path):
    """`bench run` on a Real3D-AD-layout folder: every point scored, point metrics equal to
    scikit-learn on the exported scores, an MLflow run with them, the report and overlays."""
    from mlflow.tracking import MlflowClient

    exported = tmp_path / "maps"
    cfg = BenchConfig(
        name="pts",
        detectors=[DetectorEntry("curvature", params={"ks": [16, 32]})],
        datasets=[DatasetEntry("anomaly_shapenet", root=str(real3d_root))],
        batch_size=3,
        num_workers=0,
        output=str(tmp_path / "out"),
        export_maps=str(exported),
    )
    records, failed = run_benchmark(cfg)
    assert failed == [] and len(records) == 1
    record = records[0]
    assert record["modality"] == "points" and record["protocol"] == "points"
    test = PointCloudSet(real3d_root, "ellipsoid", "test")
    scores, labels = [], []
    for item in test.items:
        path = Path(record["maps_exported_to"]) / "ellipsoid" / "test" / item["defect"]
        values = np.loadtxt(path / f"{item['path'].stem}.txt")
        truth = (
            np.zeros(len(values), bool)
            if item["gt_path"] is None
            else np.loadtxt(item["gt_path"])[:, 3] > 0.5
        )
        assert len(values) == len(truth)  # every point of the cloud has a score
        scores.append(values)
        labels.append(truth)
    metrics = record["metrics"]["all"]
    s, y = np.concatenate(scores), np.concatenate(labels)
    assert metrics["point_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics["point_f1max"] == pytest.approx(f1_max(y, s), abs=1e-6)
    # measured: point AUROC 0.9801, object AUROC 1.0
    assert metrics["point_auroc"] > 0.975 and metrics["image_auroc"] == 1.0
    assert "pixel_auroc" not in metrics and {"bulge", "sink"} <= set(record["metrics"])
    assert Path(record["overlays"]).is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.metrics["point_auroc"] == pytest.approx(metrics["point_auroc"])
    assert run.data.metrics["defect.sink.point_ap"] == pytest.approx(
        record["metrics"]["sink"]["point_ap"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "per_defect.csv", "overlays"} <= artifacts
    report = write_report(tmp_path / "out", "pts")["markdown"].read_text()
    assert "## point_auroc" in report and "## au_pro" not in report
    assert f"{metrics['point_auroc']:.4f}" in report

    # the exported point scores and object scores re-score to the same metrics
    maps = Path(record["maps_exported_to"])
    again = evaluate_maps(maps, real3d_root, score_files=[maps / "ellipsoid" / "scores.csv"])
    assert again[0]["protocol"] == "points"
    for subset, values in record["metrics"].items():
        for name, value in values.items():
            assert again[0]["metrics"][subset][name] == pytest.approx(value, abs=1e-9), name
    next(maps.glob("ellipsoid/test/sink/*.txt")).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 12 test clouds have no point-score file"):
        evaluate_maps(maps, real3d_root)
