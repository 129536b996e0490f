"""Frozen pretrained parts are rebuilt from the parameters, never saved: knn's and
feature_stats's ``fitted.pt`` hold what they learned only, load into a fresh detector and score
bit-identically; a state file written before (with the backbone inside) still loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.registry import create_detector
from bench.types import Batch

PARAMS = {
    "knn": {"backbone": "efficientnet_lite0", "coreset_ratio": 0.5, "discover_types": False},
    "feature_stats": {},
}


def _images(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _fitted(name: str):
    det = create_detector(name, **PARAMS[name])
    det.fit([Batch(label=torch.zeros(3), image=_images(0, 3))])
    return det


def _predict(det) -> tuple[torch.Tensor, torch.Tensor]:
    pred = det.predict(Batch(label=torch.zeros(2), image=_images(1, 2)))
    return pred.score, pred.anomaly_map


@pytest.mark.slow
def test_the_saved_state_holds_no_network_and_scores_bit_identically(tmp_path):
    for name in PARAMS:
        det = _fitted(name)
        det.save_state(tmp_path / f"{name}.pt")
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=False)["state"]
        assert saved and not any(isinstance(v, nn.Module) for v in saved.values()), name
        assert "extractor" not in saved and "extractor_" not in saved
        fresh = create_detector(name, **PARAMS[name])
        fresh.load_state(tmp_path / f"{name}.pt")
        for ours, theirs in zip(_predict(det), _predict(fresh), strict=True):
            assert torch.equal(ours, theirs), name


@pytest.mark.slow
def test_a_state_saved_with_the_backbone_inside_still_loads_and_scores_the_same(tmp_path):
    """The format before frozen parts were left out: ``extractor_`` in the state."""
    for name in PARAMS:
        det = _fitted(name)
        state = {k: v for k, v in det.fitted_state().items()}
        state["extractor_"] = det.extractor
        blob = {"class": type(det).__qualname__, "params": det.get_params(), "state": state}
        torch.save(blob, tmp_path / f"{name}-old.pt")
        fresh = create_detector(name, **PARAMS[name])
        fresh.load_state(tmp_path / f"{name}-old.pt")
        assert "extractor_" not in vars(fresh)  # dropped, not kept beside the rebuilt one
        for ours, theirs in zip(_predict(det), _predict(fresh), strict=True):
            assert torch.equal(ours, theirs), name
