"""BTAD and MPDD on generated data in their official layouts: counts, file types per BTAD
category, masks (BTAD: white pixels; MPDD: MVTec AD's rule), errors naming the file, the
registry entries and the generators' determinism."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.datasets import DatasetLayoutError, MVTecAD, get_dataset, synthetic_btad, synthetic_mpdd
from bench.datasets.btad import BTAD, categories
from bench.errors import DataError

N_TRAIN, N_GOOD, N_KO = 4, 2, 3


@pytest.fixture(scope="module")
def btad_root(tmp_path_factory) -> Path:
    return synthetic_btad.generate(
        tmp_path_factory.mktemp("btad"), n_train=N_TRAIN, n_test_good=N_GOOD, n_anomaly=N_KO
    )


@pytest.fixture(scope="module")
def mpdd_root(tmp_path_factory) -> Path:
    return synthetic_mpdd.generate(
        tmp_path_factory.mktemp("mpdd"), size=64, n_train=3, n_test_good=2, n_per_defect=2
    )


@pytest.fixture
def btad_copy(btad_root, tmp_path) -> Path:
    return Path(shutil.copytree(btad_root, tmp_path / "btad"))


def test_btad_layout_file_types_counts_and_labels(btad_root):
    assert categories(btad_root) == ["01", "02", "03"]
    # the release's file types (anomalib PR #162): images bmp/png/bmp, masks png/png/bmp
    types = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for category, (image_type, mask_type) in types.items():
        base = btad_root / category
        assert {p.suffix for p in base.glob("t*/*/*")} == {image_type}
        assert {p.suffix for p in (base / "ground_truth" / "ko").iterdir()} == {mask_type}
        train = BTAD(btad_root, category, "train", image_size=32)
        test = BTAD(btad_root, category, "test", image_size=32)
        assert len(train) == N_TRAIN and train.defect_types == ["good"]
        assert len(test) == N_GOOD + N_KO and test.defect_types == ["good", "ko"]
        for i, item in enumerate(test.items):
            assert int(test[i]["label"]) == (Path(item["path"]).parent.name == "ko")
            if item["mask_path"] is not None:
                assert item["mask_path"] == base / "ground_truth" / "ko" / (
                    Path(item["path"]).stem + mask_type
                )


def test_btad_masks_count_white_pixels_only(btad_copy):
    test = BTAD(btad_copy, "02", "test", image_size=32)
    i = next(i for i, it in enumerate(test.items) if it["defect"] == "ko")
    path = test.items[i]["mask_path"]
    raw = np.asarray(Image.open(path).convert("L")).copy()
    assert set(np.unique(raw)) == {0, 255}
    sample = test[i]
    assert sample["mask"].shape == raw.shape == test.native_size(test.items[i])
    assert torch.equal(sample["mask"], torch.from_numpy(raw == 255)) and sample["mask"].any()
    raw[:3, :3] = 128  # grey: not anomalous (anomalib keeps value // 255)
    Image.fromarray(raw).save(path)
    assert torch.equal(test[i]["mask"], torch.from_numpy(raw == 255))


def test_btad_errors_name_the_file(btad_copy):
    mask = btad_copy / "03" / "ground_truth" / "ko" / "0001.bmp"
    mask.unlink()
    expected = btad_copy / "03" / "ground_truth" / "ko" / "0001"
    with pytest.raises(DatasetLayoutError, match=f"expected {expected}.png or .bmp"):
        BTAD(btad_copy, "03", "test")
    BTAD(btad_copy, "03", "train")  # training needs no mask
    (btad_copy / "01" / "train" / "ko").mkdir()
    with pytest.raises(DatasetLayoutError, match="train holds only ok"):
        BTAD(btad_copy, "01", "train")
    small = btad_copy / "02" / "ground_truth" / "ko" / "0000.png"
    Image.new("L", (5, 5)).save(small)
    test = BTAD(btad_copy, "02", "test")
    i = next(i for i, it in enumerate(test.items) if it["mask_path"] == small)
    with pytest.raises(DataError, match=f"mask {small} is \\(5, 5\\), expected \\(96, 96\\)"):
        test[i]
    shutil.rmtree(btad_copy / "02" / "train")
    with pytest.raises(DatasetLayoutError, match=r"\['02'\] cannot be loaded.*02 has no train/ok"):
        get_dataset("btad").categories(btad_copy)


def test_mpdd_reads_mvtec_ad_layout_with_mpdd_defects(mpdd_root):
    spec = get_dataset("mpdd")
    assert spec.loader is MVTecAD and get_dataset("builtin_mpdd").loader is MVTecAD
    assert spec.categories(mpdd_root) == ["bracket_black", "metal_plate"]
    test = spec.open("bracket_black", "test", mpdd_root, image_size=32)
    assert test.defect_types == ["good", "hole", "scratches"] and len(test) == 2 + 2 * 2
    for i, item in enumerate(test.items):
        sample = test[i]
        if item["defect"] == "good":
            assert not sample["mask"].any()
            continue
        path = Path(item["path"])
        gt = mpdd_root / "bracket_black" / "ground_truth" / item["defect"] / f"{path.stem}_mask.png"
        expected = np.asarray(Image.open(gt)) > 0
        assert sample["mask"].any() and torch.equal(sample["mask"], torch.from_numpy(expected))
    defects = spec.open("metal_plate", "test", mpdd_root).defect_types
    assert defects == ["good", "major_rust", "scratch"]


def test_registry_roots_and_download_names(monkeypatch):
    for name, env, default in (
        ("btad", "BTAD_ROOT", "data/btad"),
        ("mpdd", "MPDD_ROOT", "data/mpdd"),
    ):
        spec = get_dataset(name)
        assert spec.root_env == env and spec.download == name and spec.modalities == ("image",)
        monkeypatch.delenv(env, raising=False)
        assert spec.root() == Path(default)
        monkeypatch.setenv(env, "/somewhere")
        assert spec.root() == Path("/somewhere")
    assert get_dataset("builtin_btad").loader is BTAD
    assert get_dataset("builtin_btad").download is get_dataset("builtin_mpdd").download is None


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("generate", "kwargs"),
    [
        (
            synthetic_btad.generate,
            {"categories": ("03",), "n_train": 2, "n_test_good": 1, "n_anomaly": 2},
        ),
        (synthetic_mpdd.generate, {"size": 48, "n_train": 1, "n_test_good": 1, "n_per_defect": 1}),
    ],
)
def test_generators_write_the_same_bytes_for_the_same_seed(tmp_path, generate, kwargs):
    first = _digest(generate(tmp_path / "a", **kwargs))
    assert first and first == _digest(generate(tmp_path / "b", **kwargs))
    assert first != _digest(generate(tmp_path / "c", seed=1, **kwargs))
