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

from bench.adapters.knn import KNNPatchDistance
from bench.adapters.knn.coreset import coreset_projection
from bench.backbones import normalize
from bench.parity import Report, checkout_version, official_modules
from bench.parity.knn_anomalib import anomalib_rows, jl_note
from bench.parity.knn_common import (
    LAYERS,
    N_TEST,
    N_TRAIN,
    RATIO,
    SEED,
    SIGMA,
    SIZE,
    as_batch,
    our_coreset,
    our_knn,
    random_backbone,
    rounding_note,
    textures,
)

OFFICIAL_FILES = "src/patchcore/{common,patchcore,sampler}.py"


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
            "backbone stages layer2, layer3", ours.extractor(x_train), [stages[k] for k in LAYERS]
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
        picks = our_coreset(ours, ours_bank)
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
    explained = rounding_note(
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
        ours.predict(as_batch(test)).anomaly_map,
        upsampled,
    )
    ours.sigma = SIGMA
    pred = ours.predict(as_batch(test))
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


def run(official: str | None) -> Report:
    """knn's parity table: against the official PatchCore when its checkout is given, and
    against anomalib's PatchCore always."""
    import anomalib

    torch.set_num_threads(min(2, torch.get_num_threads()))
    reference = random_backbone()
    train, test = textures(N_TRAIN, SEED), textures(N_TEST, SEED + 10, defect=True)
    ours = our_knn(reference)
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
    anomalib_rows(reference, train, test, ours, report)
    _label(report, first, "anomalib")
    report.notes += NOTES + [jl_note(N_TRAIN * (SIZE // 8) ** 2)]
    return report


def _label(report: Report, first: int, side: str) -> None:
    """Prefixes the quantity of every row from ``first`` on with its side."""
    for check in report.checks[first:]:
        check.quantity = f"{side}: {check.quantity}"


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
