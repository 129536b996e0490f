"""Metrics against scikit-learn and the independent per-threshold AU-PRO of
tests/reference_metrics.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_metrics import au_pro as reference_au_pro
from reference_metrics import f1_max as reference_f1_max
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.evaluation import Evaluator
from bench.metrics import au_pro, auroc, average_precision, f1_max, pixel_metrics, trapezoid_to
from bench.types import Batch, Prediction


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_f1_match_sklearn_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 300) / 7.0  # many ties
    labels = rng.random(300) < 0.3
    assert auroc(t(scores), t(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(t(scores), t(labels)) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    f1 = reference_f1_max(labels, scores)
    assert f1_max(t(scores), t(labels)) == pytest.approx(f1, abs=1e-12)


def test_constant_scores_give_chance_auroc_and_prevalence_ap():
    labels = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    scores = np.full(8, 0.7)
    assert auroc(t(scores), t(labels)) == pytest.approx(0.5)
    assert average_precision(t(scores), t(labels)) == pytest.approx(3 / 8)
    assert roc_auc_score(labels, scores) == pytest.approx(0.5)


def test_auroc_is_nan_with_one_class():
    assert math.isnan(auroc(t([0.1, 0.2]), t([0, 0])))


def test_au_pro_perfect_map_is_one():
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10:14, 10:12] = True
    masks[1, 1:2, 1:2] = True
    maps = masks.astype(np.float64) + 0.01 * np.random.default_rng(0).random(masks.shape)
    maps[masks] += 1
    assert au_pro(t(maps), t(masks)) == pytest.approx(1.0)


def test_au_pro_constant_map_follows_the_diagonal():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    # one threshold: the curve is (0,0)->(1,1); area up to 0.3 is 0.045, normalised 0.15
    assert au_pro(t(np.ones((2, 8, 8))), t(masks)) == pytest.approx(0.15)


def test_au_pro_hand_derived_row():
    # regions {0} and {2}; defect-free pixels score .5, .2, .1 -> curve
    # (0,0) (0,.5) (1/3,.5) (1/3,1) (2/3,1) (1,1): area to 0.3 = 0.15 -> 0.5
    maps = np.array([[[0.9, 0.5, 0.3, 0.2, 0.1]]])
    masks = np.array([[[1, 0, 1, 0, 0]]], dtype=bool)
    assert au_pro(t(maps), t(masks)) == pytest.approx(0.5)


def test_au_pro_regions_are_eight_connected():
    # one diagonal region of 3 pixels (two regions under 4-connectivity, which would give 0.5)
    masks = np.array([[[1, 0, 0], [0, 1, 0], [0, 1, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.4], [0.3, 0.01, 0.2], [0.15, 0.01, 0.1]]])
    assert au_pro(t(maps), t(masks)) == pytest.approx(1 / 3)
    assert reference_au_pro(maps, masks) == pytest.approx(1 / 3)


def test_trapezoid_interpolates_at_the_limit():
    x = torch.tensor([0.0, 0.2, 0.4, 1.0])
    y = torch.tensor([0.0, 0.2, 0.6, 1.0])
    # up to 0.2: 0.02; 0.2..0.3 with y 0.2 -> 0.4: 0.03
    assert trapezoid_to(x, y, 0.3) == pytest.approx(0.05)


@st.composite
def maps_and_masks(draw):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    values = draw(st.lists(st.integers(0, 12), min_size=n * h * w, max_size=n * h * w))
    bits = draw(st.lists(st.booleans(), min_size=n * h * w, max_size=n * h * w))
    maps = np.array(values, dtype=np.float64).reshape(n, h, w)
    masks = np.array(bits).reshape(n, h, w)
    masks.reshape(-1)[0] = True  # at least one region
    masks.reshape(-1)[-1] = False  # at least one defect-free pixel
    return maps, masks


@settings(max_examples=60, deadline=None)
@given(maps_and_masks())
def test_au_pro_matches_the_definition(case):
    maps, masks = case
    assert au_pro(t(maps), t(masks)) == pytest.approx(reference_au_pro(maps, masks), abs=1e-10)


@settings(max_examples=40, deadline=None)
@given(maps_and_masks(), st.randoms(use_true_random=False))
def test_au_pro_invariances(case, rnd):
    maps, masks = case
    value = au_pro(t(maps), t(masks))
    assert 0.0 <= value <= 1.0
    assert au_pro(t(maps * 3 + 7), t(masks)) == pytest.approx(value, abs=1e-12)
    order = list(range(len(maps)))
    rnd.shuffle(order)
    assert au_pro(t(maps[order]), t(masks[order])) == pytest.approx(value, abs=1e-12)


def _batch(masks: torch.Tensor, labels, paths) -> Batch:
    n, h, w = masks.shape
    return Batch(
        label=torch.tensor(labels),
        mask=masks,
        roi=torch.tensor([[0, 0, h, w]] * n),
        meta=[{"path": p, "defect": "good" if y == 0 else "crack"} for p, y in zip(paths, labels)],
    )


def test_evaluator_official_protocol_upsamples_to_native_size_and_matches_direct_metrics():
    rng = np.random.default_rng(3)
    masks = torch.zeros(4, 40, 40, dtype=torch.bool)
    masks[2, 5:15, 5:12] = True
    masks[3, 20:30, 25:35] = True
    low = torch.tensor(rng.random((4, 10, 10)), dtype=torch.float32)
    low[2, 1:4, 1:3] += 1
    low[3, 5:8, 6:9] += 1
    ev = Evaluator("official")
    batch = _batch(masks, [0, 0, 1, 1], ["a", "b", "c", "d"])
    ev.update(Prediction(score=low.flatten(1).amax(1), anomaly_map=low), batch)
    result = ev.compute()
    up = F.interpolate(low[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    assert result["all"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.reshape(-1), up.reshape(-1)), abs=1e-9
    )
    assert result["all"]["au_pro"] == pytest.approx(au_pro(up, masks), abs=1e-12)
    assert result["all"]["image_auroc"] == pytest.approx(
        roc_auc_score([0, 0, 1, 1], low.flatten(1).amax(1))
    )
    assert set(result) == {"all", "crack"}
    assert ev.protocol_label == "official"


def test_evaluator_rejects_nan_maps_and_names_the_file():
    ev = Evaluator()
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    amap = torch.zeros(1, 4, 4)
    amap[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="img_007.png"):
        ev.update(
            Prediction(score=torch.zeros(1), anomaly_map=amap), _batch(masks, [0], ["img_007.png"])
        )


def test_evaluator_crops_the_mask_to_the_model_roi():
    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[1, 0:3, 0:3] = True  # outside the central crop: not scored
    masks[1, 8:12, 8:12] = True
    batch = _batch(masks, [0, 1], ["a", "b"])
    batch.roi = torch.tensor([[5, 5, 15, 15]] * 2)
    ev = Evaluator()
    amap = torch.zeros(2, 10, 10)
    amap[1, 3:7, 3:7] = 1.0
    ev.update(Prediction(score=torch.tensor([0.0, 1.0]), anomaly_map=amap), batch)
    assert ev.masks[1].shape == (10, 10) and int(ev.masks[1].sum()) == 16
    assert ev.protocol_label == "official-cropped"
    assert ev.compute()["all"]["au_pro"] == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(maps_and_masks(), st.integers(1, 9))
def test_streaming_chunks_split_tie_runs_without_changing_any_value(case, chunk):
    maps, masks = case
    whole = pixel_metrics(t(maps), t(masks))
    tiny = pixel_metrics(t(maps), t(masks), chunk=chunk)
    for key, value in whole.items():
        assert tiny[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    flat_scores, flat_mask = maps.reshape(-1), masks.reshape(-1)
    if flat_mask.any() and not flat_mask.all():
        assert tiny["pixel_auroc"] == pytest.approx(
            roc_auc_score(flat_mask, flat_scores), abs=1e-12
        )
        assert tiny["pixel_ap"] == pytest.approx(
            average_precision_score(flat_mask, flat_scores), abs=1e-12
        )
        assert tiny["au_pro"] == pytest.approx(reference_au_pro(maps, masks), abs=1e-10)


def test_per_defect_metrics_equal_scoring_that_subset_alone():
    rng = np.random.default_rng(11)
    n, size = 9, 24
    defects = ["good", "good", "good", "crack", "crack", "hole", "hole", "hole", "crack"]
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, d in enumerate(defects):
        if d != "good":
            y, x = rng.integers(2, 16, 2)
            masks[i, y : y + 5, x : x + rng.integers(2, 7)] = True
    maps = torch.tensor(rng.random((n, size, size)), dtype=torch.float32) + 0.8 * masks
    scores = maps.flatten(1).amax(1)
    batch = Batch(
        label=torch.tensor([int(d != "good") for d in defects]),
        mask=masks,
        roi=torch.tensor([[0, 0, size, size]] * n),
        meta=[{"path": f"{i}.png", "defect": d, "category": "toy"} for i, d in enumerate(defects)],
    )
    ev = Evaluator(chunk=50)  # many chunks
    ev.update(Prediction(score=scores, anomaly_map=maps), batch)
    result = ev.compute()
    assert set(result) == {"all", "crack", "hole"}
    for name in ("all", "crack", "hole"):
        idx = [i for i, d in enumerate(defects) if name == "all" or d in ("good", name)]
        direct = pixel_metrics(maps[idx], masks[idx])
        for key, value in direct.items():
            assert result[name][key] == pytest.approx(value, abs=1e-12), (name, key)
        labels = [int(defects[i] != "good") for i in idx]
        assert result[name]["image_auroc"] == pytest.approx(
            roc_auc_score(labels, scores[idx].numpy())
        )


def test_undefined_metrics_are_nan_with_a_warning_naming_the_category():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    batch = Batch(
        label=torch.tensor([0, 0]),
        mask=masks,
        roi=torch.tensor([[0, 0, 8, 8]] * 2),
        meta=[{"path": "a", "defect": "good", "category": "screw"}] * 2,
    )
    ev = Evaluator()
    ev.update(Prediction(score=torch.tensor([0.1, 0.2]), anomaly_map=torch.rand(2, 8, 8)), batch)
    result = ev.compute()["all"]
    assert all(math.isnan(result[k]) for k in ("image_auroc", "pixel_auroc", "au_pro"))
    assert any("screw: no anomalous test image" in w for w in ev.warnings)


@pytest.mark.parametrize("quantised", [False, True])
def test_binned_path_matches_sklearn_and_the_definition_at_scale(quantised):
    """Thousands of distinct defective scores: the binned event counting is in use."""
    from bench.perf.metrics_perf import make_category

    maps, masks, _ = make_category(24, 96, seed=2)
    if quantised:  # heavy ties, including ties between defective and defect-free pixels
        maps = (maps * 64).round() / 64
    result = pixel_metrics(maps, masks)
    flat_m, flat_s = masks.reshape(-1).numpy(), maps.reshape(-1).numpy()
    assert torch.unique(maps[masks]).numel() > (50 if quantised else 1000)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(flat_m, flat_s), abs=1e-10)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(flat_m, flat_s), abs=1e-10)
    expected = reference_au_pro(maps.numpy(), masks.numpy())
    assert result["au_pro"] == pytest.approx(expected, abs=1e-10)


def test_fast_protocol_scores_at_a_fixed_size_and_says_so():
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[1, 10:30, 10:30] = True
    maps = torch.zeros(2, 10, 10)
    maps[1, 2:8, 2:8] = 1.0
    batch = _batch(masks, [0, 1], ["a", "b"])
    ev = Evaluator("fast", fast_size=20)
    ev.update(Prediction(score=torch.tensor([0.0, 1.0]), anomaly_map=maps), batch)
    assert ev.maps[1].shape == (20, 20) and ev.masks[1].shape == (20, 20)
    assert int(ev.masks[1].sum()) == 100 and ev.protocol_label == "fast"
    # independently: maps bilinear and masks nearest to 20 px, scored by scikit-learn
    up = F.interpolate(maps[:, None], size=(20, 20), mode="bilinear", align_corners=False)
    down = masks[:, None].float()[:, :, ::2, ::2]  # nearest from 40 to 20 px: even rows, cols
    assert torch.equal(torch.stack(ev.masks), down[:, 0].bool())
    expected = roc_auc_score(down.reshape(-1).numpy(), up.reshape(-1).numpy())
    assert ev.compute()["all"]["pixel_auroc"] == pytest.approx(expected, abs=1e-12)


def _adversarial_scores(kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive scores, other scores) float32 that stress the binned event lookup."""
    if kind == "uniform":
        pos, other = rng.random(5000), rng.random(200_000)
    elif kind == "clustered":  # most positives inside one bin of the linear binning
        pos = np.concatenate([rng.random(200), 0.5 + rng.random(4000) * 1e-5])
        other = np.concatenate([rng.random(50_000), 0.5 + rng.random(50_000) * 2e-5])
    elif kind == "quantised":  # ties between positives and the rest
        pos, other = rng.integers(0, 300, 5000) / 300, rng.integers(-10, 330, 200_000) / 300
    elif kind == "wide":  # huge dynamic range, negatives, values outside the positives' range
        pos = rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)
        other = rng.standard_normal(200_000) * 10.0 ** rng.integers(-35, 35, 200_000)
    else:  # "narrow": a range too small for float32 bins
        pos = 1e-40 * rng.integers(0, 100, 5000)
        other = 1e-40 * rng.integers(-5, 105, 200_000)
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return as_t(pos), as_t(np.concatenate([other, pos[:500]]))


