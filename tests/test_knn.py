"""The knn detector: exact greedy coreset, bounded nearest-neighbour search, PatchCore's image
score, and real pretrained features on a subset of MVTec AD bottle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.adapters.knn.coreset import greedy_coreset, greedy_coreset_plain, random_projection
from bench.adapters.knn.neighbours import nearest
from bench.backbones import WeightsNotFoundError
from bench.datasets.mvtec_ad import MVTecAD
from bench.loading import EpochLoader
from bench.metrics import auroc, pixel_metrics
from bench.registry import create_detector


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 4
    which = torch.randint(12, (n,), generator=gen)
    return centres[which] + torch.randn(n, dim, generator=gen) * torch.rand(n, 1, generator=gen)


def k_center_reference(points: torch.Tensor, n: int, start: int) -> list[int]:
    """Textbook greedy k-center, written here in NumPy (float64): each pick is the point
    farthest from every point picked so far."""
    x = points.double().numpy()
    nearest_pick = np.full(len(x), np.inf)
    picks = [start]
    while len(picks) < n:
        d = np.sqrt(((x - x[picks[-1]]) ** 2).sum(1))
        nearest_pick = np.minimum(nearest_pick, d)
        picks.append(int(nearest_pick.argmax()))
    return picks


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_greedy_coreset_makes_the_plain_algorithms_choices(seed):
    points = _clustered(6000, 24, seed)
    pruned = greedy_coreset(points, 600, start=17, block=32, seed=seed)
    assert pruned.tolist() == k_center_reference(points, 600, start=17)
    assert len(set(pruned.tolist())) == 600 and int(pruned[0]) == 17
    small = points[:700]  # few points: greedy_coreset runs the plain loop
    assert greedy_coreset(small, 80, start=5).tolist() == k_center_reference(small, 80, 5)
    assert greedy_coreset_plain(small, 80, 5).tolist() == k_center_reference(small, 80, 5)


def test_greedy_coreset_covers_like_k_center():
    """Greedy k-center is a 2-approximation: its covering radius is at most twice that of any
    other subset of the same size, in particular a random one."""
    points = _clustered(4000, 8, 3)
    picks = greedy_coreset(points, 200, block=32)
    radius = torch.cdist(points, points[picks]).min(1).values.max()
    other = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:200]
    assert radius <= 2 * torch.cdist(points, points[other]).min(1).values.max()


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
    assert det.bank_.shape == (round(0.1 * 40 * 28 * 28), 152)
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
