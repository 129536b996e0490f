"""Pretrained weights: the packaged EfficientNet-Lite0 checkpoint, local files, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

from bench.backbones import WeightsNotFoundError, create_backbone, packaged_efficientnet_lite0
from bench.datasets import MVTecAD
from bench.loading import EpochLoader
from bench.metrics import auroc
from bench.registry import create_detector


@pytest.mark.slow
def test_packaged_lite0_weights_land_in_timm_by_position():
    packaged = torch.load(packaged_efficientnet_lite0(), map_location="cpu", weights_only=True)
    model = create_backbone("efficientnet_lite0", "pretrained", (2, 3))
    state = model.state_dict()
    assert torch.equal(state["conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(state["bn1.running_var"], packaged["_bn0.running_var"])
    assert not any(p.requires_grad for p in model.parameters())  # frozen
    features = model(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [40, 112]


def test_local_checkpoint_by_name(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "r18.pth")
    model = create_backbone("resnet18", str(tmp_path / "r18.pth"), (2, 3))
    assert torch.equal(model.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_missing_checkpoint_and_unknown_names_are_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        create_backbone("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_backbone("resnet_does_not_exist", "random")


@pytest.mark.slow
def test_pretrained_weights_missing_offline_is_an_error_not_random(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the check runs in a fresh interpreter
    code = (
        "from bench.backbones import create_backbone\n"
        "try:\n    create_backbone('resnet18', 'pretrained')\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.startswith("WeightsNotFoundError no pretrained weights for 'resnet18'"), (
        out.stdout + out.stderr
    )


@pytest.mark.slow
def test_real_features_separate_bottle_defects(bottle):
    """Real ImageNet features on real data: a small subset of MVTec AD bottle."""
    train = MVTecAD(bottle.parent, "bottle", "train", image_size=224)
    train.items = train.items[:40]
    test = MVTecAD(bottle.parent, "bottle", "test", image_size=224)
    test.items = [it for it in test.items if it["defect"] == "good"][:12] + [
        it for it in test.items if it["defect"] == "broken_large"
    ][:12]
    det = create_detector("feature_stats")
    det.fit(EpochLoader(train, 8))
    scores, labels = [], []
    for batch in EpochLoader(test, 8):
        scores.append(det.predict(batch).score)
        labels.append(batch.label)
    assert auroc(torch.cat(scores), torch.cat(labels)) >= 0.95


def test_random_weights_only_when_asked():
    random = create_backbone("efficientnet_lite0", "random").state_dict()["conv_stem.weight"]
    packaged = create_backbone("efficientnet_lite0").state_dict()["conv_stem.weight"]
    assert not torch.equal(random, packaged)
