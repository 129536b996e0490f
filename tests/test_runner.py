"""The runner in-process on CPU: failures are isolated and recorded, re-runs resume."""

from __future__ import annotations

import json

import pytest
import torch

from bench import Detector, Prediction, register_detector
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.plan import plan_jobs
from bench.registry import _REGISTRY
from bench.runner import run_benchmark


@pytest.fixture
def flaky(tmp_path):
    marker = tmp_path / "break"
    marker.touch()

    @register_detector("flaky_test")
    class Flaky(Detector):
        """Fails while the marker file exists."""

        modality = "point_cloud"

        def fit(self, train):
            if marker.exists():
                raise RuntimeError("simulated crash in fit")
            self.ok_ = True

        def predict(self, batch):
            z = batch.xyz[:, 2]
            return Prediction(score=z.flatten(1).amax(1), anomaly_map=z)

    yield marker
    _REGISTRY.pop("flaky_test", None)


def _config(tmp_path, ad3d_root, *detectors: str) -> BenchConfig:
    return BenchConfig(
        name="runner",
        detectors=[DetectorEntry(d) for d in detectors],
        datasets=[
            DatasetEntry("mvtec_3d", root=str(ad3d_root), categories=["dome"], image_size=64)
        ],
        batch_size=4,
        num_workers=0,
        output=str(tmp_path / "out"),
    )


def test_a_failing_job_is_recorded_and_the_rerun_does_only_what_is_missing(
    tmp_path, ad3d_root, flaky
):
    cfg = _config(tmp_path, ad3d_root, "grid_curvature", "flaky_test")
    records, failed = run_benchmark(cfg, track=False)
    assert failed == ["flaky_test/mvtec_3d/dome/seed0"]
    assert [r["run_name"] for r in records] == ["grid_curvature/mvtec_3d/dome/seed0"]
    failure = tmp_path / "out" / "runner" / "failed" / "flaky_test__mvtec_3d__dome__seed0.txt"
    assert "simulated crash in fit" in failure.read_text()
    assert not (
        tmp_path / "out" / "runner" / "jobs" / "flaky_test__mvtec_3d__dome__seed0.json"
    ).exists()
    first = json.loads(
        (
            tmp_path / "out" / "runner" / "jobs" / "grid_curvature__mvtec_3d__dome__seed0.json"
        ).read_text()
    )

    flaky.unlink()  # the bug is fixed
    records, failed = run_benchmark(cfg, track=False)
    assert failed == [] and len(records) == 2
    assert records[0]["finished"] == first["finished"]  # skipped, not recomputed
    assert records[1]["run_name"] == "flaky_test/mvtec_3d/dome/seed0"
    assert 0.0 <= records[1]["metrics"]["all"]["image_auroc"] <= 1.0
    assert not failure.exists()


def test_runner_measures_time_memory_and_device(tmp_path, ad3d_root):
    (record,), _ = run_benchmark(_config(tmp_path, ad3d_root, "grid_curvature"), track=False)
    assert record["device"].startswith("cpu")
    assert (
        record["timings"]["model_images_per_second"]
        >= record["timings"]["predict_images_per_second"]
        > 0
    )
    assert (
        record["memory"]["fit_peak_host_mb"] > 50 and record["memory"]["predict_peak_gpu_mb"] == 0
    )
    assert record["versions"]["torch"] == torch.__version__


def test_category_filter_keeps_the_categories_each_dataset_has(tmp_path, ad_root, ad3d_root):
    cfg = BenchConfig(
        detectors=[
            DetectorEntry("feature_stats", params={"weights": "random"}),
            DetectorEntry("grid_curvature"),
        ],
        datasets=[
            DatasetEntry("mvtec_ad", root=str(ad_root)),
            DatasetEntry("mvtec_3d", root=str(ad3d_root)),
        ],
        categories=["dome", "weave"],
    )
    assert sorted(j.run_name for j in plan_jobs(cfg)) == [
        "feature_stats/mvtec_ad/weave/seed0",
        "grid_curvature/mvtec_3d/dome/seed0",
    ]
    cfg.categories = ["dome", "carpet"]
    with pytest.raises(ConfigError, match=r"\['carpet'\] are in none of the configured datasets"):
        plan_jobs(cfg)


