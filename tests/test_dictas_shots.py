"""DictAS's official k-shot reference lists, shipped with the paper configs under the original
MVTec AD and VisA file names, and the paper configs that use them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bench.config import load_config, packaged_file
from bench.datasets import synthetic_visa
from bench.plan import plan_jobs
from bench.scopes import read_shot_file

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
         "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]  # fmt: skip
#: training images per MVTec AD category (the official dataset)
MVTEC_TRAIN = dict(zip(MVTEC, [209, 224, 219, 280, 264, 391, 245, 220, 267, 320, 230, 60, 213,
                               247, 240]))  # fmt: skip
VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
        "pcb2", "pcb3", "pcb4", "pipe_fryum"]  # fmt: skip


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_shipped_lists_hold_k_training_images_of_every_category(k):
    mvtec = [
        line for _, line in read_shot_file(packaged_file(f"shots/dictas/mvtec_ad/{k}-shot.txt"))
    ]
    assert Counter(p.split("/")[0] for p in mvtec) == {c: k for c in MVTEC}
    for path in mvtec:
        category, split, good, name = path.split("/")
        assert (split, good) == ("train", "good") and name.endswith(".png")
        assert 0 <= int(name[:-4]) < MVTEC_TRAIN[category] and len(name) == 7
    assert len(set(mvtec)) == len(mvtec)
    visa = [line for _, line in read_shot_file(packaged_file(f"shots/dictas/visa/{k}-shot.txt"))]
    assert Counter(p.split("/")[0] for p in visa) == {c: k for c in VISA}
    assert all(p.split("/")[1:4] == ["Data", "Images", "Normal"] and p.endswith(".JPG")
               for p in visa)  # fmt: skip
    assert len(set(visa)) == len(visa)


@pytest.mark.slow
def test_official_bottle_references_are_real_training_images(bottle):
    for k in (1, 2, 4, 8, 16):
        listed = read_shot_file(packaged_file(f"shots/dictas/mvtec_ad/{k}-shot.txt"))
        ours = [line for _, line in listed if line.startswith("bottle/")]
        assert len(ours) == k and all((bottle.parent / p).is_file() for p in ours)
    # the authors' renamed mvtec_000091.bmp is the 92nd training image of the first category
    first = read_shot_file(packaged_file("shots/dictas/mvtec_ad/1-shot.txt"))[0][1]
    assert first == "bottle/train/good/091.png"


@pytest.mark.slow
def test_paper_config_uses_the_official_list_in_both_test_modes(bottle, tmp_path, monkeypatch):
    """dictas-mvtec on the real bottle alone: both rows (best segmentation, best classification)
    get the official 4 references, and share one training and one reference stage (the test
    mode only changes scoring); the list's lines of other categories are left alone."""
    visa = synthetic_visa.generate(tmp_path / "visa", n_train=2, n_test_good=1, n_anomaly=1)
    monkeypatch.setenv("MVTEC_AD_ROOT", str(bottle.parent))
    monkeypatch.setenv("VISA_ROOT", str(visa))
    cfg = load_config("dictas-mvtec")
    cfg.categories = ["bottle"]
    jobs = plan_jobs(cfg)
    assert [j.detector.display for j in jobs] == ["dictas", "dictas classification"]
    official = ("bottle/train/good/091.png", "bottle/train/good/097.png",
                "bottle/train/good/178.png", "bottle/train/good/207.png")  # fmt: skip
    assert all(j.references == official for j in jobs)
    assert [j.params["test_mode"] for j in jobs] == ["segmentation", "classification"]
    assert jobs[0].fit.parent.hash == jobs[1].fit.parent.hash
    assert jobs[0].fit.hash == jobs[1].fit.hash
    assert Path(cfg.detectors[0].shot_files[0]).is_file()
