"""DictAS: the sparse lookup against independent computations, the official generator blocks,
CLIP's tokens and prompt ensembles, the two-stage run through the CLI (train on a VisA-layout
dataset, k-shot references per category), exact resume with validation and the value
generator's freeze, held-out images, the transductive score option and the ablation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from bench.adapters.dictas import DictAS
from bench.adapters.dictas import lookup as lookup_module
from bench.adapters.dictas.backbone import ClipTokens
from bench.adapters.dictas.lookup import Dictionary, Generator, pool, sparsemax
from bench.adapters.dictas.prompts import prompt_sentences
from bench.adapters.dictas.validation import Validation, holdout_hash
from bench.cli import main
from bench.datasets import synthetic_visa
from bench.evaluation import Evaluator
from bench.system import seed_everything
from bench.training import CHECKPOINT_NAME
from bench.types import Batch

#: a tiny randomly initialised CLIP (open_clip's ViT-B-16 config, 2 blocks of width 64) at 64 px
TINY = dict(
    backbone="ViT-B-16", weights="random", input_size=64, backbone_depth=2, backbone_width=64
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bisection_sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax as the Euclidean projection onto the simplex, tau found by bisection on
    sum(max(z - tau, 0)) = 1 (no sorting): an independent computation."""
    z = z.double()
    lo, hi = z.max(-1, keepdim=True).values - 1, z.max(-1, keepdim=True).values
    for _ in range(100):
        mid = (lo + hi) / 2
        heavy = (z - mid).clamp(min=0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(heavy, mid, lo), torch.where(heavy, hi, mid)
    return (z - (lo + hi) / 2).clamp(min=0)


def test_sparsemax_matches_the_simplex_projection():
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 300, generator=g) * 5  # small supports: found among the top values
    flat = torch.randn(6, 300, generator=g) * 1e-3  # supports of ~all 300 > TOP_T: full sort
    for z in (peaked, flat, torch.cat([peaked, flat])):
        out = sparsemax(z)
        assert torch.allclose(out.double(), _bisection_sparsemax(z), atol=1e-5)
        assert torch.allclose(out.sum(-1), torch.ones(len(z)), atol=1e-5)
    assert (sparsemax(flat) > 0).sum(-1).min() > lookup_module.TOP_T  # the fallback was needed
    assert torch.equal(sparsemax(peaked, top=None), sparsemax(peaked))  # partial = full sort


def test_sparsemax_gradient_is_its_jacobian():
    """d sparsemax / dz = diag(s) - s s^T / |S| with s the support indicator."""
    z = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    z.requires_grad_(True)
    v = torch.randn(3, 40, dtype=torch.float64)
    (sparsemax(z, top=8) * v).sum().backward()
    s = (sparsemax(z.detach()) > 0).double()
    expected = s * v - s * (s * v).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    assert torch.allclose(z.grad, expected, atol=1e-5)


def test_pooling_is_the_official_same_padding_mean():
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(2))
    ones = torch.ones(3, 1, 3, 3) / 9  # zero padding, the pad counted (F.avg_pool2d default)
    assert torch.allclose(pool(x, 3), F.conv2d(x, ones, padding=1, groups=3), atol=1e-6)
    assert torch.equal(pool(x, 1), x)
    manual = torch.zeros_like(x)  # size 2: padding 0 before, 1 after (the official Padding_same)
    padded = F.pad(x, (0, 1, 0, 1))
    for i in range(7):
        for j in range(9):
            manual[..., i, j] = padded[..., i : i + 2, j : j + 2].mean((-2, -1))
    assert torch.allclose(pool(x, 2), manual, atol=1e-6)


def test_generators_follow_the_official_blocks():
    d = Dictionary(32, heads=4)
    for gen in (d.query, d.key, d.value):
        assert isinstance(gen, Generator)
        assert gen.q.bias is None and gen.k.bias is None and gen.mlp.linear3.bias is None
    x = torch.randn(2, 10, 32)
    for gen in (d.query, d.value):
        torch.nn.init.zeros_(gen.mlp.linear3.weight)
    assert torch.equal(d.value(x), x)  # the value generator's outer residual
    assert torch.equal(d.query(x), torch.zeros_like(x))  # no residual on queries and keys
    assert d.scale == pytest.approx(32**-0.5)