def test_config_hash_changes_with_params_and_protocol_but_fit_hash_ignores_protocol(
    tmp_path, ad3d_root
):
    base = _config(tmp_path, ad3d_root, "grid_curvature")
    (a,) = plan_jobs(base)
    base.protocol = "fast"
    (b,) = plan_jobs(base)
    base.detectors[0].params = {"window": 7}
    (c,) = plan_jobs(base)
    assert a.fit_hash == b.fit_hash and a.config_hash != b.config_hash
    assert c.fit_hash != b.fit_hash


def test_a_detector_entry_sets_its_own_input_geometry():
    """knn's paper input (256 -> crop 224) next to a dataset default of 256 without a crop."""
    from bench.config import from_dict
    from bench.plan import plan_jobs

    cfg = from_dict(
        {
            "detectors": [
                {"name": "feature_stats"},
                {"name": "knn", "image_size": 256, "crop_size": 224},
                {"name": "knn", "label": "knn-full", "crop_size": "none"},
            ],
            "datasets": [{"name": "builtin_ad", "image_size": 256, "crop_size": 200}],
            "categories": ["weave"],
        }
    )
    geometry = {j.detector.display: (j.image_size, j.crop_size) for j in plan_jobs(cfg)}
    assert geometry == {
        "feature_stats": (256, 200),
        "knn": (256, 224),
        "knn-full": (256, None),
    }
    jobs = {j.detector.display: j for j in plan_jobs(cfg)}
    assert jobs["knn"].config_hash != jobs["knn-full"].config_hash


def test_knn_job_records_and_logs_anomaly_type_discovery(tmp_path, ad_root):
    """The runner keeps the defective images, clusters them after scoring, and the numbers go
    to the result file and to MLflow's flat metrics."""
    from bench.tracking import flat_metrics

    cfg = BenchConfig(
        name="knn-types",
        detectors=[
            DetectorEntry("knn", params={"backbone": "efficientnet_lite0", "coreset_ratio": 0.05})
        ],
        datasets=[
            DatasetEntry("mvtec_ad", root=str(ad_root), categories=["weave"], image_size=128)
        ],
        batch_size=8,
        num_workers=0,
        output=str(tmp_path / "out"),
    )
    records, failed = run_benchmark(cfg, track=False)
    assert not failed
    found = records[0]["discovery"]
    test_defects = sorted({p.name for p in (ad_root / "weave" / "test").iterdir()} - {"good"})
    assert found["n_images"] == 3 * len(test_defects)
    assert found["n_types"] == found["n_types_true"] == len(test_defects)
    assert 0 <= found["nmi"] <= 1 and -1 <= found["ari"] <= 1 and 0 < found["f1"] <= 1
    flat = flat_metrics(records[0])
    assert flat["type_nmi"] == found["nmi"] and flat["type_f1"] == found["f1"]


def test_data_fingerprint_follows_the_files(tmp_path, ad_root):
    import shutil

    from bench.datasets.mvtec_ad import MVTecAD
    from bench.runner import data_fingerprint

    root = shutil.copytree(ad_root / "weave", tmp_path / "copy" / "weave").parent
    train, test = MVTecAD(root, "weave", "train"), MVTecAD(root, "weave", "test")
    before = data_fingerprint(train, test)
    assert before == data_fingerprint(
        MVTecAD(root, "weave", "train"), MVTecAD(root, "weave", "test")
    )
    target = test.items[0]["path"]
    target.write_bytes(target.read_bytes() + b"\0")
    assert data_fingerprint(train, test) != before