@pytest.mark.parametrize("kind", ["uniform", "clustered", "quantised", "wide", "narrow"])
def test_binned_event_lookup_equals_binary_search(kind):
    """Both ways of resolving scores that share a bin with positives (NumPy on the CPU, torch on
    a GPU) give the event a plain binary search gives."""
    from bench import metrics

    pos, other = _adversarial_scores(kind, np.random.default_rng(3))
    u = torch.unique(pos)
    # the event by binary search, written here: 2 * (positives below) + (equal to one)
    u_np, x_np = u.numpy(), other.numpy()
    below = np.searchsorted(u_np, x_np, side="left")
    equal = u_np[np.minimum(below, len(u_np) - 1)] == x_np
    expected = torch.from_numpy(2 * below.astype(np.int64) + equal)
    bins = metrics._binning(u)
    assert (bins is None) == (kind == "narrow")
    assert torch.equal(metrics._events(other, u, bins).long(), expected)
    if bins is not None:
        offset, scale, nbins, table, u_padded = bins
        events = table.index_select(0, metrics._bin_of(other, offset, scale, nbins))
        metrics._resolve_torch(other, events, u, u_padded)
        assert torch.equal(events.long(), expected)


def test_curves_run_from_origin_to_one_and_integrate_to_the_auroc():
    """Below CURVE_POINTS thresholds the stored ROC curve is the full curve: its area is the
    pixel AUROC, and its PRO curve ends at 1."""
    from bench.metrics import score_metrics

    rng = np.random.default_rng(8)
    masks = torch.from_numpy(rng.random((4, 12, 12)) < 0.1)
    maps = (
        torch.from_numpy((rng.integers(0, 40, (4, 12, 12)) / 40).astype(np.float32)) + masks * 0.2
    )
    curves: dict = {}
    out = score_metrics(list(maps), list(masks), [0] * 4, {"all": [0]}, curves=curves)
    fpr, tpr, pro = (np.array(curves[k]) for k in ("fpr", "tpr", "pro"))
    assert (fpr[0], tpr[0], pro[0]) == (0, 0, 0) and (fpr[-1], tpr[-1], pro[-1]) == (1, 1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (np.diff(pro) >= 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(out["all"]["pixel_auroc"], abs=1e-5)


@pytest.mark.parametrize("block", [1, 6])
def test_sweeping_in_blocks_changes_no_value_or_curve_point(monkeypatch, block):
    """Each subset's curves are swept a block of distinct defective scores at a time: tiny
    blocks give the values and curve points of one block, and scikit-learn's and the
    definition's values; scores of both signs, +0.0 and -0.0 (one score) included."""
    from bench.metrics import events, score_metrics
    from bench.perf.metrics_perf import make_category

    maps, masks, defects = make_category(10, 24, seed=6)
    maps = maps - 0.9
    first = int(np.flatnonzero([bool(m.any()) for m in masks])[0])
    maps[first][masks[first]] = torch.where(
        torch.arange(int(masks[first].sum())) % 2 == 0, 0.0, -0.0
    )
    maps[first][~masks[first]] = -0.0  # defect-free pixels tied with defective ones
    groups = [0 if d == "good" else 1 + ["crack", "hole", "scratch"].index(d) for d in defects]
    subsets = {"all": [0, 1, 2, 3], "crack": [0, 1], "hole": [0, 2, 3]}
    args = (list(maps), list(masks), groups, subsets, 0.3, 100)
    whole_curves, tiny_curves = {}, {}
    whole = score_metrics(*args, whole_curves, {"au_pro_05": 0.05})
    monkeypatch.setattr(events, "BLOCK", block)
    tiny = score_metrics(*args, tiny_curves, {"au_pro_05": 0.05})
    assert tiny_curves == whole_curves and len(whole_curves["fpr"]) > 100
    for name, values in whole.items():
        assert tiny[name] == pytest.approx(values, abs=1e-12), name
        idx = [i for i, g in enumerate(groups) if g in subsets[name]]
        flat_m, flat_s = masks[idx].reshape(-1).numpy(), maps[idx].reshape(-1).numpy()
        assert tiny[name]["pixel_auroc"] == pytest.approx(roc_auc_score(flat_m, flat_s), abs=1e-12)
        expected_ap = average_precision_score(flat_m, flat_s)
        assert tiny[name]["pixel_ap"] == pytest.approx(expected_ap, abs=1e-12)
        expected = reference_au_pro(maps[idx].numpy(), masks[idx].numpy())
        assert tiny[name]["au_pro"] == pytest.approx(expected, abs=1e-10)
        expected = reference_au_pro(maps[idx].numpy(), masks[idx].numpy(), 0.05)
        assert tiny[name]["au_pro_05"] == pytest.approx(expected, abs=1e-10)
