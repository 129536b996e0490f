"""Real3D-AD / Anomaly-ShapeNet style loader on generated .pcd files, and point-level metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.datasets import synthetic_real3d
from bench.datasets.common import DatasetLayoutError
from bench.datasets.real3d import PointCloudSet, categories, defect_of
from bench.metrics import auroc, point_metrics
from bench.pointcloud import multiscale_surface_variation


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


def test_ground_truth_that_does_not_match_the_cloud_is_named(real3d_root, tmp_path):
    import shutil

    root = shutil.copytree(real3d_root, tmp_path / "copy")
    gt = sorted((root / "ellipsoid" / "gt").glob("*.txt"))[0]
    gt.write_text("\n".join(gt.read_text().splitlines()[:-5]) + "\n")
    test = PointCloudSet(root, "ellipsoid", "test")
    index = next(i for i, it in enumerate(test.items) if it["gt_path"] == gt)
    with pytest.raises(ValueError, match=gt.name):
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
    assert result["point_auroc"] > 0.8
    assert auroc(torch.stack(object_scores), torch.stack(object_labels)) > 0.8
    assert np.isfinite(result["point_f1max"])