def test_lookup_is_sparsemax_weights_over_values_in_any_chunking(monkeypatch):
    d = Dictionary(16).eval()
    g = torch.Generator().manual_seed(3)
    query, refs = torch.randn(2, 30, 16, generator=g), torch.randn(1, 50, 16, generator=g)
    keys, values = d.entries(refs)
    with torch.no_grad():
        weights = _bisection_sparsemax(d.query(query) @ keys.transpose(1, 2) / 4).float()
        expected = weights @ values
        monkeypatch.setattr(lookup_module, "LOOKUP_CHUNK", 7)
        chunked = d.lookup(query, keys, values)
    assert torch.allclose(chunked, expected, atol=1e-5)


def test_identity_lookup_finds_an_exact_copy():
    d = Dictionary(8, identity=True)
    refs = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(6)) * 10
    got = d.lookup(refs[:, 3:5], *d.entries(refs))  # far apart tokens: one-hot weights
    assert torch.allclose(got, refs[:, 3:5], atol=1e-5)


@pytest.mark.slow
def test_training_free_lookup_segments_a_real_defect(bottle):
    """The ablation without generators on the real bottle: 2 normal references, and the map of
    a broken bottle separates its defect from the rest (pixel AUROC against the mask)."""
    from sklearn.metrics import roc_auc_score

    from bench.datasets import MVTecAD

    train = MVTecAD(bottle.parent, "bottle", "train", image_size=224)
    test = MVTecAD(bottle.parent, "bottle", "test", image_size=224)
    broken = next(i for i, it in enumerate(test.items) if it["defect"] == "broken_large")
    det = DictAS(backbone="efficientnet_lite0", input_size=224, training_free=True)
    det.fit([])
    det.fit_references([_batch(torch.stack([train[i]["image"] for i in range(2)]), "bottle")])
    sample = test[broken]
    amap = det.predict(_batch(sample["image"][None], "bottle")).anomaly_map[0]
    mask = F.interpolate(sample["mask"][None, None].float(), size=amap.shape, mode="nearest")
    assert roc_auc_score(mask.flatten().numpy() > 0.5, amap.flatten().numpy()) > 0.9


def _batch(images: torch.Tensor, category: str, start: int = 0) -> Batch:
    meta = [{"path": f"/d/{category}/{start + i:03d}.png", "category": category}
            for i in range(len(images))]  # fmt: skip
    return Batch(label=torch.zeros(len(images), dtype=torch.long), meta=meta, image=images)


def test_clip_tokens_are_the_residual_stream_and_the_image_embedding():
    source = ClipTokens("ViT-B-16", "random", (1, 2), 64, depth=2, width=64).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    tokens, grid, glob = source(images)
    visual = source.model.visual
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (images - mean) / std
    with torch.no_grad():
        h = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        h = visual.ln_pre(torch.cat([cls, h], 1) + visual.positional_embedding)
        after = []
        for block in visual.transformer.resblocks:
            h = block(h)
            after.append(h[:, 1:])
        embedding = source.model.encode_image(x)
    assert grid == (4, 4) and len(tokens) == 2
    for got, want in zip(tokens, after):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(glob, embedding, atol=1e-5)


