"""Loaders on generated data (exact counts, masks, geometry) and on the real bottle category."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bench.datasets import (
    DatasetLayoutError,
    MVTec3D,
    MVTecAD,
    get_dataset,
    mvtec_3d,
    mvtec_ad,
    synthetic_3d,
    synthetic_ad,
)
from bench.types import collate


def test_generated_2d_counts_defects_and_masks(ad_root):
    assert mvtec_ad.categories(ad_root) == sorted(synthetic_ad.CATEGORIES)
    train = MVTecAD(ad_root, "washer", "train", image_size=64)
    test = MVTecAD(ad_root, "washer", "test", image_size=64)
    assert len(train) == 12 and len(test) == 4 + 3 * len(synthetic_ad.DEFECTS)
    assert test.defect_types == sorted(["good", *synthetic_ad.DEFECTS])
    sample = test[len(test) - 1]
    assert (
        sample["image"].shape == (3, 64, 64)
        and 0 <= sample["image"].min() <= sample["image"].max() <= 1
    )
    assert sample["mask"].shape == (128, 128) and sample["mask"].dtype == torch.bool  # native size
    gt = (
        np.asarray(
            Image.open(
                ad_root
                / "washer"
                / "ground_truth"
                / sample["meta"]["defect"]
                / f"{sample['meta']['path'][-7:-4]}_mask.png"
            )
        )
        > 0
    )
    assert torch.equal(sample["mask"], torch.from_numpy(gt))
    assert sample["label"] == 1 and sample["mask"].any()
    for item in test:
        assert bool(item["mask"].any()) == bool(item["label"])  # good images have empty masks


def test_crop_records_the_roi_in_native_pixels(ad_root):
    ds = MVTecAD(ad_root, "weave", "test", image_size=64, crop_size=48)
    sample = ds[0]
    assert sample["image"].shape == (3, 48, 48)
    assert sample["roi"].tolist() == [16, 16, 112, 112]  # (64-48)/2 = 8 px at 2x scale


def test_generated_3d_counts_shapes_and_missing_points(ad3d_root):
    assert mvtec_3d.categories(ad3d_root) == sorted(synthetic_3d.CATEGORIES)
    h, w = synthetic_3d.CATEGORIES["puck"]
    for split, n in (("train", 8), ("validation", 2), ("test", 4 + 3 * len(synthetic_3d.DEFECTS))):
        assert len(MVTec3D(ad3d_root, "puck", split)) == n
    ds = MVTec3D(ad3d_root, "puck", "test", image_size=None)
    item = ds[len(ds) - 1]
    raw = tifffile.imread(item["meta"]["path"])
    assert raw.dtype == np.float32 and raw.shape == (h, w, 3)
    assert item["xyz"].shape == (3, h, w) and item["mask"].shape == (h, w)
    assert torch.equal(item["valid"], torch.from_numpy((raw != 0).any(-1)))
    assert 0 < (~item["valid"]).sum() < 0.2 * h * w  # some dropouts, mostly valid
    small = MVTec3D(ad3d_root, "puck", "test", image_size=64)[len(ds) - 1]
    assert small["xyz"].shape == (3, 64, 64) and small["mask"].shape == (h, w)
    assert torch.equal(small["valid"], (small["xyz"] != 0).any(0))  # nearest keeps points intact


def test_3d_generator_masks_are_exactly_the_displaced_pixels():
    rng = np.random.default_rng(5)
    shape = (96, 96)
    rows, cols = np.mgrid[0:96, 0:96].astype(float)
    support = np.hypot(rows - 48, cols - 48) < 40
    for defect in synthetic_3d.DEFECTS:
        disp, mask = synthetic_3d._defect(rng, shape, support, defect, 5e-4)
        assert mask.sum() >= 12
        assert np.array_equal(disp != 0, mask)


def test_generators_are_deterministic(tmp_path):
    a = synthetic_ad.generate(
        tmp_path / "a", categories=("weave",), size=64, n_train=2, n_test_good=1, n_per_defect=1
    )
    b = synthetic_ad.generate(
        tmp_path / "b", categories=("weave",), size=64, n_train=2, n_test_good=1, n_per_defect=1
    )
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_missing_root_names_the_path_and_shows_the_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*ground_truth") as err:
        mvtec_ad.categories(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DatasetLayoutError, match=r"missing folder .*validation"):
        (tmp_path / "cat" / "train" / "good" / "xyz").mkdir(parents=True)
        MVTec3D(tmp_path, "cat", "validation")


def test_missing_mask_is_an_error_naming_both_files(tmp_path, ad_root):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ad_root / "weave", root / "weave")
    victim = root / "weave" / "ground_truth" / "crack" / "001_mask.png"
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match="001_mask.png") as err:
        MVTecAD(root, "weave", "test")
    assert "test/crack/001.png" in str(err.value)


def test_truncated_and_wrong_shape_tiffs_name_the_file(tmp_path, ad3d_root):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ad3d_root / "dome", root / "dome")
    xyz_dir = root / "dome" / "train" / "good" / "xyz"
    truncated = xyz_dir / "000.tiff"
    truncated.write_bytes(truncated.read_bytes()[:500])
    tifffile.imwrite(xyz_dir / "001.tiff", np.zeros((10, 10), dtype=np.float32))
    ds = MVTec3D(root, "dome", "train")
    with pytest.raises(ValueError, match="000.tiff"):
        ds[0]
    with pytest.raises(ValueError, match=r"001.tiff has shape \(10, 10\), expected HxWx3"):
        ds[1]


def test_collate_stacks_samples_into_a_batch(ad_root):
    ds = MVTecAD(ad_root, "washer", "test", image_size=32)
    good = next(i for i, it in enumerate(ds.items) if it["defect"] == "good")
    batch = collate([ds[good], ds[len(ds) - 1]])
    assert batch.image.shape == (2, 3, 32, 32) and batch.mask.shape == (2, 128, 128)
    assert batch.label.tolist() == [0, 1] and len(batch) == 2 and batch.roi.shape == (2, 4)


def test_dataset_registry_knows_the_built_in_data():
    spec = get_dataset("builtin_3d")
    assert spec.loader is MVTec3D and "point_cloud" in spec.modalities
    with pytest.raises(
        KeyError,
        match="known datasets: anomaly_shapenet, btad, builtin_3d, builtin_ad, builtin_ad2, "
        "builtin_btad, builtin_folder, builtin_loco, builtin_mpdd, builtin_points, builtin_visa, "
        "folder, mpdd, mvtec_3d, mvtec_ad, mvtec_ad2, mvtec_loco, real3d_ad, visa",
    ):
        get_dataset("mvtec")


@pytest.mark.slow
def test_real_bottle_category(bottle):
    root = bottle.parent
    train = MVTecAD(root, "bottle", "train", image_size=224)
    test = MVTecAD(root, "bottle", "test", image_size=224)
    assert len(train) == 209 and len(test) == 83
    assert test.defect_types == ["broken_large", "broken_small", "contamination", "good"]
    assert sum(it["mask_path"] is not None for it in test.items) == 63
    bad = next(i for i, it in enumerate(test.items) if it["defect"] == "contamination")
    sample = test[bad]
    assert sample["mask"].shape == (900, 900) and sample["mask"].any() and sample["label"] == 1
    assert sample["image"].shape == (3, 224, 224)


@pytest.mark.parametrize(
    "resampling, pil_filter",
    [("pil-bilinear", Image.Resampling.BILINEAR), ("pil-bicubic", Image.Resampling.BICUBIC)],
)
def test_pil_resampling_is_pils_own_resize_of_the_8bit_image(ad_root, resampling, pil_filter):
    """The official loaders' input (torchvision Resize on a PIL image, then the centre crop):
    PIL's resize of the decoded uint8 image, exactly; the default tensor resize differs."""
    kwargs = {"image_size": (80, 72), "crop_size": (64, 60)}  # not square: (h, w) order matters
    pil = MVTecAD(ad_root, "washer", "test", resampling=resampling, **kwargs)
    tensor = MVTecAD(ad_root, "washer", "test", **kwargs)
    index = len(pil) - 1
    with Image.open(pil.items[index]["path"]) as img:
        resized = np.asarray(img.convert("RGB").resize((72, 80), pil_filter))
    expected = torch.from_numpy(resized[8:72, 6:66].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(pil[index]["image"], expected)
    assert not torch.equal(tensor[index]["image"], expected)
    assert pil[index]["roi"].tolist() == tensor[index]["roi"].tolist()
    assert torch.equal(pil[index]["mask"], tensor[index]["mask"])  # masks stay at native size


def test_mvtec_3d_resamples_only_the_rgb_image(ad3d_root):
    dataset = MVTec3D(ad3d_root, "dome", "test", image_size=48, resampling="pil-bilinear")
    pil, tensor = dataset[0], MVTec3D(ad3d_root, "dome", "test", image_size=48)[0]
    with Image.open(dataset.items[0]["rgb_path"]) as img:
        rgb = np.asarray(img.convert("RGB").resize((48, 48), Image.Resampling.BILINEAR))
    assert torch.equal(pil["rgb"], torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255)
    assert torch.equal(pil["xyz"], tensor["xyz"]) and torch.equal(pil["valid"], tensor["valid"])


def test_an_unknown_resampling_is_refused_by_name(ad_root):
    with pytest.raises(ValueError, match=r"resampling must be one of .*got 'lanczos'"):
        MVTecAD(ad_root, "washer", "test", resampling="lanczos")
