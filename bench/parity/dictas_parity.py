"""DictAS against the official code (xiaozhen228/DictAS; ``--official PATH`` a checkout).

Both sides share one small random CLIP (open_clip's ViT-L-14-336 config shrunk to 24 blocks of
width 64, patch 14, 112 px): ours builds it, the official ``Load_CLIP`` loads it from a file
(rounding it to float16 and back, as it does OpenAI's checkpoint), and the official weights are
copied back into every detector of ours. Our side runs through the public detector API
(``DictAS(...)``, ``fit``, ``save_state`` / ``load_state``, ``fit_references``, ``predict``,
``test_scores``); the official side through its own ``train.train(args)`` and
``test.test(args)`` (see :mod:`bench.parity.dictas_official`), on the same images.

Compared: the CLIP tokens of each block and the global embedding, the prompt-ensemble text
features, the generators (float32 and float64), the sparsemax weights and retrieved features,
one training step (losses, every generator gradient, the weights after Adam), the maps per
layer and scale, the averaged and the blurred maps and the image scores of a two-category
test set, in both official test modes (best segmentation: sigma 6; best classification:
sigma 2 on MVTec AD, none on VisA) and both datasets' layer choices.
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.adapters.common import gaussian_blur
from bench.adapters.dictas import DictAS
from bench.adapters.dictas.lookup import TOP_T, sparsemax

from . import Check, Report, checkout_version, compare, seed_all, share_weights
from .dictas_data import (
    CATEGORIES,
    DEPTH,
    SIZE,
    WIDTH,
    Category,
    K,
    TrainingBatch,
    categories,
    clip_input,
    detector,
    given_synthesis,
    loaded,
    official_test_items,
    official_training_batch,
    official_val_item,
    predict,
    step_recorder,
    training_batch,
)  # fmt: skip
from .dictas_official import Official, official_dictas

#: the run's files: the shared CLIP, the official model config, our stage 1, its checkpoint
Paths = dict[str, Path]
LAYERS = (6, 12, 18, 24)
#: (dataset, official test mode): the layer choice (MVTec AD: 6 and 12) and the blur differ
RUNS = (
    ("mvtec", "segmentation"), ("mvtec", "classification"),
    ("visa", "segmentation"), ("visa", "classification"),
)  # fmt: skip
_GENERATORS = {
    "query": "Query_Generator", "key": "Key_Generator", "value": "Value_Generator.AttnBlock",
    "fuse": "Fuse_Feature",
}  # fmt: skip
_LABELS = {"query": "query generator", "key": "key generator", "value": "value generator",
           "fuse": "layer fusion"}  # fmt: skip
_PARTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "mlp": "TwoLayerMLP",
          "fuse": "fuse_modules", "post": "post_process"}  # fmt: skip
SETTING = (
    f"open_clip ViT-L-14-336 config shrunk to {DEPTH} blocks of width {WIDTH} (1 head), patch 14, "
    f"{SIZE} px (8 x 8 tokens), text tower 12 blocks of width {WIDTH}; random weights rounded "
    f"to float16 by the official Load_CLIP and shared; generators (4 heads, dropout 0) after one "
    f"Adam step on a batch of 4 with given synthetic masks; {K} references, "
    f"{len(CATEGORIES)} categories x 6 test images; CPU, float32 (generators also float64)"
)

NOTES = (
    "Official side: its own train.py train(args), one epoch of one batch (its evaluate_epoch, "
    "EMA and checkpointing then run as written), and test.py test(args) in both modes, whose "
    "calcuate_metric_pixel blurs, min-max normalises and mixes as written; what they compute is "
    "read through hooks. Around it (bench/parity/dictas_official.py): its loaders (dataset.py, "
    "which needs imgaug, albumentations and the authors' data layout) are replaced by one that "
    "serves the same tensors; it runs on the CPU; ReduceLROnPlateau accepts its verbose=True "
    "(gone in torch 2.13); its generators' dropout is 0 for the training step, as ours.",
    "Not compared: image loading and resizing (both sides are given 112 px images), synthetic "
    "anomalies and reference augmentations (given, the same on both sides), model selection "
    "(a deliberate deviation, adapters/dictas/README.md), screw's rotated extra references "
    "(k <= 4; here k = 5), and the weights after the Adam step: its first step moves a weight by "
    "lr g / (|g| + eps), about lr whatever |g|, so it is ill-conditioned where a gradient is "
    "near 0; the gradients and Adam's settings are compared instead.",
)


def official_name(name: str) -> str:
    """Our generator parameter's name in the official ``MyDictionary``."""
    generator, part, rest = name.split(".", 2)
    return ".".join([_GENERATORS[generator], _PARTS.get(part, part), rest])