def test_clip_blocks_use_exact_gelu_whatever_open_clip_builds():
    """The official DictAS CLIP has nn.GELU() in every block; open_clip 2.24 builds QuickGELU
    for the openai tag. A QuickGELU model gets exact GELU and then equals one built with it."""
    import open_clip

    from bench.adapters.dictas.backbone import exact_gelu

    cfg = open_clip.get_model_config("ViT-B-16")
    cfg["vision_cfg"].update(image_size=32, layers=2, width=64, head_width=32)
    cfg["text_cfg"].update(layers=1, width=64, heads=1)
    cfg["embed_dim"] = 64
    quick = open_clip.CLIP(**{**cfg, "quick_gelu": True}).eval()
    exact = open_clip.CLIP(**{**cfg, "quick_gelu": False}).eval()
    exact.load_state_dict(quick.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = quick.encode_image(x)
        assert exact_gelu(quick) == 2 + 1  # every vision and text block
        after, want = quick.encode_image(x), exact.encode_image(x)
    assert (before - want).abs().max() > 1e-4  # the activations really differ
    assert torch.equal(after, want)
    source = ClipTokens("ViT-B-16", "random", (1,), 64, depth=2, width=64)
    acts = [m for m in source.modules() if "GELU" in type(m).__name__]
    assert acts and all(isinstance(m, torch.nn.GELU) and m.approximate == "none" for m in acts)


def test_text_features_are_the_prompt_ensembles():
    source = ClipTokens("ViT-B-16", "random", (1,), 64, depth=1, width=64).eval()
    text = source.text_features("pcb1")
    assert text.shape == (source.embed_dim, 2)
    normal, anomalous = prompt_sentences("pcb1")
    assert len(normal) == 7 * 35 and len(anomalous) == 5 * 35
    assert "a photo of the flawless pcb1." in normal and "a bad photo of a pcb1 with flaw." in (
        anomalous
    )
    with torch.no_grad():
        for column, sentences in enumerate((normal, anomalous)):
            emb = source.model.encode_text(source.tokenizer(sentences))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            assert torch.allclose(text[:, column], mean / mean.norm(), atol=1e-5)


def test_held_out_images_are_kept_apart_by_a_stable_hash():
    keys = [f"candle/{i:03d}.JPG" for i in range(200)]
    held = {k for k in keys if holdout_hash(k) < 0.1}
    assert 5 < len(held) < 40  # about 10%
    val = Validation(0.1, capacity=8)
    images = torch.rand(200, 3, 8, 8)
    keep = val.split(images, keys, ["candle"] * 200)
    assert {keys[i] for i in keep} == set(keys) - held
    assert len(val.images) == 8 and set(val.images) <= held
    for key, image in val.images.items():
        assert torch.equal(image, images[keys.index(key)])
    query, refs, masks = val.pairs()
    assert query.shape == refs.shape == (8, 3, 8, 8) and masks.shape == (8, 8, 8)
    assert not any(torch.equal(q, r) for q, r in zip(query, refs))  # another image as reference


class CrashAt(DictAS):
    crash_step = 7

    def training_step(self, batch, step):
        if step == self.crash_step:
            raise KeyboardInterrupt("simulated interruption")
        return super().training_step(batch, step)


def _train_loader(n_batches: int = 3):
    g = torch.Generator().manual_seed(5)
    base = torch.rand(1, 3, 8, 8, generator=g)
    out = []
    for b in range(n_batches):
        images = F.interpolate(base + 0.1 * torch.rand(4, 3, 8, 8, generator=g), size=64)
        out.append(_batch(images.clamp(0, 1), "candle", 4 * b))
    return out


@pytest.mark.slow
def test_interrupted_training_resumes_identically_through_validation_and_freeze(tmp_path):
    """3 epochs of 3 steps with validation after each: the value generator is frozen at the
    first epoch without improvement; a crash at step 7 resumes to the same weights."""
    params = dict(TINY, epochs=4, val_fraction=0.25, checkpoint_every=1, text_weight=0.1)
    seed_everything(0)
    straight = DictAS(**params)
    straight.workdir = tmp_path / "straight"
    straight.fit(_train_loader())
    assert [e for e, _ in straight.val_log_] == [1, 2, 3, 4]
    assert straight.selected_epoch_ == max(straight.val_log_, key=lambda r: r[1])[0]

    seed_everything(0)
    crashed = CrashAt(**params)
    crashed.workdir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(_train_loader())
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)["step"] == 7
    seed_everything(99)
    resumed = DictAS(**params)
    resumed.workdir = tmp_path / "resumed"
    resumed.fit(_train_loader())
    assert resumed.train_log_ == straight.train_log_
    assert resumed.val_log_ == straight.val_log_
    assert resumed._frozen_value == straight._frozen_value
    for (k, a), (_, b) in zip(
        straight.dictionary_.state_dict().items(), resumed.dictionary_.state_dict().items()
    ):
        assert torch.equal(a, b), k


