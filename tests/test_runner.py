"""The runner in-process on CPU: failures are isolated and recorded, re-runs resume."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score

from bench import Detector, Prediction, register_detector
from bench.benchmark import run_benchmark
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.plan import plan_jobs
from bench.registry import _REGISTRY


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


@pytest.mark.slow
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
    assert not failure.exists()
    # the metrics are those of the detector's own scores (z maximum, z map), computed here
    from bench.datasets import MVTec3D

    test = MVTec3D(ad3d_root, "dome", "test", image_size=64)
    labels, scores, pixel_truth, pixel_scores = [], [], [], []
    for i in range(len(test)):
        item = test[i]
        z = item["xyz"][2]
        labels.append(int(item["label"]))
        scores.append(float(z.max()))
        native = F.interpolate(z[None, None], size=item["mask"].shape, mode="bilinear")[0, 0]
        pixel_truth.append(item["mask"].reshape(-1).numpy())
        pixel_scores.append(native.reshape(-1).numpy())
    assert 0 < sum(labels) < len(labels)
    metrics = records[1]["metrics"]["all"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores)), abs=1e-9
    )


@pytest.fixture
def probe():
    """A registered detector (unique name) that measures itself: the process's resident memory
    (psutil) before, while and after it holds a written host buffer in ``fit``, and the time its
    own ``fit`` and ``predict`` calls take; ``(name, readings)``."""
    import psutil

    name = f"probe_{uuid.uuid4().hex[:8]}"
    readings = {"fit": [], "jobs": []}

    @register_detector(name)
    class Probe(Detector):
        """Known memory in fit, its own clock in fit and predict."""

        modality = "point_cloud"

        def __init__(self, fit_mb: int = 0):
            self.fit_mb = fit_mb

        def fit(self, train):
            start = time.perf_counter()
            readings["jobs"].append(self)
            self.own_predict = 0.0
            for _ in train:
                pass
            if self.fit_mb:
                rss = psutil.Process().memory_info().rss
                ballast = np.ones(self.fit_mb * 2**20, dtype=np.uint8)  # written: resident
                time.sleep(0.4)  # several samples of the memory tracker (every 50 ms)
                held = psutil.Process().memory_info().rss
                del ballast
                readings["fit"].append((rss, held, psutil.Process().memory_info().rss))
            self.ok_ = True
            self.own_fit = time.perf_counter() - start

        def predict(self, batch):
            start = time.perf_counter()
            z = batch.xyz[:, 2]
            prediction = Prediction(score=z.flatten(1).amax(1), anomaly_map=z)
            self.own_predict += time.perf_counter() - start
            return prediction

    yield name, readings
    _REGISTRY.pop(name, None)


@pytest.mark.slow
def test_runner_records_time_memory_and_device_consistently(tmp_path, ad3d_root, probe):
    """Not speed or memory goals (the benchmarks have those): the recorded fields are what the
    record schema says, checked against the probe's own measurements. Timings are nested
    windows of one monotonic clock: the probe's own fit inside the stage's recorded seconds
    inside the job's fit, its own predict calls inside the model time inside the predict time;
    throughput is n_test over those seconds. Memory: the fit's sampled peak is bounded by the
    probe's own reading while it holds its buffer (below) and the kernel's high-water mark
    (above); the buffer, freed when fit ends, is in neither the prediction's peak nor the next
    job's fit."""
    import resource

    name, readings = probe
    cfg = _config(tmp_path, ad3d_root)
    cfg.device = "cpu"
    cfg.detectors = [
        DetectorEntry(name, label="warm-up"),  # the first job's imports and caches
        DetectorEntry(name, label="plain"),
        DetectorEntry(name, label="ballast", params={"fit_mb": 300}),
        DetectorEntry(name, label="after"),
    ]
    records, failed = run_benchmark(cfg, track=False)
    # the kernel's high-water mark (KiB on Linux); its RSS counters are summed per CPU lazily, so
    # a psutil sample may exceed it by a little (measured 82 KiB): 1 MiB
    high_water_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 + 1
    assert failed == []
    assert [r["detector"] for r in records] == ["warm-up", "plain", "ballast", "after"]
    assert len(readings["jobs"]) == 4
    stages = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("fit.json")]
    stages = {stage["name"]: stage for stage in stages}

    for record, job in zip(records, readings["jobs"]):
        t, n = record["timings"], record["n_test"]
        own_fit, own_predict = job.own_fit, job.own_predict
        assert n == 16 and not record["fit_cached"]
        stage = stages[record["run_name"]]  # the job's one stage, as its fit.json says
        assert stage["fit"]["params"] == record["params"]
        assert t["fitted_seconds"] == stage["seconds"]
        assert 0 < own_fit <= t["fitted_seconds"] <= t["fit_seconds"]
        assert t["predict_images_per_second"] == n / t["predict_seconds"]
        model_seconds = n / t["model_images_per_second"]
        assert 0 < own_predict <= model_seconds * (1 + 1e-9)
        assert model_seconds <= t["predict_seconds"] * (1 + 1e-9)
        assert t["eval_seconds"] > 0
        m = record["memory"]
        assert 0 < m["fit_peak_host_mb"] <= high_water_mb
        assert 0 < m["predict_peak_host_mb"] <= high_water_mb
        assert m["fit_peak_gpu_mb"] == m["predict_peak_gpu_mb"] == 0
        assert record["device"].startswith("cpu")
        assert record["versions"]["torch"] == torch.__version__

    ((before, held, freed),) = readings["fit"]
    mb = 2**20
    ballast = next(r for r in records if r["detector"] == "ballast")["memory"]
    after = next(r for r in records if r["detector"] == "after")["memory"]
    assert held - before >= 300 * mb and held - freed >= 300 * mb  # the buffer was resident
    # sampled while the buffer was held (8 samples in 0.4 s); 1 MiB for the allocator's moves
    assert ballast["fit_peak_host_mb"] >= held / mb - 1
    # freed before the prediction and the next fit: neither peak holds 300 MiB more than then
    assert ballast["predict_peak_host_mb"] < held / mb - 150
    assert after["fit_peak_host_mb"] < held / mb - 150


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


