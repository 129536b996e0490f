"""Dataset registry: built-ins, decorator errors, lazily loaded entry points, and a third-party
dataset plugin installed as a real distribution and benchmarked through ``bench run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from bench.datasets import (
    DATASETS,
    DatasetSpec,
    MVTecAD,
    UnknownDatasetError,
    VisA,
    add_dataset,
    get_dataset,
    list_datasets,
    mvtec_ad,
    register_dataset,
    registry,
)

BIN = Path(sys.executable).parent


@pytest.fixture
def scratch_names():
    names: list[str] = []
    yield names
    for n in names:
        registry._REGISTRY.pop(n, None)


def test_builtins_are_listed_with_loader_root_and_source():
    found = {i.name: i for i in list_datasets()}
    assert {"mvtec_ad", "builtin_ad", "mvtec_3d", "builtin_3d", "visa", "builtin_visa"} <= set(
        found
    )
    assert found["mvtec_ad"].spec.loader is found["builtin_ad"].spec.loader is MVTecAD
    assert found["visa"].spec.loader is VisA and found["visa"].spec.root_env == "VISA_ROOT"
    assert found["builtin_visa"].spec.root_env == "ADBENCH_CACHE"
    assert found["builtin_visa"].spec.root_text.startswith("generated: ")  # nothing generated
    assert found["mvtec_3d"].feeds == ("image", "point_cloud", "rgb+point_cloud")
    assert all(i.source == "builtin" for i in found.values())
    assert DATASETS["visa"] is get_dataset("visa") and "visa" in DATASETS
    assert list(DATASETS) == sorted(found)


def test_unknown_name_suggests_the_closest_and_lists_the_known():
    with pytest.raises(UnknownDatasetError) as err:
        get_dataset("vissa")
    text = str(err.value)
    assert "unknown dataset 'vissa' (did you mean 'visa'?)" in text
    assert "known datasets: " + ", ".join(sorted(DATASETS)) in text
    assert isinstance(err.value, KeyError) and DATASETS.get("vissa") is None


def test_decorator_registers_and_refuses_taken_names(scratch_names, tmp_path):
    scratch_names += ["tmp_set", "tmp_spec"]

    @register_dataset(
        "tmp_set", categories=lambda root: ["a"], default_root=tmp_path, modalities=("image",)
    )
    class Tmp(MVTecAD):
        pass

    spec = get_dataset("tmp_set")
    assert spec.loader is Tmp and spec.feeds == ("image",) and spec.root() == tmp_path
    assert spec.categories() == ["a"] and spec.source == "builtin"
    register_dataset(  # the same loader again: idempotent
        "tmp_set", categories=lambda root: ["a"], default_root=tmp_path, modalities=("image",)
    )(Tmp)
    with pytest.raises(ValueError) as err:
        register_dataset(
            "mvtec_ad", categories=lambda root: [], default_root=tmp_path, modalities=("image",)
        )(Tmp)
    assert str(err.value) == (
        "dataset name 'mvtec_ad' is taken by bench.datasets.mvtec_ad.MVTecAD (builtin); cannot "
        f"register {Tmp.__module__}.{Tmp.__qualname__} (builtin)"
    )
    with pytest.raises(ValueError, match="taken by .*MVTecAD \\(builtin\\); cannot register "):
        add_dataset(replace(get_dataset("mvtec_ad"), source="plugin:other"))
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        register_dataset("v", categories=list, default_root=tmp_path, modalities=("video",))(Tmp)
    with pytest.raises(TypeError, match="loader must be a class"):
        add_dataset(DatasetSpec("tmp_spec", len, list, lambda: tmp_path, ("image",), ("image",)))
    added = add_dataset(
        DatasetSpec("tmp_spec", Tmp, mvtec_ad.categories, lambda: tmp_path, ("image",), ("image",)),
        source="plugin:x",
    )
    assert get_dataset("tmp_spec") is added and added.source == "plugin:x"


class FakeEntryPoint:
    def __init__(self, name, obj, dist="demo-dist"):
        self.name, self.value, self._obj = name, f"demo:{name}", obj
        self.dist = type("Dist", (), {"name": dist})()

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def _lookup_with(monkeypatch, *eps):
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: list(eps))
    return get_dataset("visa")


def test_entry_points_load_lazily_and_broken_ones_name_the_plugin(monkeypatch, scratch_names):
    scratch_names += ["ep_spec", "ep_class"]

    class Carrier(MVTecAD):
        list_categories = staticmethod(mvtec_ad.categories)
        default_root = "data/carrier"
        root_env = "CARRIER_ROOT"

    class Bare(MVTecAD):  # neither carries the attributes nor registered itself
        pass

    spec = DatasetSpec(
        "ignored", MVTecAD, mvtec_ad.categories, lambda: Path("x"), ("image",), ("image",)
    )
    _lookup_with(monkeypatch, FakeEntryPoint("ep_spec", spec), FakeEntryPoint("ep_class", Carrier))
    assert get_dataset("ep_spec").loader is MVTecAD
    assert get_dataset("ep_spec").source == "plugin:demo-dist"
    carrier = get_dataset("ep_class")
    assert carrier.loader is Carrier and carrier.modalities == ("image",)
    assert carrier.root_env == "CARRIER_ROOT" and carrier.source == "plugin:demo-dist"
    monkeypatch.setenv("CARRIER_ROOT", "/elsewhere")
    assert carrier.root() == Path("/elsewhere")

    for ep, why in (
        (FakeEntryPoint("bad", ImportError("no module named demo")), "no module named demo"),
        (FakeEntryPoint("bad", Bare), "neither carries list_categories"),
        (FakeEntryPoint("bad", 42), "expected a DatasetSpec, a loader class or a module"),
        (FakeEntryPoint("mvtec_ad", spec), "taken by bench.datasets.mvtec_ad.MVTecAD (builtin)"),
    ):
        with pytest.raises(RuntimeError) as err:
            _lookup_with(monkeypatch, ep)
        text = str(err.value)
        assert f"plugin dataset {ep.name!r} from distribution 'demo-dist' failed to load" in text
        assert why in text


PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party dataset package: a flat folder layout nothing in this repository knows.

    <root>/<category>/train/<id>.png, <root>/<category>/test/<defect or good>/<id>.png,
    <root>/<category>/masks/<defect>/<id>.png
    """
    from pathlib import Path

    from bench.datasets import DatasetSpec, register_dataset
    from bench.datasets.common import (
        CategoryDataset, input_geometry, list_images, read_rgb, resize_crop,
    )


    def flat_categories(root):
        return sorted(p.name for p in Path(root).iterdir() if (p / "train").is_dir())


    class FlatFolders(CategoryDataset):
        """Entry point ``flat``: the class carries what the registry needs."""

        modality = "image"
        gt_key = "mask_path"
        list_categories = staticmethod(flat_categories)
        default_root = "data/flat"
        root_env = "FLAT_ROOT"

        def _index(self):
            base = self.root / self.category
            if self.split == "train":
                return [
                    {"path": p, "defect": "good", "mask_path": None}
                    for p in list_images(base / "train")
                ]
            items = []
            for folder in sorted((base / "test").iterdir()):
                for p in list_images(folder):
                    mask = None if folder.name == "good" else base / "masks" / folder.name / p.name
                    items.append({"path": p, "defect": folder.name, "mask_path": mask})
            return items

        def __getitem__(self, index):
            item = self.items[index]
            raw = read_rgb(item["path"])
            native = (raw.shape[1], raw.shape[2])
            size, box, roi = input_geometry(native, self.image_size, self.crop_size)
            image = resize_crop(raw.float() / 255.0, size, box, "bilinear").clamp_(0, 1)
            return {"image": image, **self.target(item, native, roi)}


    #: entry point ``flat_spec``: a spec, registered under the entry point's name
    SPEC = DatasetSpec(
        "any", FlatFolders, flat_categories, lambda: Path("data/flat"), ("image",), ("image",)
    )


    @register_dataset(  # entry point ``flat_module`` names this module: importing registers
        "flat_decorated", categories=flat_categories, default_root="data/flat",
        modalities=("image",),
    )
    class Decorated(FlatFolders):
        pass
    '''
)


@pytest.fixture(scope="module")
def dataset_plugin_site(tmp_path_factory, plugin_installer) -> Path:
    """The plugin built and installed (pip --target) as a real distribution with entry points."""
    points = {
        "flat": "demo_datasets:FlatFolders",
        "flat_spec": "demo_datasets:SPEC",
        "flat_module": "demo_datasets",
    }
    return plugin_installer(
        tmp_path_factory.mktemp("dataset_plugin"),
        "demo_datasets",
        PLUGIN_MODULE,
        {"adbench.datasets": points},
    )


@pytest.fixture(scope="module")
def flat_root(ad_root, tmp_path_factory) -> Path:
    """The generated washer category rearranged into the plugin's flat layout."""
    root = tmp_path_factory.mktemp("flat")
    src, dst = ad_root / "washer", root / "washer"
    shutil.copytree(src / "train" / "good", dst / "train")
    shutil.copytree(src / "test", dst / "test")
    for mask in (src / "ground_truth").glob("*/*_mask.png"):
        target = dst / "masks" / mask.parent.name / mask.name.replace("_mask", "")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mask, target)
    return root


def _bench(*args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADBENCH_PROGRESS": "0"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([str(BIN / "bench"), *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_plugin_dataset_is_listed_and_benchmarked(dataset_plugin_site, flat_root, tmp_path):
    listed = _bench("list", "--json", site=dataset_plugin_site)
    assert listed.returncode == 0, listed.stderr
    output = json.loads(listed.stdout)
    sets = {d["name"]: d for d in output["datasets"]}
    assert "feature_stats" in {d["name"] for d in output["detectors"]}
    for name in ("flat", "flat_spec", "flat_decorated"):
        assert sets[name]["source"] == "plugin:adbench-demo-datasets", sets[name]
        assert sets[name]["modalities"] == ["image"]
    assert sets["flat"]["root_env"] == "FLAT_ROOT" and sets["flat"]["default_root"] == "data/flat"
    assert sets["flat"]["loader"] == "demo_datasets.FlatFolders"
    assert sets["visa"]["source"] == "builtin" and sets["visa"]["root_env"] == "VISA_ROOT"

    run = _bench(
        *("run", "--detectors", "feature_stats", "--datasets", "flat"),
        *("--root", f"flat={flat_root}", "--image-size", "64", "--no-tracking"),
        *("--output", str(tmp_path), "--name", "plug"),
        site=dataset_plugin_site,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    record = json.loads(
        (tmp_path / "plug" / "jobs" / "feature_stats__flat__washer__seed0.json").read_text()
    )
    n_test = sum(1 for _ in (flat_root / "washer" / "test").glob("*/*.png"))
    assert record["n_test"] == n_test and record["metrics"]["all"]["image_auroc"] > 0.5


@pytest.mark.slow
def test_list_shows_both_tables_and_an_unknown_dataset_is_named(capsys, tmp_path):
    """In this process the plugin is not installed: its dataset is unknown."""
    from bench.cli import main

    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "Registered detectors" in table and "Registered datasets" in table
    assert "VISA_ROOT" in table and "per_category, unified, train_on, shots" in table
    args = ["run", "--detectors", "feature_stats", "--datasets", "flat", "--no-tracking"]
    assert main([*args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'flat'" in err and "known datasets:" in err