def test_the_value_generator_freezes_after_an_epoch_without_improvement():
    """Validation AP that stops improving: back to the best weights, value generator frozen
    (its weights then stay), Adam's moments restarted."""

    class Worse(DictAS):  # the validation AP falls after the first epoch
        def _validation_ap(self) -> float:
            return 0.5 - 0.1 * len(getattr(self, "val_log_", []))

    det = Worse(**TINY, epochs=3, val_fraction=0.25)
    snapshots = []
    det.after_step = _spy(det.after_step, lambda: snapshots.append(
        {k: v.clone() for k, v in det.dictionary_.value.state_dict().items()}
    ))  # fmt: skip
    det.fit(_train_loader())
    assert det._frozen_value
    assert not any(p.requires_grad for p in det.dictionary_.value.parameters())
    assert [ap for _, ap in det.val_log_] == pytest.approx([0.5, 0.4, 0.3])
    # at the end of epoch 2 the best (epoch 1) weights came back; then the value generator stays
    best, last = snapshots[2], snapshots[-1]
    for k, v in snapshots[5].items():
        assert torch.equal(v, best[k]) and torch.equal(v, last[k]), k
    assert not torch.equal(snapshots[0]["mlp.linear1.weight"], best["mlp.linear1.weight"])


def _spy(method, then):
    def wrapped(*args, **kwargs):
        out = method(*args, **kwargs)
        then()
        return out

    return wrapped


def test_per_category_scores_are_minmax_normalised_parts():
    det = DictAS(**TINY, score_normalisation="per_category", training_free=True)
    det.fit([])
    loader = _train_loader(2)
    det.fit_references([loader[0]])
    det.start_test()
    outs = [det.predict(b) for b in loader]
    final = det.test_scores()
    peak = torch.cat([o.anomaly_map.flatten(1).max(1).values for o in outs])
    per_image = torch.cat([o.score for o in outs])
    text = (per_image - 0.8 * peak) / 0.2  # the per-image score is 0.8 peak + 0.2 text
    assert ((text > 0) & (text < 1)).all()

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min() + 1e-6)

    assert torch.allclose(final, 0.8 * minmax(peak) + 0.2 * minmax(text), atol=1e-4)
    assert det.test_scores() is None  # consumed: the next job starts afresh

    ev = Evaluator()
    batch = loader[0]
    batch.mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    batch.roi = torch.tensor([[0, 0, 8, 8]] * 4)
    ev.update(outs[0], batch)
    ev.replace_scores(final[:4])
    assert ev.scores == pytest.approx(final[:4].tolist())
    with pytest.raises(ValueError, match="replacement scores for 4 test images"):
        ev.replace_scores(final)


def test_screw_references_get_rotated_copies():
    det = DictAS(backbone="efficientnet_lite0", input_size=64, training_free=True)
    det.fit([])
    images = torch.rand(2, 3, 64, 64)
    det.fit_references([_batch(images, "screw")])
    refs = det._reference_images()
    assert len(refs) == 2 * 10  # each reference and its copies at -180, -135, ..., 180 degrees
    assert torch.allclose(refs[0], images[0]) and torch.allclose(refs[5], images[0], atol=1e-5)
    assert torch.allclose(refs[1][:, 8:-8, 8:-8], images[0].flip(-1, -2)[:, 8:-8, 8:-8], atol=1e-4)
    det.fit_references([_batch(images, "bottle")])
    assert len(det._reference_images()) == 2


