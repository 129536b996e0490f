"""knn against anomalib 2.7's PatchCore (``PatchcoreModel`` and ``KCenterGreedy``, installed in
.venv-perf): the 3x3-averaged stage features it uses as embedding, its k-center loop from one
shared start on our projection, and on our bank and features its L2 patch scores, map (nearest
upsampling, kornia's blur), image scores and neighbourhood reweighting."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.adapters.common import gaussian_blur, patch_features
from bench.adapters.knn import KNNPatchDistance
from bench.adapters.knn.coreset import coreset_projection, greedy_coreset
from bench.backbones import normalize
from bench.parity import Report, share_weights
from bench.parity.knn_common import (
    LAYERS,
    RATIO,
    SEED,
    SIGMA,
    SIZE,
    as_batch,
    our_coreset,
    rounding_note,
)


class _GivenProjection:
    """Stands in for anomalib's SparseRandomProjection so that its sampler sees our points."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points

    def fit(self, _embedding: torch.Tensor) -> _GivenProjection:
        return self

    def transform(self, _embedding: torch.Tensor) -> torch.Tensor:
        return self.points


def anomalib_rows(reference, train, test, ours: KNNPatchDistance, report: Report) -> None:
    """The anomalib rows, on our memory bank and patch features."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=LAYERS, backbone="wide_resnet50_2", pre_trained=False).eval()
    share_weights(reference, model.feature_extractor.feature_extractor)
    _embedding_row(model, train, ours, report)
    bank = _coreset_row(train, ours, report)
    patch, locations, flat = _patch_score_rows(model, bank, test, ours, report)
    pred = _map_rows(model, patch, test, ours, report)
    _image_score_rows(model, patch, locations, flat, pred, test, ours, report)


def _embedding_row(model: Any, train, ours: KNNPatchDistance, report: Report) -> None:
    """anomalib's embedding: the 3x3-averaged stages, concatenated."""
    x_train = normalize(train)
    with torch.no_grad():
        stages = model.feature_extractor(x_train)
        embedding = model.generate_embedding(
            {k: model.feature_pooler(v) for k, v in stages.items()}
        )
    report.add(
        "3x3-averaged stages, concatenated (anomalib's embedding, 1536-d)",
        patch_features(ours.extractor, x_train),
        embedding,
    )


def _coreset_row(train, ours: KNNPatchDistance, report: Report) -> torch.Tensor:
    """KCenterGreedy's picks from one shared start on our projection; returns our bank before
    the coreset."""
    from anomalib.models.components import KCenterGreedy

    bank = ours.embed(train).permute(0, 2, 3, 1).flatten(0, 2)
    points = coreset_projection(bank, 128, SEED)
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=RATIO)
    sampler.model = _GivenProjection(points)
    torch.manual_seed(SEED)
    start = int(torch.randint(high=len(bank), size=(1,)).squeeze())
    torch.manual_seed(SEED)  # anomalib draws the same start now
    picks = greedy_coreset(points, sampler.coreset_size, start=start, seed=SEED)
    report.add(
        "k-center picks from one shared start, our projection (KCenterGreedy)",
        picks,
        sampler.select_coreset_idxs(),
        tolerance=0,
    )
    return bank


def _patch_score_rows(model: Any, bank: torch.Tensor, test, ours: KNNPatchDistance, report):
    """On one memory bank (our coreset of ``bank``): the nearest entries and the L2 patch
    scores. Returns our patch scores [B, h, w], anomalib's nearest entries and the queries."""
    ours.bank_ = bank[our_coreset(ours, bank)]
    model.memory_bank = ours.bank_.clone()
    ours.squared = False  # anomalib's patch score is the L2 distance
    patch, nn_idx, queries = ours.patch_scores(test)
    flat = queries.flatten(0, 1)
    with torch.no_grad():
        scores, locations = model.nearest_neighbors(flat, n_neighbors=1)
    report.add(
        "nearest bank entry of each test patch (indices)", nn_idx.flatten(), locations, tolerance=0
    )
    exact = np.sqrt(((flat.double() - ours.bank_.double()[nn_idx.flatten()]) ** 2).sum(1).numpy())
    report.add("patch scores (L2; ours with squared=False) vs float64", patch.flatten(), exact)
    explained = rounding_note(
        "anomalib's euclidean_dist",
        "models/image/patchcore/torch_model.py:313-319",
        scores,
        patch.flatten(),
        exact,
    )
    report.add(
        "patch scores (L2; ours with squared=False) vs anomalib",
        patch.flatten(),
        scores,
        explained=explained,
    )
    return patch, locations, flat