@pytest.mark.slow
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


def test_resampling_is_each_detectors_official_one_and_enters_the_fit_hash():
    """knn (PatchCore's loader: torchvision Resize on PIL images) resizes with PIL by default,
    feature_stats (no official loader) with torch; an entry's own choice changes the fit."""
    from bench.config import from_dict

    raw = {
        "detectors": [
            {"name": "knn"},
            {"name": "knn", "label": "knn-tensor", "resampling": "tensor"},
            {"name": "feature_stats"},
            {"name": "feature_stats", "label": "fs-bicubic", "resampling": "pil-bicubic"},
        ],
        "datasets": [{"name": "builtin_ad", "image_size": 64}],
        "categories": ["weave"],
    }
    fits = {j.detector.display: j.fit for j in plan_jobs(from_dict(raw))}
    chosen = {label: fit.resampling for label, fit in fits.items()}
    assert chosen == {
        "knn": "pil-bilinear",
        "knn-tensor": "tensor",
        "feature_stats": "tensor",
        "fs-bicubic": "pil-bicubic",
    }
    assert fits["knn"].hash != fits["knn-tensor"].hash
    assert fits["feature_stats"].hash != fits["fs-bicubic"].hash
    assert fits["knn"].config()["resampling"] == "pil-bilinear"
    assert "resampling" not in fits["feature_stats"].config()  # hashes from before the choice


def test_a_resampling_override_is_checked_by_name():
    from bench.config import from_dict

    raw = {"detectors": [{"name": "knn", "resampling": "lanczos"}], "datasets": ["builtin_ad"]}
    with pytest.raises(
        ConfigError,
        match=r"detector 'knn' resampling must be one of \('tensor', 'pil-bilinear', "
        r"'pil-bicubic'\) \(or left out for the detector's own\), got 'lanczos'",
    ):
        from_dict(raw)


@pytest.mark.slow
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
    record = records[0]
    assert record["resampling"] == "pil-bilinear"  # knn's official input
    found = record["discovery"]
    test_defects = sorted({p.name for p in (ad_root / "weave" / "test").iterdir()} - {"good"})
    assert found["n_images"] == 3 * len(test_defects)
    assert found["n_types_true"] == len(test_defects)
    flat = flat_metrics(record)
    assert flat["type_nmi"] == found["nmi"] and flat["type_f1"] == found["f1"]

    # The recorded per-image assignments give the recorded scores (scikit-learn), and the
    # clustering redone here from the job's fitted state (the defective test images, their
    # maps, MEBin masks, the detector's region embeddings, k-means with the job seed) gives
    # the recorded assignments.
    recorded = [test_defects.index(d) for d in found["defects"]]
    assert found["nmi"] == normalized_mutual_info_score(recorded, found["clusters"])
    assert found["ari"] == adjusted_rand_score(recorded, found["clusters"])
    from sklearn.cluster import KMeans

    from bench.datasets.mvtec_ad import MVTecAD
    from bench.discovery import cluster_f1, main_element_masks
    from bench.loading import EpochLoader
    from bench.registry import create_detector

    (state,) = (tmp_path / "out" / "knn-types" / "state").glob("*/fitted.pt")
    det = create_detector("knn", **record["params"])
    det.load_state(state)
    images, maps, defects = [], [], []
    test = MVTecAD(ad_root, "weave", "test", image_size=128)
    for batch in EpochLoader(test, 8):
        keep = batch.label.bool()
        images.append(batch.image[keep])
        maps.append(det.predict(batch).anomaly_map.float()[keep])
        defects += [m["defect"] for m, k in zip(batch.meta, keep) if k]
    images, maps = torch.cat(images), torch.cat(maps)
    emb = det.describe_regions(images, main_element_masks(maps)).double()
    emb = F.normalize(emb, dim=1).numpy()
    clusters = KMeans(len(test_defects), n_init=10, random_state=record["seed"]).fit_predict(emb)
    truth = [test_defects.index(d) for d in defects]
    assert found["defects"] == defects and found["clusters"] == clusters.tolist()
    assert found["n_types"] == len(set(clusters)) == len(test_defects)
    assert found["nmi"] == pytest.approx(normalized_mutual_info_score(truth, clusters), abs=1e-9)
    assert found["ari"] == pytest.approx(adjusted_rand_score(truth, clusters), abs=1e-9)
    assert found["f1"] == pytest.approx(cluster_f1(np.array(truth), clusters), abs=1e-9)


def test_data_fingerprint_follows_the_files(tmp_path, ad_root):
    import shutil

    from bench.datasets.mvtec_ad import MVTecAD
    from bench.fingerprint import data_fingerprint

    root = shutil.copytree(ad_root / "weave", tmp_path / "copy" / "weave").parent
    train, test = MVTecAD(root, "weave", "train"), MVTecAD(root, "weave", "test")
    before = data_fingerprint(train, test)
    assert before == data_fingerprint(
        MVTecAD(root, "weave", "train"), MVTecAD(root, "weave", "test")
    )
    target = test.items[0]["path"]
    target.write_bytes(target.read_bytes() + b"\0")
    assert data_fingerprint(train, test) != before
