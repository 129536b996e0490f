"""Registry: built-ins, errors, and a third-party plugin installed through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench import Detector, create_detector, list_detectors, register_detector
from bench.registry import _REGISTRY, UnknownDetectorError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def scratch_names():
    names: list[str] = []
    yield names
    for n in names:
        _REGISTRY.pop(n, None)


def test_builtins_are_listed_with_their_modality():
    found = {i.name: i for i in list_detectors()}
    assert found["feature_stats"].modality == "image"
    assert found["autoencoder"].modality == "image"
    assert found["grid_curvature"].modality == "point_cloud"
    assert all(
        found[n].source == "builtin" for n in ("feature_stats", "autoencoder", "grid_curvature")
    )


def test_create_detector_applies_params_over_defaults():
    det = create_detector("grid_curvature", window=7)
    assert det.get_params() == {"window": 7, "tolerance": 3, "sigma": 2.0, "score": "max"}


def test_unknown_name_lists_the_known_ones_and_suggests():
    with pytest.raises(UnknownDetectorError) as err:
        create_detector("grid_curvatur")
    text = str(err.value)
    assert "Did you mean 'grid_curvature'?" in text
    builtins = ["autoencoder", "curvature", "feature_stats", "grid_curvature", "knn"]
    known = sorted(d.name for d in list_detectors())
    assert set(builtins) <= set(known)
    assert "Known detectors: " + ", ".join(known) in text


def test_registration_rejects_bad_classes_and_taken_names(scratch_names):
    scratch_names += ["tmp_det"]

    @register_detector("tmp_det")
    class Tmp(Detector):
        modality = "point_cloud"

    assert create_detector("tmp_det").__class__ is Tmp
    with pytest.raises(ValueError, match="taken"):

        @register_detector("tmp_det")
        class Other(Detector):
            pass

    with pytest.raises(TypeError, match="subclass of bench.Detector"):
        register_detector("not_a_detector")(dict)
    with pytest.raises(ValueError, match="unknown modality 'video'"):

        @register_detector("video_det")
        class Video(Detector):
            modality = "video"

    with pytest.raises(ValueError, match="unknown modality 'mesh'"):

        @register_detector("mesh_det")
        class Mesh(Detector):
            modality = "point_cloud"
            also_accepts = ("mesh",)


PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party detector package: nothing in this repository refers to it."""
    import torch
    from bench import Detector, Prediction


    class MeanImage(Detector):
        """Distance of each pixel to the mean training image."""

        modality = "image"

        def __init__(self, power: float = 2.0):
            self.power = power

        def fit(self, train):
            total, n = 0, 0
            for batch in train:
                total = total + batch.image.sum(0)
                n += len(batch)
            self.mean_ = total / n

        def predict(self, batch):
            maps = (batch.image - self.mean_.to(batch.image.device)).abs().pow(self.power).mean(1)
            return Prediction(score=maps.flatten(1).amax(1), anomaly_map=maps)
    '''
)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory, plugin_installer) -> Path:
    """The plugin built and installed (pip --target) as a real distribution with an entry point."""
    return plugin_installer(
        tmp_path_factory.mktemp("plugin"),
        "demo_detectors",
        PLUGIN_MODULE,
        {"adbench.detectors": {"mean_image": "demo_detectors:MeanImage"}},
    )


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "ADBENCH_PROGRESS": "0"}


@pytest.mark.slow
def test_plugin_detector_is_listed_and_runs(plugin_site, ad_root, tmp_path):
    listed = subprocess.run(
        [str(BIN / "bench"), "list", "--json"],
        env=_env(plugin_site),
        capture_output=True,
        text=True,
        check=True,
    )
    entries = {e["name"]: e for e in json.loads(listed.stdout)["detectors"]}
    assert entries["mean_image"]["source"] == "plugin:adbench-demo-detectors"
    assert entries["mean_image"]["modality"] == "image"
    assert entries["mean_image"]["scopes"] == ["per_category"]  # the Detector default
    assert entries["feature_stats"]["scopes"] == ["per_category", "unified", "train_on", "shots"]
    assert "feature_stats" in entries

    run = subprocess.run(
        [
            str(BIN / "bench"),
            "run",
            "--detectors",
            "mean_image",
            "--datasets",
            "mvtec_ad",
            "--root",
            f"mvtec_ad={ad_root}",
            "--categories",
            "washer",
            "--image-size",
            "64",
            "--no-tracking",
            "--output",
            str(tmp_path),
            "--name",
            "plug",
            "--export-maps",
            str(tmp_path / "maps"),
        ],
        env=_env(plugin_site),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    record = json.loads(
        (tmp_path / "plug" / "jobs" / "mean_image__mvtec_ad__washer__seed0.json").read_text()
    )
    assert record["params"] == {"power": 2.0}
    # the metrics are scikit-learn's on the plugin's own exported maps and scores
    exported = tmp_path / "maps" / "mean_image" / "mvtec_ad" / "seed0" / "washer"
    scores = pd.read_csv(exported / "scores.csv", dtype={"id": str})
    truth, values = [], []
    for row in scores.itertuples():
        amap = tifffile.imread(exported / "test" / row.defect / f"{row.id}.tiff")
        gt = ad_root / "washer" / "ground_truth" / row.defect / f"{row.id}_mask.png"
        mask = np.asarray(Image.open(gt)) > 0 if row.defect != "good" else amap * 0 > 0
        assert mask.shape == amap.shape == (128, 128)  # native size
        truth.append(mask.reshape(-1))
        values.append(amap.reshape(-1))
    assert len(scores) == record["n_test"]
    metrics = record["metrics"]["all"]
    assert metrics["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(truth), np.concatenate(values)), abs=1e-9
    )
    assert metrics["image_auroc"] == pytest.approx(
        roc_auc_score(scores["defect"] != "good", scores["score"]), abs=1e-12
    )


@pytest.mark.slow
def test_without_the_plugin_its_name_is_unknown(ad_root):
    out = subprocess.run(
        [str(BIN / "bench"), "run", "--detectors", "mean_image", "--no-tracking"],
        env={**os.environ, "ADBENCH_PROGRESS": "0"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown detector 'mean_image'" in out.stderr and "Known detectors:" in out.stderr


def test_every_package_folder_is_declared_for_installation():
    declared = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    prefix = {"bench": "bench", "adapters": "bench.adapters", "datasets": "bench.datasets"}
    found = set()
    for top, name in prefix.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            found.add(".".join((name, *rel)))
    assert found == declared
