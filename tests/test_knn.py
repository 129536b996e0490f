"""The knn detector: PatchCore's patch embedding, its coreset (projection, virtual start points,
exact greedy k-center), bounded nearest-neighbour search, squared patch scores, maps and image
scores, and real pretrained features on a subset of MVTec AD bottle."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from bench.adapters.knn.aggregation import patch_embedding
from bench.adapters.knn.coreset import (
    coreset_projection,
    greedy_coreset,
    greedy_coreset_plain,
    random_projection,
    start_distances,
)
from bench.adapters.knn.neighbours import nearest
from bench.backbones import WeightsNotFoundError
from bench.datasets.mvtec_ad import MVTecAD
from bench.loading import EpochLoader
from bench.metrics import auroc, pixel_metrics
from bench.registry import create_detector
from bench.types import Batch


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 4
    which = torch.randint(12, (n,), generator=gen)
    return centres[which] + torch.randn(n, dim, generator=gen) * torch.rand(n, 1, generator=gen)


def k_center_reference(
    points: torch.Tensor, n: int, start: int = 0, starts: list[int] | None = None
) -> list[int]:
    """Textbook greedy k-center, written here in NumPy (float64): each pick is the point
    farthest from every point picked so far; with ``starts``, every point's distance starts at
    its mean distance to those points and the first pick is the farthest on that measure."""
    x = points.double().numpy()
    nearest_pick = np.full(len(x), np.inf)
    if starts is not None:
        nearest_pick = np.stack([np.sqrt(((x - x[s]) ** 2).sum(1)) for s in starts]).mean(0)
        start = int(nearest_pick.argmax())
    picks = [start]
    while len(picks) < n:
        d = np.sqrt(((x - x[picks[-1]]) ** 2).sum(1))
        nearest_pick = np.minimum(nearest_pick, d)
        picks.append(int(nearest_pick.argmax()))
    return picks


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_pruned_greedy_coreset_makes_the_plain_algorithms_choices(seed):
    points = _clustered(6000, 24, seed)
    pruned = greedy_coreset(points, 600, start=17, block=32, seed=seed)
    assert pruned.tolist() == k_center_reference(points, 600, start=17)
    assert len(set(pruned.tolist())) == 600 and int(pruned[0]) == 17
    small = points[:700]  # few points: greedy_coreset runs the plain loop
    assert greedy_coreset(small, 80, start=5).tolist() == k_center_reference(small, 80, 5)
    assert greedy_coreset_plain(small, 80, 5).tolist() == k_center_reference(small, 80, 5)


@pytest.mark.parametrize("total", [6000, 700])  # the pruned search, and the plain loop
@pytest.mark.slow
def test_greedy_coreset_from_virtual_start_points(total):
    """PatchCore's sampler: the 10 start points are not picks, they set every point's initial
    distance (its mean distance to them)."""
    points = _clustered(total, 16, 4)[:total]
    starts = [3, 50, 99, 400, 7, 512, 64, 1, 2, 600]
    initial = start_distances(points, torch.tensor(starts))
    expected = k_center_reference(points, 300, starts=starts)
    assert greedy_coreset(points, 300, block=32, initial=initial).tolist() == expected
    assert greedy_coreset_plain(points, 300, initial=initial).tolist() == expected
    assert not set(starts) <= set(expected)  # the start points are not taken along


@pytest.mark.slow
def test_unclustered_points_switch_to_the_plain_loop_with_the_same_picks(monkeypatch):
    """Points without cluster structure (high-dimensional noise): the bound skips few blocks,
    so after the probe picks the search continues as the plain loop, choosing the same points
    (a spy counts the plain picks, so the switch really happened)."""
    from bench.adapters.knn import coreset

    points = torch.randn(4000, 64, generator=torch.Generator().manual_seed(2))
    initial = start_distances(points, torch.arange(10))
    expected = k_center_reference(points, 200, starts=list(range(10)))
    calls = []
    plain = coreset._plain_picks
    monkeypatch.setattr(
        coreset, "_plain_picks", lambda p, n, *a: calls.append(n) or plain(p, n, *a)
    )
    assert coreset.greedy_coreset(points, 200, block=32, initial=initial).tolist() == expected
    assert calls == [200 - coreset._PROBE]


def test_coreset_projection_is_a_seeded_bias_free_linear_layer():
    """The official sampler projects with a fresh torch.nn.Linear(D, 128, bias=False)."""
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(11)
    layer = torch.nn.Linear(300, 128, bias=False)
    assert torch.allclose(coreset_projection(x, 128, seed=11), layer(x), atol=1e-6)
    assert torch.equal(coreset_projection(x, 300, seed=11), x)  # only the same size is kept


def _adaptive_pool(v: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of the last axis, by its definition: bin i averages the
    elements floor(i L / size) .. ceil((i + 1) L / size) - 1."""
    n = v.shape[-1]
    return np.stack(
        [v[..., (i * n) // size : -((-(i + 1) * n) // size)].mean(-1) for i in range(size)], -1
    )


def _embedding_reference(maps: list[torch.Tensor], pretrain: int, target: int) -> np.ndarray:
    """PatchCore's embedding [B, h, w, target] as its paper and code define it, in NumPy: each
    position's zero-padded 3x3 neighbourhood flattened (channel, row, column) and pooled to
    ``pretrain``, the coarser stage resized bilinearly (torch) to the finest grid, the stages
    concatenated and pooled to ``target``."""
    h, w = maps[0].shape[-2:]
    stages = []
    for m in maps:
        x = np.pad(m.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
        b, c, hh, ww = m.shape
        patches = np.stack(
            [x[:, :, dy : dy + hh, dx : dx + ww] for dy in range(3) for dx in range(3)], 2
        )  # [B, C, 9, h, w]
        flat = patches.transpose(0, 3, 4, 1, 2).reshape(b, hh, ww, c * 9)
        pooled = torch.from_numpy(_adaptive_pool(flat, pretrain)).permute(0, 3, 1, 2)
        resized = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False)
        stages.append(resized.permute(0, 2, 3, 1).numpy())
    return _adaptive_pool(np.concatenate(stages, -1), target)


@pytest.mark.parametrize(("channels", "pretrain", "target"), [((5, 7), 16, 12), ((3, 8), 64, 40)])
def test_patch_embedding_follows_the_definition(channels, pretrain, target):
    gen = torch.Generator().manual_seed(6)
    maps = [torch.randn(2, channels[0], 6, 5, generator=gen)]
    maps.append(torch.randn(2, channels[1], 3, 3, generator=gen))
    ours = patch_embedding(maps, pretrain, target).permute(0, 2, 3, 1).double().numpy()
    assert np.allclose(ours, _embedding_reference(maps, pretrain, target), atol=1e-5)


def test_patch_embedding_of_wide_resnet_stages():
    """With layer2 (512) and layer3 (1024) and 1024 -> 1024, each output is a layer-2
    channel's 3x3 sum with its centre counted twice / 10, or the 3x3 mean of a pair of layer-3
    channels (then resized bilinearly)."""
    gen = torch.Generator().manual_seed(7)
    l2, l3 = torch.randn(1, 512, 4, 4, generator=gen), torch.randn(1, 1024, 2, 2, generator=gen)
    ours = patch_embedding([l2, l3], 1024, 1024)[0].double()
    box = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    x2 = l2[0, :, None].double()
    sums = F.conv2d(x2, box, padding=1)[:, 0] + x2[:, 0]
    assert torch.allclose(ours[:512], sums / 10, atol=1e-5)
    pairs = F.conv2d(l3[0, :, None].double(), box, padding=1)[:, 0].view(512, 2, 2, 2).mean(1) / 9
    resized = F.interpolate(pairs[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(ours[512:], resized, atol=1e-5)


def test_greedy_coreset_covers_like_k_center():
    """Greedy k-center's certificate: with covering radius r (the largest distance from any
    point to its nearest pick), the k picks and the point at distance r are pairwise at least r
    apart (each pick was the farthest when taken, and those distances never grow). Any k
    centres leave two of these k + 1 points with one centre, so no k points cover with a
    radius under r / 2: greedy is within twice the optimum. A subset that is not greedy's
    fails the certificate; on small clouds the optimum is found by trying every subset."""
    points = _clustered(4000, 8, 3)
    picks = greedy_coreset(points, 200, start=0, block=32)
    assert picks.tolist() == k_center_reference(points, 200, start=0)
    x = points.double()
    mode = "donot_use_mm_for_euclid_dist"
    to_picks = torch.cdist(x, x[picks], compute_mode=mode).min(1).values
    radius, farthest = float(to_picks.max()), int(to_picks.argmax())
    assert farthest == k_center_reference(points, 201, start=0)[-1]  # greedy's next pick
    witnesses = torch.cat([picks, torch.tensor([farthest])])
    assert float(torch.pdist(x[witnesses]).min()) >= radius * (1 - 1e-12)
    other = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:200]
    other_to = torch.cdist(x, x[other], compute_mode=mode).min(1).values
    other_witnesses = torch.cat([other, other_to.argmax()[None]])
    assert float(torch.pdist(x[other_witnesses]).min()) < float(other_to.max())
    for seed in range(4):  # the optimum of small clouds by brute force: r <= 2 OPT
        small = _clustered(14, 2, seed).double()
        d = torch.cdist(small, small, compute_mode=mode)
        best = min(float(d[:, list(c)].min(1).values.max()) for c in combinations(range(14), 3))
        greedy = float(d[:, greedy_coreset(small.float(), 3, start=seed)].min(1).values.max())
        assert best <= greedy <= 2 * best


def test_random_projection_keeps_distances_roughly():
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(0))  # order-independent
    z = random_projection(x, 128, seed=0)
    ratio = torch.pdist(z) / torch.pdist(x)
    assert z.shape == (300, 128) and 0.7 < float(ratio.min()) and float(ratio.max()) < 1.3
    assert random_projection(x, None, 0).shape == (300, 512)


@pytest.mark.parametrize("max_pairs", [1 << 24, 5000, 37])
def test_chunked_nearest_neighbour_equals_brute_force(max_pairs):
    gen = torch.Generator().manual_seed(5)
    queries, bank = torch.randn(333, 20, generator=gen), torch.randn(1001, 20, generator=gen)
    dist, idx = nearest(queries, bank, max_pairs=max_pairs)
    full = torch.cdist(queries.double(), bank.double())
    assert torch.equal(idx, full.argmin(1))
    assert torch.allclose(dist.double(), full.min(1).values, atol=1e-4)


def test_nearest_squared_distance_is_exact_where_the_expansion_cancels():
    """Long features, short distances: |q|^2 - 2 q.b + |b|^2 loses the distance to float32
    cancellation; the nearest entry's |q - b|^2 is recomputed and stays exact."""
    gen = torch.Generator().manual_seed(8)
    bank = 30 + torch.randn(200, 64, generator=gen)
    queries = bank[:50] + 0.01 * torch.randn(50, 64, generator=gen)
    dist, idx = nearest(queries, bank, squared=True)
    exact = ((queries.double() - bank.double()[idx]) ** 2).sum(1)
    assert torch.equal(idx, torch.cdist(queries.double(), bank.double()).argmin(1))
    assert torch.allclose(dist.double(), exact, rtol=1e-5, atol=0)
    assert torch.allclose(nearest(queries, bank)[0].double(), exact.sqrt(), rtol=1e-5, atol=0)


def test_predict_scores_as_the_official_patchcore():
    """Patch score: squared distance to the nearest bank entry; map: those scores resized
    bilinearly and smoothed as scipy's gaussian_filter; image score: the largest patch score."""
    det = create_detector(
        "knn",
        backbone="efficientnet_lite0",
        weights="random",
        pretrain_embed_dim=32,
        embed_dim=24,
        coreset_ratio=0.5,
        discover_types=False,
    )
    gen = torch.Generator().manual_seed(9)
    det.fit([Batch(label=torch.zeros(2), image=torch.rand(2, 3, 64, 64, generator=gen))])
    assert det.bank_.shape == (int(0.5 * 2 * 8 * 8), 24)
    image = torch.rand(2, 3, 64, 64, generator=gen)
    pred = det.predict(Batch(label=torch.zeros(2), image=image))
    f = det.embed(image).double()
    d = torch.cdist(f.permute(0, 2, 3, 1).reshape(-1, 24), det.bank_.double()).min(1).values
    patch = (d**2).view(2, 8, 8)
    assert torch.allclose(pred.score.double(), patch.flatten(1).amax(1), rtol=1e-5)
    up = F.interpolate(patch[:, None], size=64, mode="bilinear", align_corners=False)[:, 0]
    blurred = np.stack([scipy.ndimage.gaussian_filter(m, 4.0) for m in up.numpy()])
    assert np.allclose(pred.anomaly_map.numpy(), blurred, rtol=1e-5, atol=1e-6 * blurred.max())


def test_reweighted_image_score_follows_patchcore():
    det = create_detector("knn", backbone="efficientnet_lite0", weights="random", reweight=True)
    gen = torch.Generator().manual_seed(2)
    det.bank_ = torch.randn(50, 6, generator=gen)
    queries = torch.randn(2, 7, 6, generator=gen)
    dist, idx = nearest(queries.reshape(-1, 6), det.bank_)
    score = det._reweighted(queries, dist.view(2, 7), idx.view(2, 7))
    for b in range(2):  # independently, in NumPy
        q, bank = queries[b].numpy().astype(np.float64), det.bank_.numpy().astype(np.float64)
        d = np.linalg.norm(q[:, None] - bank[None], axis=-1)
        p = d.min(1).argmax()
        m_star = d[p].argmin()
        neighbours = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1))[:9]
        e = np.exp(np.linalg.norm(q[p] - bank[neighbours], axis=1))
        expected = (1 - e[0] / e.sum()) * d[p].min()
        assert float(score[b]) == pytest.approx(expected, rel=1e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):
        create_detector("knn", backbone="efficientnet_lite0", weights=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_knn_on_real_bottle_subset(bottle):
    """Real ImageNet EfficientNet-Lite0 features, a subset of MVTec AD bottle."""
    train = MVTecAD(bottle.parent, "bottle", "train", image_size=256, crop_size=224)
    train.items = train.items[:40]
    test = MVTecAD(bottle.parent, "bottle", "test", image_size=256, crop_size=224)
    test.items = [it for it in test.items if it["defect"] == "good"][:10] + [
        it for it in test.items if it["defect"] != "good"
    ][::4]
    det = create_detector("knn", backbone="efficientnet_lite0")
    det.fit(EpochLoader(train, 8))
    assert det.bank_.shape == (round(0.1 * 40 * 28 * 28), 1024)
    scores, labels, maps, masks = [], [], [], []
    for batch in EpochLoader(test, 8):
        pred = det.predict(batch)
        assert pred.anomaly_map.shape[-2:] == (224, 224)
        scores.append(pred.score)
        labels.append(batch.label)
        maps.append(pred.anomaly_map)
        masks.append(torch.nn.functional.interpolate(batch.mask[:, None].float(), size=224)[:, 0])
    # measured: image AUROC 1.0 (10 good, 16 defective), pixel AUROC 0.978
    assert auroc(torch.cat(scores), torch.cat(labels)) >= 0.99
    assert pixel_metrics(torch.cat(maps), torch.cat(masks) > 0.5)["pixel_auroc"] >= 0.97