def _map_rows(model: Any, patch: torch.Tensor, test, ours: KNNPatchDistance, report: Report):
    """The map from the same patch scores: upsampling, blur (also away from the border) and
    both. Returns our prediction."""
    scores = patch.flatten()  # the rest from the same patch scores
    b, h, w = patch.shape
    ours.sigma = 0
    upsampled = ours.predict(as_batch(test)).anomaly_map
    ours.sigma = SIGMA
    pred = ours.predict(as_batch(test))
    with torch.no_grad():
        theirs = model.anomaly_map_generator(scores.view(b, 1, h, w), (SIZE, SIZE))[:, 0]
        nearest_up = F.interpolate(scores.view(b, 1, h, w), size=(SIZE, SIZE))[:, 0]
        blurred = model.anomaly_map_generator.blur(upsampled[:, None])[:, 0]
    report.add(
        "map upsampled (before the blur)",
        upsampled,
        nearest_up,
        explained="anomalib upsamples by nearest neighbour (patchcore/anomaly_map.py:82, "
        "F.interpolate's default mode), ours bilinearly as the official code "
        "(src/patchcore/common.py:199-201)",
    )
    report.add(
        f"Gaussian blur (sigma {SIGMA}) of one map",
        gaussian_blur(upsampled, SIGMA),
        blurred,
        explained="the same 33-tap kernel (2 * int(4 sigma + 0.5) + 1, "
        "patchcore/anomaly_map.py:58), but kornia pads with torch's reflect, which leaves the edge "
        "pixel out (components/filters/blur.py:131); ours pads as scipy's reflect, which "
        "repeats it, as the official gaussian_filter (src/patchcore/common.py:206)",
    )
    r = 4 * SIGMA
    report.add(
        f"Gaussian blur of one map, {r}+ px from the border",
        gaussian_blur(upsampled, SIGMA)[:, r:-r, r:-r],
        blurred[:, r:-r, r:-r],
    )
    report.add(
        "map after upsampling and blur (same patch scores)",
        pred.anomaly_map,
        theirs,
        explained="the upsampling and blur rows above",
    )
    return pred


def _image_score_rows(
    model: Any, patch, locations, flat, pred, test, ours: KNNPatchDistance, report: Report
) -> None:
    """Image scores from the same patch scores: the largest, then reweighted by the
    neighbourhood (9 neighbours); ``ours`` is left with its default scoring."""
    scores = patch.flatten()
    b = patch.shape[0]
    model.num_neighbors = 1
    report.add(
        "image scores (largest patch score)",
        pred.score,
        model.compute_anomaly_score(scores.view(b, -1), locations.view(b, -1), flat),
    )
    model.num_neighbors = ours.num_neighbors = 9
    ours.reweight = True
    with torch.no_grad():
        reweighted = model.compute_anomaly_score(scores.view(b, -1), locations.view(b, -1), flat)
    report.add(
        "image scores reweighted by the neighbourhood (paper eq. 7, 9 neighbours)",
        ours.predict(as_batch(test)).score,
        reweighted,
    )
    ours.squared, ours.reweight = True, False


def jl_note(n: int) -> str:
    """The note on anomalib's coreset projection: its dimensions here and for MVTec AD."""
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    dims = {k: SparseRandomProjection._johnson_lindenstrauss_min_dim(k, 0.9) for k in (n, 214016)}
    return (
        "anomalib's coreset projection is a sparse random projection to the "
        "Johnson-Lindenstrauss bound for eps 0.9 (sampling/k_center_greedy.py:58): "
        f"{dims[n]} dimensions for this bank of {n} patches, {dims[214016]} for MVTec AD "
        "bottle's 214,016; the official code projects to 128"
    )