@pytest.mark.slow
def test_two_stage_cli_run_trains_once_and_scores_every_draw(tmp_path, ad_root):
    """Generators fitted on a VisA-layout dataset (one first stage, shared by two config
    entries that differ in k and in a test parameter, the official test mode), then 2-shot
    references of each MVTec AD-layout category over 2 draws and 1-shot ones: 6 jobs, one
    training, records (and leaderboard, MLflow) that say so, transductive scores included."""
    visa = synthetic_visa.generate(tmp_path / "visa", n_train=8, n_test_good=1, n_anomaly=1)
    params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
    (tmp_path / "c.toml").write_text(
        f"""
name = "dictas-run"
batch_size = 4
[[datasets]]
name = "mvtec_ad"
root = "{ad_root}"
image_size = 64
[[detectors]]
name = "dictas"
train_on = {{ dataset = "visa", root = "{visa}" }}
shots = 2
shot_draws = 2
params = {{ {params}, epochs = 2, val_fraction = 0.2 }}
[[detectors]]
name = "dictas"
label = "dictas 1-shot"
train_on = {{ dataset = "visa", root = "{visa}" }}
shots = 1
params = {{ {params}, epochs = 2, val_fraction = 0.2, test_mode = "classification" }}
"""
    )
    out = tmp_path / "out"
    assert main(["run", "--config", str(tmp_path / "c.toml"), "--output", str(out)]) == 0
    records = [json.loads(p.read_text()) for p in (out / "dictas-run" / "jobs").glob("dictas__*")]
    assert len(records) == 4
    assert {(r["category"], r["draw"]) for r in records} == {
        (c, d) for c in ("washer", "weave") for d in (0, 1)
    }
    for r in records:
        assert len(r["references"]) == 2
        assert any("random weights" in s for s in r["substitutes"])
        assert all(math.isfinite(r["metrics"]["all"][m]) for m in ("pixel_auroc", "au_pro"))
        assert "whole test set" in r["transductive"] and r["params"]["sigma"] == 6.0
    one_shot = list((out / "dictas-run" / "jobs").glob("dictas 1-shot__*"))
    assert len(one_shot) == 2
    assert all(json.loads(p.read_text())["params"]["sigma"] == 2.0 for p in one_shot)
    board = next(out.glob("dictas-run/**/leaderboard.md")).read_text()
    assert "| dictas †‡ |" in board and "## Transductive scores (‡)" in board
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("adbench/dictas-run").experiment_id])
    jobs = [r for r in runs if r.data.tags.get("adbench.kind") == "job"]
    assert len(jobs) == 6 and all("whole test set" in r.data.tags["adbench.transductive"]
                                  for r in jobs)  # fmt: skip
    # one training (its checkpoint), shared by both entries, and 7 computed stages: the
    # generators and 6 reference sets (2 categories x 2 draws at k = 2, 2 categories at k = 1)
    assert len(list((out / "dictas-run").rglob(CHECKPOINT_NAME))) == 1
    assert len(list((out / "dictas-run").rglob("fit.json"))) == 7
    # a references stage saves its references alone; a re-run loads it on top of stage 1
    states = {p.parent.name: torch.load(p, weights_only=False)["state"]
              for p in (out / "dictas-run" / "state").glob("*/fitted.pt")}  # fmt: skip
    first = [s for name, s in states.items() if "__visa__" in name]
    assert len(first) == 1 and "dictionary_" in first[0] and "reference_images_" not in first[0]
    refs = [s for name, s in states.items() if "__mvtec_ad__" in name]
    assert len(refs) == 6 and all(set(s) == {"reference_images_", "category_"} for s in refs)
    job = one_shot[0]
    before = json.loads(job.read_text())
    job.unlink()
    assert main(["run", "--config", str(tmp_path / "c.toml"), "--output", str(out)]) == 0
    again = json.loads(job.read_text())
    assert again["fit_cached"] and again["metrics"]["all"] == before["metrics"]["all"]


