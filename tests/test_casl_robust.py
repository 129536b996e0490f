"""CASL on what real scans do: clouds in other units and orientations, other densities and point
counts, partial views; and the parts of its training that follow PO3AD (learning-rate schedule)
or widen it (pseudo-anomaly sizes, density jitter)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bench.adapters.casl as casl_module
from bench.adapters.casl import (
    AUTO_MAX_VOXEL,
    AUTO_SPACINGS,
    CASL,
    PAPER_VOXEL,
    po3ad_lr_factor,
)
from bench.adapters.casl.synthesis import (
    curvature_features,
    density_scaled,
    median_spacing,
    normalise,
    partial_view,
    random_rotation,
    synthesize,
)
from bench.datasets.synthetic_real3d import _shape
from bench.system import seed_everything
from bench.types import Batch

TINY = dict(
    encoder_channels=(8, 8, 16, 16),
    decoder_channels=(16, 16, 8, 8),
    layers=(1,) * 8,
    stem_channels=8,
    stem_kernel=3,
    ks=(8, 16),
    amp="off",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ellipsoid(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(_shape(np.random.default_rng(seed), n).astype(np.float32))


def _sphere(seed: int, n: int) -> torch.Tensor:
    d = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (d / d.norm(dim=1, keepdim=True)).float()


# -- PO3AD's schedule ------------------------------------------------------------------------------
def test_lr_follows_po3ad_per_phase():
    pre, fine = 200, 1000
    factors = [po3ad_lr_factor(s, pre, fine) for s in range(pre + fine)]
    # held for the first 1% of each phase, then a cosine (from 1) down to 1e-3 of the base
    assert factors[:3] == [1.0] * 3 and factors[3] < 1.0
    assert factors[pre : pre + 11] == [1.0] * 11 and factors[pre + 11] < 1.0
    for start, length in ((0, pre), (pre, fine)):
        hold = length // 100
        for s in (start + hold + 1, start + length // 2, start + length - 1):
            t = (s - start - hold) / (length - hold)
            want = 1e-3 + 0.5 * (1 - 1e-3) * (1 + math.cos(math.pi * t))
            assert factors[s] == pytest.approx(want, rel=1e-12)
    assert factors[pre - 1] < 0.002 and factors[-1] < 0.002
    # the detector's optimiser steps through it
    det = CASL(**TINY, pretrain_iterations=pre, finetune_iterations=fine, lr=2e-3)
    det.build(Batch(label=torch.zeros(1, dtype=torch.long), points=[_ellipsoid(0, 300)]))
    opt, scheduler = det.configure_optimizers()
    seen = []
    for _ in range(pre + fine):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    np.testing.assert_allclose(seen, [2e-3 * f for f in factors], rtol=1e-12)
    assert opt.param_groups[0]["weight_decay"] == 0  # PO3AD's Adam has none


# -- pseudo-anomaly sizes --------------------------------------------------------------------------
def test_patch_sizes_range_log_uniformly_between_the_parts():
    points = normalise(_sphere(0, 6400))
    normals = points.clone()
    g = torch.Generator().manual_seed(0)
    sizes = [int(synthesize(points, normals, g, (8, 64))[1].sum()) for _ in range(300)]
    assert min(sizes) >= 6400 // 64 and max(sizes) <= 6400 // 8
    assert min(sizes) < 1.2 * 6400 / 64 and max(sizes) > 0.85 * 6400 / 8
    # log-uniform: half the patches below the geometric middle 6400 / sqrt(8 * 64)
    below = np.mean(np.array(sizes) < 6400 / math.sqrt(8 * 64))
    assert 0.4 < below < 0.6, below
    # a single part count keeps PO3AD's fixed size
    assert {int(synthesize(points, normals, g, 64)[1].sum()) for _ in range(5)} == {100}


# -- units, orientation, density -------------------------------------------------------------------
def _fitted_geometry(clouds: list[torch.Tensor], **params) -> CASL:
    det = CASL(**{**TINY, **params})
    det.build(Batch(label=torch.zeros(len(clouds), dtype=torch.long), points=clouds))
    return det


def test_auto_voxel_ignores_units_and_orientation_and_follows_density():
    metres = [_ellipsoid(i, 20000) for i in range(3)]
    rotation = random_rotation(torch.Generator().manual_seed(3))
    millimetres = [1000 * p @ rotation.T + 250.0 for p in metres]
    a = _fitted_geometry(metres, max_points=20000)
    b = _fitted_geometry(millimetres, max_points=20000)
    assert a.spacing_ == pytest.approx(b.spacing_, rel=1e-4)
    assert a.voxel_size_ == pytest.approx(b.voxel_size_, rel=1e-4)
    spacing = float(torch.tensor([median_spacing(normalise(p)) for p in metres]).median())
    assert a.spacing_ == pytest.approx(spacing, rel=1e-6)
    assert a.voxel_size_ == pytest.approx(AUTO_SPACINGS * spacing)
    assert a.voxel_size_ > PAPER_VOXEL  # sparse clouds: coarser than PO3AD's voxel
    dense = _fitted_geometry([_ellipsoid(i, 60000) for i in range(2)], max_points=60000)
    assert dense.voxel_size_ == PAPER_VOXEL  # dense clouds keep PO3AD's voxel
    assert _fitted_geometry(metres, voxel_size=0.05, max_points=20000).voxel_size_ == 0.05
    sparse = _fitted_geometry([_ellipsoid(i, 1000) for i in range(2)])
    assert AUTO_SPACINGS * sparse.spacing_ > AUTO_MAX_VOXEL == sparse.voxel_size_  # capped


def test_density_scaled_neighbourhoods_keep_curvature_across_point_counts():
    """A sphere at 4,000 and at 1,000 points: neighbour counts rescaled to the reference spacing
    give the same surface variation (the same neighbourhood area), plain counts do not."""
    dense, sparse = normalise(_sphere(1, 4000)), normalise(_sphere(2, 1000))
    reference = median_spacing(dense)
    ks = (16, 32, 64)
    assert density_scaled(ks, dense, reference) == ks
    scaled = density_scaled(ks, sparse, reference)
    ratio = (reference / median_spacing(sparse)) ** 2
    assert scaled == tuple(round(k * ratio) for k in ks) and 3 <= scaled[0] < 8
    want = curvature_features(dense, ks).mean(0)
    counted = curvature_features(sparse, ks).mean(0)
    rescaled = curvature_features(sparse, scaled).mean(0)
    assert float(((counted - want) / want).abs().min()) > 1.5  # 4x the area: far off
    # from 8 neighbours on (below, a plane through 3-4 random points is a poor estimate)
    torch.testing.assert_close(rescaled[1:], want[1:], rtol=0.15, atol=0)


def test_partial_view_keeps_one_side_of_a_plane():
    points = normalise(_sphere(0, 3000))
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(3, generator=g, dtype=torch.float64)
        fraction = 0.5 + 0.45 * float(torch.rand((), generator=g))
        kept = partial_view(points, torch.Generator().manual_seed(seed))
        assert abs(len(kept) / 3000 - fraction) < 2 / 3000
        along = points.double() @ (direction / direction.norm())
        threshold = float((kept.double() @ (direction / direction.norm())).max())
        torch.testing.assert_close(kept, points[along <= threshold])


@pytest.mark.slow
def test_training_sees_sparser_clouds_with_density_jitter(monkeypatch):
    sizes = []
    real = casl_module.prepared_inputs

    def recording(points, *args, **kwargs):
        sizes.append(len(points))
        return real(points, *args, **kwargs)

    monkeypatch.setattr(casl_module, "prepared_inputs", recording)
    seed_everything(0)
    det = CASL(**TINY, pretrain_iterations=1, finetune_iterations=4, density_jitter=0.5)
    det.fit(
        [
            Batch(
                label=torch.zeros(2, dtype=torch.long),
                points=[_ellipsoid(i, 1200) for i in range(2)],
            )
        ]
    )
    assert len(sizes) == 10 and all(600 <= n <= 1200 for n in sizes) and len(set(sizes)) > 5
    sizes.clear()
    det = CASL(**TINY, pretrain_iterations=1, finetune_iterations=1, density_jitter=0.0)
    det.fit(
        [
            Batch(
                label=torch.zeros(2, dtype=torch.long),
                points=[_ellipsoid(i, 1200) for i in range(2)],
            )
        ]
    )
    assert sizes == [1200] * 4


# -- a trained detector on unaligned, sparser, denser and partial clouds ---------------------------
N_POINTS = 1500


def _bulged(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, np.ndarray]:
    from bench.datasets.synthetic_real3d import _defect, _ellipsoid

    points, q = _ellipsoid(rng, n)
    points, mask = _defect(rng, points, "bulge", q)
    return torch.from_numpy(points), mask


@pytest.fixture(scope="module")
def trained() -> CASL:
    """A tiny CASL trained briefly on four ellipsoids of 1,500 points (about 40 s on one core)."""
    seed_everything(0)
    det = CASL(**{**TINY, "ks": (16, 32, 64)}, pretrain_iterations=5, finetune_iterations=150,
               max_points=4 * N_POINTS)  # fmt: skip
    train = [_ellipsoid(i, N_POINTS) for i in range(4)]
    det.fit([Batch(label=torch.zeros(4, dtype=torch.long), points=train)])
    return det


def _point_auroc(det: CASL, clouds: list[tuple[torch.Tensor, np.ndarray]]) -> float:
    from sklearn.metrics import roc_auc_score

    scores = det.point_scores([c for c, _ in clouds])
    return roc_auc_score(np.concatenate([m for _, m in clouds]), torch.cat(scores).numpy())


@pytest.fixture(scope="module")
def plain() -> list[tuple[torch.Tensor, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [_bulged(rng, N_POINTS) for _ in range(12)]


#: chance is 0.5; the tiny detector scores 0.69 on ``plain`` (below: what each set measured)
FLOOR = 0.62


@pytest.mark.slow
def test_unaligned_clouds_in_other_units(trained, plain):
    """Real3D-AD's test clouds are not aligned with the templates (and may come in mm)."""
    g = torch.Generator().manual_seed(7)
    turned = [(1000 * c @ random_rotation(g).T + 40.0, m) for c, m in plain]
    assert _point_auroc(trained, turned) > FLOOR  # measured 0.73


@pytest.mark.parametrize("factor", [0.5, 3.0])
@pytest.mark.slow
def test_other_point_counts(trained, factor):
    """Half and three times the training clouds' points, scored whole: the neighbour counts
    follow the spacing both ways. With fixed neighbour counts and no density jitter in
    training, half the points scored 0.45."""
    rng = np.random.default_rng(2)
    clouds = [_bulged(rng, int(N_POINTS * factor)) for _ in range(12)]
    assert _point_auroc(trained, clouds) > FLOOR  # measured 0.80 and 0.72


@pytest.mark.slow
def test_partial_views(trained, plain):
    """A third of each test cloud missing (the defect kept), as in a single-view scan."""
    rng = np.random.default_rng(3)
    cut = []
    for cloud, mask in plain:
        along = cloud @ torch.tensor(rng.normal(size=3), dtype=torch.float32)
        if float(along[torch.from_numpy(mask)].mean()) > float(along.median()):
            along = -along  # keep the defect's side
        keep = (along <= torch.quantile(along, 0.67)).numpy()
        cut.append((cloud[keep], mask[keep]))
    assert _point_auroc(trained, cut) > FLOOR  # measured 0.67
