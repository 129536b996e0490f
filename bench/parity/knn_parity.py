"""knn against PatchCore: the official code (amazon-science/patchcore-inspection, imported from
the checkout given, with faiss-cpu) and anomalib 2.7's ``PatchcoreModel`` (installed in
.venv-perf), all three on one wide_resnet50_2 with random weights (torchvision's initialisation,
batch-norm statistics and affine parameters drawn at random), copied by name into each.

Compared with the official code: the backbone stages, the patch embeddings (the memory bank before
the coreset), the coreset's projection, picks and bank (the same seed for the projection and the
same 10 start points), then on one shared bank the nearest-neighbour indices and squared
distances, the map before and after the blur, and the image scores. Compared with anomalib: the
3x3-averaged stage features it uses as embedding, its k-center loop from one shared start on our
projection, and on our bank and features its L2 patch scores, map (nearest upsampling, kornia's
blur), image scores and neighbourhood reweighting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.adapters.common import gaussian_blur, patch_features
from bench.adapters.knn import KNNPatchDistance
from bench.adapters.knn.coreset import coreset_projection, greedy_coreset
from bench.backbones import normalize
from bench.parity import Report, checkout_version, official_modules, share_weights
from bench.types import Batch

SIZE, N_TRAIN, N_TEST, RATIO, STARTS, SEED = 128, 6, 3, 0.1, 10, 0
LAYERS = ["layer2", "layer3"]
SIGMA = 4  # PatchCore's smoothing (the official RescaleSegmentor, anomalib's default)
OFFICIAL_FILES = "src/patchcore/{common,patchcore,sampler}.py"


def _images(n: int, seed: int, defect: bool = False) -> torch.Tensor:
    """[n, 3, SIZE, SIZE] smooth random textures in [0, 1]; with ``defect`` a bright square
    touching the left border of the first image (where border handling matters)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    x = F.interpolate(coarse, size=SIZE, mode="bicubic", align_corners=False)
    x = (x + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    if defect:
        x[0, :, 40:60, :14] = 1.0
    return x


def _backbone() -> torch.nn.Module:
    """torchvision's wide_resnet50_2, random weights, batch norms with random statistics."""
    from torchvision.models import wide_resnet50_2

    torch.manual_seed(SEED)
    model = wide_resnet50_2(weights=None)
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def _ours(reference: torch.nn.Module, **params) -> KNNPatchDistance:
    det = KNNPatchDistance(
        backbone="wide_resnet50_2",
        weights="random",
        layers=(2, 3),
        coreset_ratio=RATIO,
        coreset_starts=STARTS,
        sigma=SIGMA,
        discover_types=False,
        seed=SEED,
        **params,
    )
    share_weights(reference, det.extractor_)
    return det


def _batch(images: torch.Tensor) -> Batch:
    return Batch(label=torch.zeros(len(images), dtype=torch.long), image=images)


def _starts(n: int) -> np.ndarray:
    """The official sampler's start points: ``np.random.choice`` right after seeding NumPy."""
    np.random.seed(SEED)
    return np.random.choice(n, STARTS, replace=False)


def _coreset(ours: KNNPatchDistance, bank: torch.Tensor) -> torch.Tensor:
    """Our coreset picks from the official sampler's start points."""
    return ours.coreset(bank, int(RATIO * len(bank)), torch.from_numpy(_starts(len(bank))))


def _official(path: str, reference, train, test, ours: KNNPatchDistance, report: Report) -> None:
    """The official rows."""
    with official_modules(Path(path) / "src", ["patchcore"]):
        import patchcore.common
        import patchcore.patchcore
        import patchcore.sampler

        sampler = patchcore.sampler.ApproximateGreedyCoresetSampler(RATIO, torch.device("cpu"))
        model = patchcore.patchcore.PatchCore(torch.device("cpu"))
        model.load(
            backbone=reference,
            layers_to_extract_from=LAYERS,
            device=torch.device("cpu"),
            input_shape=(3, SIZE, SIZE),
            pretrain_embed_dimension=1024,
            target_embed_dimension=1024,
            patchsize=3,
            featuresampler=sampler,
            anomaly_score_num_nn=1,
            nn_method=patchcore.common.FaissNN(False, 2),
        )
        x_train = normalize(train)
        stages = model.forward_modules["feature_aggregator"](x_train)
        report.add(
            "backbone stages layer2, layer3", ours.extractor_(x_train), [stages[k] for k in LAYERS]
        )

        bank = np.asarray(model._embed(x_train))
        ours_bank = ours.embed(train).permute(0, 2, 3, 1).flatten(0, 2)
        report.add("patch embeddings = memory bank before the coreset [N, 1024]", ours_bank, bank)

        torch.manual_seed(SEED)  # the official projection is an nn.Linear built now
        projected = sampler._reduce_features(torch.from_numpy(bank))
        report.add(
            "coreset projection to 128 dimensions",
            coreset_projection(ours_bank, 128, SEED),
            projected.detach(),
        )
        np.random.seed(SEED)
        official_picks = sampler._compute_greedy_coreset_indices(projected.detach())
        picks = _coreset(ours, ours_bank)
        report.add(
            "coreset picks (indices; same projection seed and start points)",
            picks,
            official_picks,
            tolerance=0,
        )

        torch.manual_seed(SEED)
        np.random.seed(SEED)
        model.fit([x_train])  # the whole official fit: embedding, sampler, faiss index
        official_bank = torch.from_numpy(model.anomaly_scorer.detection_features)
        report.add("memory bank after the coreset", ours_bank[picks], official_bank)

        ours.bank_ = official_bank.clone()  # scoring compared on one bank
        _official_scores(model, ours, test, report)


def _rel(values, exact: np.ndarray) -> float:
    """Largest difference from ``exact`` relative to its largest magnitude."""
    return float(np.abs(np.asarray(values, dtype=np.float64) - exact).max() / np.abs(exact).max())


def _rounding(name: str, where: str, theirs, ours, exact: np.ndarray) -> str:
    """The explanation of a float32 distance difference, with both sides' errors."""
    return (
        f"{name} computes |q|^2 + |b|^2 - 2 q.b in float32 ({where}): {_rel(theirs, exact):.1e} "
        f"of the largest score off the float64 distance to the same entries, ours (from q - b "
        f"on the entry found, adapters/knn/neighbours.py) {_rel(ours, exact):.1e}"
    )


def _official_scores(model, ours: KNNPatchDistance, test: torch.Tensor, report: Report) -> None:
    """The official scoring rows: its faiss distances, and its map and image score from them
    (end to end) and from our patch scores (the post-processing alone)."""
    x_test = normalize(test)
    features = np.asarray(model._embed(x_test))
    scores, _, nns = model.anomaly_scorer.predict([features])
    patch, nn_idx, _ = ours.patch_scores(test)
    report.add(
        "nearest bank entry of each test patch (indices)", nn_idx.flatten(), nns[:, 0], tolerance=0
    )
    bank = model.anomaly_scorer.detection_features.astype(np.float64)
    exact = ((features.astype(np.float64) - bank[nns[:, 0]]) ** 2).sum(1)
    report.add("patch scores (squared L2), ours vs float64", patch.flatten(), exact)
    explained = _rounding(
        "faiss IndexFlatL2", "src/patchcore/common.py:48 and 80", scores, patch.flatten(), exact
    )
    report.add(
        "patch scores (squared L2), ours vs faiss", patch.flatten(), scores, explained=explained
    )
    b = len(test)
    segmentor = model.anomaly_segmentor
    segmentor.smoothing = 0  # scipy skips an axis whose sigma is 0
    upsampled = np.stack(segmentor.convert_to_segmentation(patch.numpy()))
    segmentor.smoothing = SIGMA
    maps = np.stack(segmentor.convert_to_segmentation(patch.numpy()))
    ours.sigma = 0
    report.add(
        "map upsampled bilinearly, before the blur (same patch scores)",
        ours.predict(_batch(test)).anomaly_map,
        upsampled,
    )
    ours.sigma = SIGMA
    pred = ours.predict(_batch(test))
    report.add(
        f"map after the Gaussian blur, sigma {SIGMA} (same patch scores)", pred.anomaly_map, maps
    )
    report.add(
        "image scores (same patch scores)",
        pred.score,
        model.patch_maker.score(patch.reshape(b, -1).numpy()),
    )
    image_scores, end_maps = model._predict(x_test)
    inherited = (
        "the faiss rounding of the patch scores (row 'patch scores (squared L2), ours vs faiss')"
    )
    report.add(
        "map after the blur, end to end (official _predict)",
        pred.anomaly_map,
        np.stack(end_maps),
        explained=inherited,
    )
    report.add(
        "image scores, end to end (official _predict)",
        pred.score,
        np.asarray(image_scores),
        explained=inherited,
    )


class _GivenProjection:
    """Stands in for anomalib's SparseRandomProjection so that its sampler sees our points."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points

    def fit(self, _embedding: torch.Tensor) -> _GivenProjection:
        return self

    def transform(self, _embedding: torch.Tensor) -> torch.Tensor:
        return self.points


def _anomalib(reference, train, test, ours: KNNPatchDistance, report: Report) -> None:
    """The anomalib rows, on our memory bank and patch features."""
    from anomalib.models.components import KCenterGreedy
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=LAYERS, backbone="wide_resnet50_2", pre_trained=False).eval()
    share_weights(reference, model.feature_extractor.feature_extractor)
    x_train = normalize(train)
    with torch.no_grad():
        stages = model.feature_extractor(x_train)
        embedding = model.generate_embedding(
            {k: model.feature_pooler(v) for k, v in stages.items()}
        )
    report.add(
        "3x3-averaged stages, concatenated (anomalib's embedding, 1536-d)",
        patch_features(ours.extractor_, x_train),
        embedding,
    )

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

    ours.bank_ = bank[_coreset(ours, bank)]
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
    explained = _rounding(
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
    scores = patch.flatten()  # the rest from the same patch scores
    b, h, w = patch.shape
    ours.sigma = 0
    upsampled = ours.predict(_batch(test)).anomaly_map
    ours.sigma = SIGMA
    pred = ours.predict(_batch(test))
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
        ours.predict(_batch(test)).score,
        reweighted,
    )
    ours.squared, ours.reweight = True, False


def run(official: str | None) -> Report:
    """knn's parity table: against the official PatchCore when its checkout is given, and
    against anomalib's PatchCore always."""
    import anomalib

    torch.set_num_threads(min(2, torch.get_num_threads()))
    reference = _backbone()
    train, test = _images(N_TRAIN, SEED), _images(N_TEST, SEED + 10, defect=True)
    ours = _ours(reference)
    source = f"anomalib {anomalib.__version__} (PatchcoreModel)"
    if official:
        source = f"{checkout_version(official)} ({OFFICIAL_FILES}); {source}"
    report = Report(
        method="knn",
        official=source,
        setting=f"wide_resnet50_2 with shared random weights, layers 2 and 3, {SIZE} px, "
        f"{N_TRAIN} training and {N_TEST} test images, coreset {RATIO:.0%}, float32",
    )
    if official:
        _official(official, reference, train, test, ours, report)
    else:
        report.notes.append("official checkout not given: compared with anomalib only")
    _label(report, 0, "official")
    first = len(report.checks)
    _anomalib(reference, train, test, ours, report)
    _label(report, first, "anomalib")
    report.notes += NOTES + [_jl_note(N_TRAIN * (SIZE // 8) ** 2)]
    return report


def _label(report: Report, first: int, side: str) -> None:
    for check in report.checks[first:]:
        check.quantity = f"{side}: {check.quantity}"


def _jl_note(n: int) -> str:
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    dims = {k: SparseRandomProjection._johnson_lindenstrauss_min_dim(k, 0.9) for k in (n, 214016)}
    return (
        "anomalib's coreset projection is a sparse random projection to the "
        "Johnson-Lindenstrauss bound for eps 0.9 (sampling/k_center_greedy.py:58): "
        f"{dims[n]} dimensions for this bank of {n} patches, {dims[214016]} for MVTec AD "
        "bottle's 214,016; the official code projects to 128"
    )


NOTES = [
    "our fit draws the 10 coreset start points with a torch generator seeded with `seed`, the "
    "official sampler with NumPy's global generator (src/patchcore/sampler.py:143); the table "
    "gives both the same start points",
    "the official code has no neighbourhood reweighting: its image score is the largest patch "
    "score (src/patchcore/patchcore.py:218, PatchMaker.score); its patch score is the mean "
    "squared L2 distance to the anomaly_scorer_num_nn nearest entries "
    "(src/patchcore/common.py:349), 1 in the paper's runs (sample_training.sh); knn's defaults "
    "do the same (1 nearest entry, no reweighting)",
    "anomalib differs from the official code in: embedding (the 1536-d 3x3 channel means of its "
    "row above, without the official adaptive average pooling to 1024, "
    "src/patchcore/common.py:145-183), coreset (one random start kept in the coreset, "
    "models/components/sampling/k_center_greedy.py:132-139, instead of 10 virtual start points; "
    "a sparse projection), patch score (L2 instead of squared L2), image score (reweighted with "
    "9 neighbours by default, models/image/patchcore/torch_model.py:419-442), map (nearest "
    "upsampling, torch-reflect padding in the blur), input (Resize((256, 256)) of tensors with "
    "antialiasing, models/image/patchcore/lightning_model.py:218-224, instead of PIL's "
    "Resize(256) and CenterCrop(224), src/patchcore/datasets/mvtec.py:75-78); the inputs here are "
    "the same tensors for all three",
]