def test_substitutes_name_every_departure():
    assert DictAS.substitutes(DictAS().get_params()) == [
        "synthetic-anomaly textures cut from other training images, not DTD textures"
    ]
    assert DictAS.substitutes(DictAS(textures="/dtd/images").get_params()) == []
    offline = DictAS.substitutes(DictAS(backbone="efficientnet_lite0").get_params())
    assert any("token source substitute efficientnet_lite0" in s for s in offline)
    free = DictAS(backbone="efficientnet_lite0", training_free=True).get_params()
    assert any("training-free" in s for s in DictAS.substitutes(free))
    paper = DictAS().get_params()
    assert (paper["weights"], paper["layers"], paper["test_layers"]) == (
        "openai",
        (6, 12, 18, 24),
        (6, 12),
    )
    assert DictAS(backbone="efficientnet_lite0").get_params()["weights"] == "pretrained"


def test_missing_clip_weights_name_the_way_out(tmp_path):
    det = DictAS(weights=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="neither a pretrained tag"):
        det.source  # noqa: B018


@pytest.mark.slow
def test_offline_config_plans_every_k_over_one_training(bottle, monkeypatch, tmp_path):
    from bench.config import load_config
    from bench.datasets.builtin import GENERATOR_VERSION
    from bench.plan import plan_jobs

    visa = synthetic_visa.generate(tmp_path / "visa", n_train=2, n_test_good=1, n_anomaly=1)
    monkeypatch.setenv("ADBENCH_CACHE", str(tmp_path))
    (tmp_path / f"builtin_visa_v{GENERATOR_VERSION}").symlink_to(visa)
    monkeypatch.setenv("MVTEC_AD_ROOT", str(bottle.parent))
    jobs = plan_jobs(load_config("dictas-offline"))
    assert len(jobs) == 2 * 4 * 3  # learned and training-free, k = 1, 2, 4, 8, 3 draws
    assert sorted({len(j.references) for j in jobs}) == [1, 2, 4, 8]
    assert len({j.fit.parent.hash for j in jobs}) == 2  # one first stage each
    assert all(j.params["backbone"] == "efficientnet_lite0" for j in jobs)


def test_scoring_ignores_an_outer_autocast():
    """Maps, text scores and the lookup run in float32 even inside bf16 autocast (the runner
    uses one on GPUs for other detectors): results equal those without it."""
    det = DictAS(**TINY, training_free=True)
    det.fit([])
    loader = _train_loader(2)
    det.fit_references([loader[0]])
    plain = det.predict(loader[1])
    det._entries, det._text = None, {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = det.predict(loader[1])
    assert mixed.anomaly_map.dtype == torch.float32
    assert torch.equal(mixed.anomaly_map, plain.anomaly_map)
    assert torch.equal(mixed.score, plain.score)
    assert DictAS.inference_amp is False


def test_screw_with_more_than_four_references_scores_every_layer():
    det = DictAS(backbone="efficientnet_lite0", input_size=64, training_free=True)
    det.fit([])
    for k, category, want in (
        (8, "screw", (2, 4, 6, 8)),
        (4, "screw", (2, 4)),
        (8, "bolt", (2, 4)),
    ):
        det.fit_references([_batch(torch.rand(k, 3, 64, 64), category)])
        assert det.scored_layers == want
        det.test_mode = "classification"  # the official best-classification mode: no screw rule
        assert det.scored_layers == (2, 4)
        det.test_mode = "segmentation"
        assert det.predict(_batch(torch.rand(1, 3, 64, 64), category)).anomaly_map.shape == (
            1, 64, 64,
        )  # fmt: skip


def test_official_test_modes_set_the_blur_and_leave_training_alone():
    seg, cls = DictAS(), DictAS(test_mode="classification")
    assert (seg.sigma, cls.sigma) == (6.0, 2.0)  # the official BESTSEGMENTATION switch
    assert DictAS(test_mode="classification", sigma=0.0).sigma == 0.0  # VisA's classification
    assert seg.score_normalisation == "per_category"  # the official (transductive) score
    assert DictAS.transductive(seg.get_params()) and not DictAS.transductive(
        DictAS(score_normalisation="none").get_params()
    )
    training = {k: v for k, v in seg.get_params().items() if k not in DictAS.test_params}
    assert training == {k: v for k, v in cls.get_params().items() if k not in DictAS.test_params}