def official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_name(k): v.detach().clone() for k, v in state.items()}


def run(official: str | None) -> Report:
    if official is None:
        raise SystemExit("dictas parity needs --official PATH, a checkout of xiaozhen228/DictAS")
    report = Report("dictas", f"xiaozhen228/DictAS, {checkout_version(official)}", SETTING)
    report.notes.extend(NOTES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp, official_dictas(official, Path(tmp)) as off:
            _run(report, off, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    return report


def _run(report: Report, off: Official, tmp: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    data, batch = categories(gen), training_batch(gen)
    seed_all(0)
    det = DictAS(**detector(dropout=0.0, epochs=1, val_fraction=0.0))
    torch.save(det.source.model.state_dict(), tmp / "clip.pt")
    clip = off.load_clip(tmp / "clip.pt", SIZE)
    share_weights(clip, det.source.model)
    config = tmp / "config.json"
    config.write_text(json.dumps(_config(det)))
    paths = dict(clip=tmp / "clip.pt", config=config, stage1=tmp / "stage1.pt",
                 checkpoint=tmp / "dictas.pth")  # fmt: skip
    _backbone(report, off, clip, det, data)
    _training(report, off, det, batch, paths)
    det.save_state(paths["stage1"])
    torch.save({"Mymodel": official_state(det.dictionary_.state_dict())}, paths["checkpoint"])
    _lookup(report, off, clip, det, data[0])
    for dataset, mode in RUNS:
        _test_run(report, off, clip, data, paths, dataset, mode, tmp)


def _official_tokens(
    off: Official, clip: nn.Module, images: torch.Tensor
) -> tuple[list, torch.Tensor]:
    """The official CLIP's patch tokens of ``LAYERS`` (its ``norm_patch`` drops the class
    token) and global embedding."""
    with torch.no_grad():
        glob, tokens, _ = clip.encode_image(clip_input(images), list(LAYERS))
    return [off.utils.norm_patch(t, True) for t in tokens], glob


def _backbone(
    report: Report, off: Official, clip: nn.Module, det: DictAS, data: list[Category]
) -> None:
    images = torch.cat([data[0].images, data[1].references])
    theirs, glob = _official_tokens(off, clip, images)
    with torch.no_grad():
        ours, _, ours_glob = det.source(images)
    for layer, a, b in zip(LAYERS, ours, theirs):
        report.add(f"CLIP patch tokens, block {layer}", a, b)
    report.add("CLIP global image embedding", ours_glob, glob)
    for cat in data:
        text = off.prompts.encode_text_with_prompt_ensemble(
            clip, [cat.name], off.clip.tokenize, "cpu"
        )
        report.add(f"text features (prompt ensembles), {cat.name}",
                   det.source.text_features(cat.name), text[cat.name])  # fmt: skip


#: gradients that are 0 in exact arithmetic: the key generator's last LayerNorm bias (through
#: the bias-free linear3 it shifts every key alike, and sparsemax ignores a shift common to a
#: row) and the fusion's attention-score bias (a softmax ignores a common shift)
ZERO_GRADIENT = ("key.mlp.norm.bias", "fuse.compress.bias")


def _training(
    report: Report, off: Official, det: DictAS, batch: TrainingBatch, paths: Paths
) -> None:
    """One step on both sides from the same weights: losses, gradients, Adam's settings."""
    losses, grads, adam = _our_step(det, batch, paths["checkpoint"].with_name("start.pth"))
    theirs, their_grads, their_adam = _their_step(off, batch, paths)
    q, tac_q, tac_r, cqc = theirs
    report.add("training: query loss (mean 1 - cos over normal tokens)", losses["query"], q)
    report.add("training: hinge (CQC)", losses["hinge"], cqc)
    report.add("training: text alignment (fused query + fused retrieval)", losses["text"],
               tac_q + tac_r)  # fmt: skip
    for generator in _GENERATORS:
        keys = [n for n in grads if n.startswith(generator + ".") and n not in ZERO_GRADIENT]
        pairs = [(grads[n], their_grads[official_name(n)]) for n in keys]
        report.checks.append(_worst(f"gradients, {_LABELS[generator]} ({len(keys)} tensors)",
                                    pairs))  # fmt: skip
    zero = compare("", [grads[n] for n in ZERO_GRADIENT],
                   [their_grads[official_name(n)] for n in ZERO_GRADIENT])  # fmt: skip
    scale = max(float(g.abs().max()) for n, g in their_grads.items()
                if n.startswith(("Key_Generator", "Fuse_Feature")))  # fmt: skip
    report.checks.append(Check(
        f"gradients that are 0 in exact arithmetic ({', '.join(ZERO_GRADIENT)}), relative to "
        "the largest key / fusion gradient", zero.max_abs, zero.max_abs / scale,
    ))  # fmt: skip
    report.add("Adam's settings (lr, betas, eps, weight decay)", adam, their_adam)


def _adam(optimizer: torch.optim.Optimizer) -> list[float]:
    group = optimizer.param_groups[0]
    return [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]


def _our_step(det: DictAS, batch: TrainingBatch, start: Path) -> tuple[dict, dict, list]:
    """Our ``fit`` for one step on ``batch``: its losses, the weights it started from (saved
    to ``start`` for the official side), the gradients and Adam's settings."""
    losses: dict[str, torch.Tensor] = {}
    lookup_losses, text_loss = det._lookup_losses, det._text_loss

    def record_lookup(*args):
        losses["query"], losses["hinge"], retrieved = lookup_losses(*args)
        return losses["query"], losses["hinge"], retrieved

    def record_text(*args):
        losses["text"] = text_loss(*args)
        return losses["text"]

    det._lookup_losses, det._text_loss = record_lookup, record_text
    try:
        with step_recorder() as steps, given_synthesis(batch):
            det.fit([batch.ours()])
    finally:
        del det._lookup_losses, det._text_loss
    optimizer, step = steps[0]
    names = {id(p): n for n, p in det.dictionary_.named_parameters()}
    torch.save({"Mymodel": official_state({names[i]: w for i, (w, _) in step.items()})}, start)
    return losses, {names[i]: g for i, (_, g) in step.items()}, _adam(optimizer)


def _their_step(off: Official, batch: TrainingBatch, paths: Paths) -> tuple[list, dict, list]:
    """The official ``train(args)`` for one epoch of that one batch, from the same weights."""
    args = Namespace(
        save_path="train", features_list=list(LAYERS), config_path=str(paths["config"]),
        image_size=SIZE, pretrained_path=str(paths["clip"]), train_data_path="", dataset="visa",
        batch_size=len(batch.clean), resume_path=str(paths["checkpoint"].with_name("start.pth")),
        learning_rate=1e-4, epoch=1, print_freq=1, save_freq=1, scale_list=[1, 3],
        lambda1=0.1, lambda2=0.1, anomaly_source_path="", seed=0,
    )  # fmt: skip
    with step_recorder() as steps:
        model = off.train(args, official_training_batch(batch), official_val_item(batch),
                          sorted(set(batch.categories)))  # fmt: skip
    optimizer, step = steps[0]
    grads = {n: step[id(p)][1] for n, p in model.named_parameters() if id(p) in step}
    return off.captured["train_losses"], grads, _adam(optimizer)


def _worst(quantity: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Check:
    """One row for several tensors: the largest absolute and relative difference of any (each
    tensor relative to its own largest official value)."""
    checks = [compare(quantity, a, b) for a, b in pairs]
    return Check(quantity, max(c.max_abs for c in checks), max(c.max_rel for c in checks))


def _lookup(report: Report, off: Official, clip: nn.Module, det: DictAS, cat: Category) -> None:
    """Generators, sparsemax and retrieval on one test image against the category's references
    (the test-time dictionary: every reference token in one sequence), block 6."""
    theirs = off.dictas.MyDictionary(_config(det), Namespace(scale_list=[1, 3]))
    theirs.load_state_dict(official_state(det.dictionary_.state_dict()))
    ours = det.dictionary_.eval()
    theirs.eval()
    tokens, _ = _official_tokens(off, clip, cat.images[-1:])
    refs, _ = _official_tokens(off, clip, cat.references)
    q, r = tokens[0], refs[0].reshape(1, -1, refs[0].shape[-1])
    fused_in = [F.normalize(t, dim=-1) for t in _official_tokens(off, clip, cat.images)[0]]
    for dtype, suffix in ((torch.float32, "float32"), (torch.float64, "float64")):
        a, b = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
        qd, rd = q.to(dtype), r.to(dtype)
        with torch.no_grad():
            report.add(f"query generator ({suffix})", a.query(qd), b.Query_Generator(qd))
            report.add(f"key generator ({suffix})", a.key(rd), b.Key_Generator(rd))
            report.add(f"value generator ({suffix})", a.value(rd), b.Value_Generator(rd))
            fused = [t.to(dtype) for t in fused_in]
            report.add(
                f"layer fusion into CLIP space ({suffix})", a.fuse(fused), b.Fuse_Feature(fused)
            )
    seen: dict[str, torch.Tensor] = {}
    hook = theirs.SPM.register_forward_hook(lambda m, i, o: seen.update(logits=i[0], weights=o))
    with torch.no_grad():
        retrieved = theirs.Lookup(q, r)
        hook.remove()
        logits = seen["logits"]
        report.add("sparsemax weights (the lookup's logits)", sparsemax(logits), seen["weights"])
        sharp = theirs.SPM(logits * 50, adim=-1)
        report.add(
            "sparsemax weights (logits x 50: supports under TOP_T)", sparsemax(logits * 50), sharp
        )
        report.add("retrieved features", ours.lookup(q, *ours.entries(r)), retrieved)
    a, b = [(w > 0).sum(-1).float() for w in (seen["weights"], sharp)]
    report.notes.append(
        f"Sparsemax supports (keys with weight > 0, of {logits.shape[-1]}): {a.min():.0f}-"
        f"{a.max():.0f} with the lookup's logits, {b.min():.0f}-{b.max():.0f} with them x 50; "
        f"ours looks for the threshold among the top {TOP_T} and sorts a row in full when its "
        "support may be larger, so both of its paths are compared."
    )


def _config(det: DictAS) -> dict:
    return {"embed_dim": det.source.embed_dim, "vision_cfg": {"width": det.source.width}}


def _test_params(dataset: str, mode: str) -> dict:
    """Our arguments for an official test run: the mode (its blur and screw rule), the layers
    (MVTec AD: 6 and 12); VisA's best classification is unblurred; score: the default."""
    layers = LAYERS[:2] if dataset == "mvtec" else LAYERS
    params = dict(test_mode=mode, test_layers=layers)
    if (dataset, mode) == ("visa", "classification"):
        params["sigma"] = 0.0
    return params


def _test_args(dataset: str, mode: str, paths: Paths) -> Namespace:
    """``test.py``'s arguments (its defaults, our paths; ``BESTSEGMENTATION`` then sets the
    layers, scales and sigma of the mode)."""
    return Namespace(
        data_path="", save_path=f"test-{dataset}-{mode}", checkpoint_path=str(paths["checkpoint"]),
        config_path=str(paths["config"]), dataset=dataset, image_size=SIZE,
        features_list=list(LAYERS), pretrained_path=str(paths["clip"]),
        TEST_For_BESTSEGMENTATION=mode == "segmentation", scale_list=[1, 3], alpha=0.5, sigm=6,
        k_shot=K, anomaly_source_path="",
    )  # fmt: skip


def _test_run(
    report: Report, off: Official, clip: nn.Module, data: list[Category], paths: Paths,
    dataset: str, mode: str, tmp: Path,
) -> None:  # fmt: skip
    """The official ``test(args)`` on the test set, and ours with the same setting."""
    label = f"{dataset}, {mode}"
    args = _test_args(dataset, mode, paths)
    theirs = off.test(args, official_test_items(data, tmp / "images"), [c.name for c in data])
    params = _test_params(dataset, mode)
    main = loaded(paths["stage1"], clip, **params)
    plain = loaded(paths["stage1"], clip, **{**params, "sigma": 0.0, "text_score_weight": 1.0},
                   score_normalisation="none")  # fmt: skip
    maps, scores, unblurred, text = [], [], [], []
    for cat in data:
        prediction, normalised = predict(main, cat)
        maps.append(prediction.anomaly_map)
        scores.append(normalised)
        prediction, _ = predict(plain, cat)
        unblurred.append(prediction.anomaly_map)
        text.append(prediction.score)
    results, roc = theirs["results"], theirs["roc"]
    their_unblurred = torch.from_numpy(np.stack(results["anomaly_maps"]))
    their_blurred = np.concatenate([roc[2 * i].reshape(-1, SIZE, SIZE) for i in range(len(data))])
    their_scores = np.concatenate([roc[2 * i + 1] for i in range(len(data))])
    if (dataset, mode) == RUNS[0]:
        report.add("text score (zero-shot anomaly probability)", torch.cat(text), results["pr_sp"])
        spans = [float(t.max() - t.min()) for t in text]
        report.notes.append(
            "Image scores: with this random CLIP the text scores of a category span only "
            f"{min(spans):.3f}-{max(spans):.3f}, so the official per-category min-max magnifies "
            "their float32 rounding (the text-score row) about 1 / span times."
        )
    report.add(f"averaged map, unblurred ({label})", torch.cat(unblurred), their_unblurred)
    sigma = main.sigma
    if sigma:
        report.add(f"blur alone, sigma {sigma:g}: ours on the official unblurred maps",
                   gaussian_blur(their_unblurred, sigma), their_blurred)  # fmt: skip
    report.add(f"blurred maps ({label})", torch.cat(maps), their_blurred)
    report.add(f"image scores: per-category min-max, alpha 0.2 ({label})", torch.cat(scores),
               their_scores)  # fmt: skip
    if (dataset, mode) == ("visa", "segmentation"):
        _layer_maps(report, theirs["layer_maps"], clip, paths, data[0])


def _layer_maps(
    report: Report, layer_maps: list, clip: nn.Module, paths: Paths, cat: Category
) -> None:
    """Each block and scale alone. Ours: a detector with that one test layer and scale; the
    official: its ``MyDictionary`` test outputs in ``test(args)``, at the token grid, upsampled
    here as ``test.py`` upsamples them (bilinear, align_corners) before averaging."""
    n = len(cat.images)
    for j, (layer, size) in enumerate(itertools.product(LAYERS, (1, 3))):
        theirs = torch.cat([maps[j] for maps in layer_maps[:n]])[:, None]
        theirs = F.interpolate(theirs, (SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
        det = loaded(paths["stage1"], clip, test_layers=(layer,), scales=(size,), sigma=0.0)
        prediction, _ = predict(det, cat)
        report.add(f"map of block {layer}, scale {size} (unblurred, {cat.name})",
                   prediction.anomaly_map, theirs)  # fmt: skip
