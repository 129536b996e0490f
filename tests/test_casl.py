"""CASL: the sparse voxel convolutions against dense torch convolutions, the U-Net's shapes and
per-cloud independence, PO3AD's pseudo-anomaly synthesis, training (the loss falls, resume is
exact) and scoring of organised and subsampled clouds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.adapters.casl import _TEST_SEED, CASL
from bench.adapters.casl.network import CASLNet
from bench.adapters.casl.sparse import (
    DownConv,
    SparseTensor,
    SubmanifoldConv,
    UpConv,
    VoxelGrid,
    to_dense,
    voxelize,
)
from bench.adapters.casl.synthesis import (
    estimate_normals,
    normalise,
    prepared_inputs,
    synthesize,
)
from bench.datasets.synthetic_real3d import _shape
from bench.pointcloud import knn_indices
from bench.system import seed_everything
from bench.training import CHECKPOINT_NAME
from bench.types import Batch

TINY_NET = dict(
    encoder=(8, 8, 16, 16), decoder=(16, 16, 8, 8), layers=(1,) * 8, stem=8, stem_kernel=3
)
TINY = dict(
    encoder_channels=(8, 8, 16, 16),
    decoder_channels=(16, 16, 8, 8),
    layers=(1,) * 8,
    stem_channels=8,
    stem_kernel=3,
    ks=(8, 16),
    voxel_size=0.05,
    amp="off",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny gather-matmul-scatter ops: intra-op threads only add overhead (on a
    shared 2-core machine two threads made them ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- sparse convolutions against dense torch ------------------------------------------------------
SHAPE = (8, 8, 4)  # sides divisible by 4: dense stride-2 convolutions twice cover every voxel


def _occupancy(seed: int, density: float = 0.3) -> torch.Tensor:
    """Random occupied voxels of a batch of 2 grids of SHAPE, rows shuffled: [V, 4]."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(2, *SHAPE, generator=g) < density).nonzero()
    return coords[torch.randperm(len(coords), generator=g)]


def _dense(feats: torch.Tensor, coords: torch.Tensor, stride: int) -> torch.Tensor:
    """Dense [2, C, ...] grid at ``stride`` (voxel units of that stride) holding ``feats``."""
    shape = tuple(s // stride for s in SHAPE)
    out = feats.new_zeros(2, *shape, feats.shape[1])
    b, i, j, k = coords.unbind(1)
    out = out.index_put((b, i // stride, j // stride, k // stride), feats)
    return out.permute(0, 4, 1, 2, 3)


def _sample(dense: torch.Tensor, coords: torch.Tensor, stride: int) -> torch.Tensor:
    b, i, j, k = coords.unbind(1)
    return dense[b, :, i // stride, j // stride, k // stride]


def _dense_weight(w: torch.Tensor, k: int, transposed: bool = False) -> torch.Tensor:
    """[K^3, Cin, Cout] (x slowest) as conv3d's [Cout, Cin, k, k, k] (or conv_transpose3d's
    [Cin, Cout, k, k, k])."""
    w = w.reshape(k, k, k, w.shape[1], w.shape[2])
    return w.permute(3, 4, 0, 1, 2) if transposed else w.permute(4, 3, 0, 1, 2)


def _compare(module, x: SparseTensor, out_coords, out_stride, dense_fn, seed):
    """The sparse module's output and gradients (input features, weight, bias) against
    ``dense_fn(dense input, weight[, bias])`` sampled at ``out_coords``."""
    module = module.double()
    feats = x.feats.detach().double().requires_grad_()
    out = module(SparseTensor(feats, x.grid, x.stride))
    assert out.stride == out_stride
    assert out.feats.shape == (len(out_coords), module.weight.shape[2])
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.feats.shape, generator=g, dtype=torch.float64)
    (out.feats * probe).sum().backward()

    feats2 = x.feats.detach().double().requires_grad_()
    weight2 = module.weight.detach().clone().requires_grad_()
    bias2 = None if getattr(module, "bias", None) is None else module.bias.detach().clone()
    if bias2 is not None:
        bias2.requires_grad_()
    dense_in = _dense(feats2, x.grid.coords(x.stride), x.stride)
    assert torch.equal(dense_in, to_dense(SparseTensor(feats2, x.grid, x.stride), 2, SHAPE)[
        (slice(None), slice(None)) + tuple(slice(None, None, x.stride) for _ in range(3))
    ])  # fmt: skip
    reference = _sample(dense_fn(dense_in, weight2, bias2), out_coords, out_stride)
    (reference * probe).sum().backward()

    torch.testing.assert_close(out.feats, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(feats.grad, feats2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.weight.grad, weight2.grad, rtol=1e-10, atol=1e-10)
    if bias2 is not None:
        torch.testing.assert_close(module.bias.grad, bias2.grad, rtol=1e-10, atol=1e-10)
    return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel,bias", [(3, True), (5, False), (1, False)])
def test_submanifold_conv_equals_dense_conv3d(kernel, bias, stride):
    torch.manual_seed(kernel)
    grid = VoxelGrid(_occupancy(kernel + 10 * stride))
    coords = grid.coords(stride)
    if stride > 1:  # coarse voxels are the parents of the occupied fine ones
        parents = grid.coords(1).clone()
        parents[:, 1:] = parents[:, 1:] // stride * stride
        assert torch.equal(coords, torch.unique(parents, dim=0))
    conv = SubmanifoldConv(3, 4, kernel, bias=bias)
    if bias:
        conv.bias.data.normal_()
    x = SparseTensor(torch.randn(len(coords), 3), grid, stride)

    def dense(inp, w, b):
        return F.conv3d(inp, _dense_weight(w, kernel), b, padding=kernel // 2)

    _compare(conv, x, coords, stride, dense, seed=1)


def test_down_conv_equals_strided_conv3d_twice():
    torch.manual_seed(0)
    grid = VoxelGrid(_occupancy(3, density=0.2))
    x = SparseTensor(torch.randn(grid.size(1), 3), grid, 1)

    def dense(inp, w, b):
        return F.conv3d(inp, _dense_weight(w, 2), stride=2)

    mid = _compare(DownConv(3, 5), x, grid.coords(2), 2, dense, seed=2)
    # one stride further up (child bits of stride-2 voxels); the dense stride-2 grid has
    # zeros where no voxel is occupied, exactly what the sparse conv leaves out
    _compare(DownConv(5, 2), mid.with_feats(mid.feats.detach()), grid.coords(4), 4, dense, 3)


@pytest.mark.parametrize("stride", [2, 4])
def test_up_conv_equals_conv_transpose3d(stride):
    torch.manual_seed(stride)
    grid = VoxelGrid(_occupancy(4))
    x = SparseTensor(torch.randn(grid.size(stride), 4), grid, stride)

    def dense(inp, w, b):
        return F.conv_transpose3d(inp, _dense_weight(w, 2, transposed=True), stride=2)

    _compare(UpConv(4, 3), x, grid.coords(stride // 2), stride // 2, dense, seed=4)


def test_voxelize_quantises_each_cloud_from_zero():
    g = torch.Generator().manual_seed(0)
    clouds = [torch.rand(50, 3, generator=g) * 2 - 5, torch.rand(30, 3, generator=g) + 10]
    coords, inverse = voxelize(clouds, 0.25)
    assert len(torch.unique(coords, dim=0)) == len(coords)
    assert len(inverse) == 80
    for b, cloud in enumerate(clouds):
        q = torch.floor(cloud / 0.25).long()
        q -= q.min(0).values
        rows = inverse[:50] if b == 0 else inverse[50:]
        assert torch.equal(coords[rows], torch.cat([torch.full((len(q), 1), b), q], 1))


# -- the network -----------------------------------------------------------------------------------
def _cloud(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(_shape(np.random.default_rng(seed), n)).float()


def test_network_shapes_and_clouds_independent_in_eval():
    torch.manual_seed(0)
    ks = (8, 16)
    net = CASLNet(len(ks), **TINY_NET)
    prepared = [prepared_inputs(_cloud(i, n), ks)[:2] for i, n in enumerate((700, 1500, 2600))]
    clouds = [p for p, _ in prepared]
    curv = [c for _, c in prepared]
    coords, point_voxel = voxelize(clouds, 0.05)
    with torch.no_grad():
        net.train()  # a few batches so that the running statistics are not the initial ones
        for _ in range(2):
            net(coords, point_voxel, torch.cat(curv))
        net.eval()
        xyz, logits = net(coords, point_voxel, torch.cat(curv))
        assert xyz.shape == (4800, 3) and logits.shape == (4800, 2)
        assert bool(torch.isfinite(xyz).all() and torch.isfinite(logits).all())
        start = 0
        for p, c in zip(clouds, curv):
            alone_coords, alone_pv = voxelize([p], 0.05)
            a_xyz, a_logits = net(alone_coords, alone_pv, c)
            stop = start + len(p)
            torch.testing.assert_close(xyz[start:stop], a_xyz, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits[start:stop], a_logits, rtol=1e-4, atol=1e-5)
            start = stop
        # the outputs do depend on the cloud (not constant), else independence is vacuous
        assert float(logits.std(0).min()) > 1e-4


# -- synthesis -------------------------------------------------------------------------------------
def _sphere(n: int) -> torch.Tensor:
    """Fibonacci sphere of radius 1 (distinct points, unit outward normals = the points)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    pts = torch.stack(
        [torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], 1
    )
    return pts.float()


def test_estimate_normals_on_a_plane_and_a_sphere():
    g = torch.Generator().manual_seed(0)
    # a tilted plane with known unit normal
    uv = torch.rand(1500, 2, generator=g, dtype=torch.float64) * 2 - 1
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    plane = (torch.cat([uv, torch.zeros(1500, 1, dtype=torch.float64)], 1) @ q.T).float()
    normals = estimate_normals(plane, knn_indices(plane, 12))
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(1500), atol=1e-5, rtol=0)
    assert float((normals @ q[:, 2].float()).abs().min()) > 1 - 1e-5
    sphere = _sphere(2000)
    normals = estimate_normals(sphere, knn_indices(sphere, 16))
    assert float((normals * sphere).sum(1).abs().min()) > 0.99


@pytest.mark.parametrize("parts", [20, 64])
def test_synthesize_moves_one_patch_along_its_normals(parts):
    n = 2000
    points = _sphere(n)
    g = torch.Generator().manual_seed(parts)
    flips = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    normals = points * flips[:, None]  # true normals, arbitrary signs (as estimate_normals)
    lo, hi = 0.06, 0.12
    signs, magnitudes = set(), []
    for seed in range(12):
        moved, labels = synthesize(points, normals, g.manual_seed(seed), parts, (lo, hi))
        disp = (moved - points).double()
        shift = disp.norm(dim=1)
        centre = int(shift.argmax())  # ramp 1 at the centre: the largest displacement
        distance = (points - points[centre]).double().norm(dim=1)
        patch = distance.argsort()[: n // parts]
        expected = torch.zeros(n, dtype=torch.long)
        expected[patch] = 1
        assert torch.equal(labels, expected)
        outside = expected == 0
        assert torch.equal(moved[outside], points[outside])
        # along the normal: parallel to the radius, one radial sign for the whole patch
        radial = (disp[patch] * points[patch].double()).sum(1)
        torch.testing.assert_close(
            disp[patch], radial[:, None] * points[patch].double(), atol=1e-6, rtol=0
        )
        moving = radial.abs() > 1e-7
        sign = torch.sign(radial[moving])
        assert bool((sign == sign[0]).all())
        signs.add(int(sign[0]))
        m = float(radial.abs().max())
        assert lo <= m <= hi
        magnitudes.append(m)
        d = distance[patch]
        ramp = 1 - d / d.max()  # 1 at the centre, 0 at the farthest patch point
        torch.testing.assert_close(radial.abs(), m * ramp, atol=1e-6, rtol=0)
    assert signs == {-1, 1}  # bulges and sinks
    assert max(magnitudes) - min(magnitudes) > 0.01  # m is drawn, not fixed


def test_synthesize_on_a_plane_moves_along_z():
    g = torch.Generator().manual_seed(5)
    points = torch.cat([torch.rand(1200, 2, generator=g) * 2 - 1, torch.zeros(1200, 1)], 1)
    normals = estimate_normals(points, knn_indices(points, 16))
    moved, labels = synthesize(points, normals, g, parts=30, magnitude=(0.1, 0.1))
    assert int(labels.sum()) == 1200 // 30
    disp = moved - points
    assert torch.equal(disp[labels == 0], torch.zeros(1200 - 40, 3))
    torch.testing.assert_close(disp[:, :2], torch.zeros(1200, 2), atol=1e-6, rtol=0)
    z = disp[labels == 1, 2]
    assert bool((z >= 0).all()) or bool((z <= 0).all())
    torch.testing.assert_close(z.abs().max(), torch.tensor(0.1))


def test_prepared_inputs_synthesis_labels_the_moved_points():
    g = torch.Generator().manual_seed(1)
    cloud = _cloud(3, 1500)
    p, curv, labels = prepared_inputs(cloud, (8, 16), generator=g, synthesize_anomaly=True)
    plain, plain_curv, plain_labels = prepared_inputs(cloud, (8, 16))
    assert curv.shape == (1500, 2) and not bool(plain_labels.any())
    assert int(labels.sum()) == 1500 // 64
    moved = (p - plain).norm(dim=1) > 0
    assert bool(labels[moved].all())
    assert bool(moved.sum() >= labels.sum() - 1)  # the farthest patch point has ramp 0
    torch.testing.assert_close(plain.norm(dim=1).max(), torch.tensor(1.0))
    torch.testing.assert_close(plain.mean(0), torch.zeros(3), atol=1e-6, rtol=0)


# -- training --------------------------------------------------------------------------------------
def _train_batches(sizes=(1200, 1500)) -> list[Batch]:
    clouds = [_cloud(10 + i, n) for i, n in enumerate(sizes)]
    return [Batch(label=torch.zeros(len(clouds), dtype=torch.long), points=clouds)]


@pytest.mark.slow
def test_pretraining_reduces_the_reconstruction_loss():
    seed_everything(0)
    # without rotation: with the random rotations 25 steps only reach the loss of predicting
    # the centroid (the net sees occupancy, never coordinates)
    det = CASL(
        **TINY, pretrain_iterations=25, finetune_iterations=1, lr=3e-3, rotate="none",
        lr_schedule="constant", density_jitter=0.0,
    )  # fmt: skip
    train = _train_batches()
    det.fit(train)
    losses = [v for _, v in det.train_log_]
    assert [s for s, _ in det.train_log_] == list(range(26))
    first, last = sum(losses[:5]) / 5, sum(losses[20:25]) / 5
    assert last < 0.75 * first, (first, last)  # measured 0.55
    target = torch.cat([normalise(p) for p in train[0].points])
    constant = float(target.abs().mean() + (target**2).mean())  # L1 + L2 of predicting 0
    assert last < 0.85 * constant, (last, constant)  # measured 0.71


class CrashInFinetune(CASL):
    def training_step(self, batch, step):
        if step == self.pretrain_iterations + 2:
            raise KeyboardInterrupt("simulated interruption")
        return super().training_step(batch, step)


@pytest.mark.slow
def test_interrupted_finetuning_resumes_to_identical_weights(tmp_path):
    """Interrupted mid fine-tuning (phases of unequal length, so a scheduler restarted from
    step 0 would give other learning rates than the restored one)."""
    params = dict(
        **TINY, pretrain_iterations=3, finetune_iterations=5, checkpoint_every=2, max_points=900
    )
    seed_everything(0)
    straight = CASL(**params)
    straight.workdir = tmp_path / "straight"
    straight.fit(_train_batches((1000, 1100)))

    seed_everything(0)
    crashed = CrashInFinetune(**params)
    crashed.workdir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(_train_batches((1000, 1100)))
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 4  # one step into fine-tuning
    assert [s for s, _ in ckpt["train_log"]] == [0, 1, 2, 3]

    seed_everything(1234)  # the checkpoint restores the RNG: the global seed must not matter
    resumed = CASL(**params)
    resumed.workdir = tmp_path / "resumed"
    resumed.fit(_train_batches((1000, 1100)))

    assert [s for s, _ in resumed.train_log_] == list(range(8))
    assert resumed.train_log_ == straight.train_log_
    a, b = straight.net_.state_dict(), resumed.net_.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)["step"] == 8


# -- scoring ---------------------------------------------------------------------------------------
def _organised(seed: int, b: int = 2, h: int = 36, w: int = 40) -> Batch:
    """A bumpy height field per image (metres, MVTec 3D-AD-like), invalid pixels at 0."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(
        torch.linspace(-0.03, 0.03, h), torch.linspace(-0.03, 0.03, w), indexing="ij"
    )
    xyz, valid = [], []
    for i in range(b):
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.03
        z = 0.004 * torch.cos(90 * x) + 0.006 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 5e-5)
        ok = torch.rand(h, w, generator=g) < 0.85
        grid = torch.stack([x, y, z + 0.3 + 0.01 * i])
        xyz.append(grid * ok)
        valid.append(ok)
    return Batch(
        label=torch.zeros(b, dtype=torch.long), xyz=torch.stack(xyz), valid=torch.stack(valid)
    )


@pytest.fixture(scope="module")
def fitted() -> CASL:
    seed_everything(0)
    det = CASL(**TINY, pretrain_iterations=1, finetune_iterations=2, sigma=0, top_fraction=0.05)
    det.fit([_organised(0)])  # trains on organised batches too
    return det


def test_predict_on_organised_input(fitted):
    batch = _organised(1)
    pred = fitted.predict(batch)
    assert pred.point_scores is None
    assert pred.anomaly_map.shape == batch.valid.shape == (2, 36, 40)
    clouds = [batch.xyz[i][:, batch.valid[i]].T for i in range(2)]
    scores = fitted.point_scores(clouds)
    for i, s in enumerate(scores):
        amap, ok = pred.anomaly_map[i], batch.valid[i]
        assert s.shape == (int(ok.sum()),)
        assert float(s.std()) > 0
        torch.testing.assert_close(amap[ok], s)
        assert bool((amap[~ok] == amap[ok].min()).all())  # invalid pixels: the lowest score
        torch.testing.assert_close(amap[ok].min(), s.min())
        k = max(1, round(len(s) * 0.05))
        top = s.sort(descending=True).values[:k].mean()
        torch.testing.assert_close(pred.score[i], top)
    # blurring changes the map, never the image score
    fitted.sigma = 2.0
    try:
        blurred = fitted.predict(batch)
    finally:
        fitted.sigma = 0
    torch.testing.assert_close(blurred.score, pred.score)
    assert blurred.anomaly_map.shape == pred.anomaly_map.shape
    assert not torch.allclose(blurred.anomaly_map, pred.anomaly_map)


def test_unorganised_predict_returns_point_scores(fitted):
    clouds = [_cloud(20, 800), _cloud(21, 1300)]
    pred = fitted.predict(Batch(label=torch.zeros(2, dtype=torch.long), points=clouds))
    assert pred.anomaly_map is None
    assert [len(s) for s in pred.point_scores] == [800, 1300]
    for got, want in zip(pred.point_scores, fitted.point_scores(clouds)):
        torch.testing.assert_close(got, want)


def test_subsampled_cloud_takes_nearest_scored_values(fitted):
    batch = _organised(2, b=1)
    cloud = batch.xyz[0][:, batch.valid[0]].T
    n = len(cloud)
    fitted.max_points = 400
    try:
        (scores,) = fitted.point_scores([cloud])
        pred = fitted.predict(batch)
    finally:
        fitted.max_points = 40000
    assert n > 1000 and scores.shape == (n,)
    # the documented fixed subsample, scored alone by the network
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(_TEST_SEED))[:400]
    p, curv, _ = prepared_inputs(
        cloud[keep], fitted.ks, fitted.knn, spacing=fitted.spacing_
    )  # neighbour counts at the training clouds' spacing
    coords, point_voxel = voxelize([p], fitted.voxel_size_)
    with torch.no_grad():
        _, logits = fitted.net_(coords, point_voxel, curv)
    kept_scores = logits[:, 1] - logits[:, 0]
    torch.testing.assert_close(scores[keep], kept_scores, rtol=1e-5, atol=1e-5)
    distance = torch.cdist(cloud.double(), cloud[keep].double())
    nearest = distance <= distance.min(1, keepdim=True).values + 1e-12  # the grid has exact ties
    unique = nearest.sum(1) == 1
    assert int(unique.sum()) > 0.9 * n
    torch.testing.assert_close(
        scores[unique], kept_scores[nearest[unique].float().argmax(1)], rtol=1e-5, atol=1e-5
    )
    matches = (scores[:, None] - kept_scores[None]).abs() <= 1e-5 * (1 + kept_scores.abs())
    assert bool((matches & nearest).any(1).all())  # tied points: one of their nearest
    assert len(torch.unique(scores)) <= 400
    torch.testing.assert_close(pred.anomaly_map[0][batch.valid[0]], scores)


def test_training_step_runs_under_autocast():
    """The fit runs training_step under autocast on GPUs (bf16 here on the CPU): the geometry
    (rotation, kNN, covariance eigenvalues, which have no bf16 kernel) must stay float32. The
    same step (same seed: same synthesis) without autocast is the reference: the bf16 loss
    differs from it (autocast did act) by no more than bf16 rounding, 1% (measured 0.06%)."""
    det = CASL(
        encoder_channels=(8, 8, 16, 16), decoder_channels=(16, 16, 8, 8), layers=(1,) * 8,
        stem_channels=8, stem_kernel=3, pretrain_iterations=1, finetune_iterations=1,
    )  # fmt: skip
    clouds = [torch.from_numpy(_shape(np.random.default_rng(i), 800)).float() for i in (0, 1)]
    batch = Batch(label=torch.zeros(2, dtype=torch.long), points=clouds)
    torch.manual_seed(0)
    det.build(batch)
    det.net_.train()
    for step in (0, 1):  # pretraining, fine-tuning
        torch.manual_seed(5)
        full = float(det.training_step(batch, step))
        torch.manual_seed(5)
        assert float(det.training_step(batch, step)) == full  # the reference is reproducible
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = det.training_step(batch, step)
        assert loss.dtype == torch.float32 and loss.requires_grad
        assert float(loss) != full and float(loss) == pytest.approx(full, rel=1e-2)


def test_prepared_inputs_stay_float32_under_autocast():
    cloud = torch.from_numpy(_shape(np.random.default_rng(0), 800)).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, curv, _ = prepared_inputs(
            cloud, (16, 32, 64), "torch", torch.Generator().manual_seed(0), rotate=True,
            synthesize_anomaly=True,
        )  # fmt: skip
    assert p.dtype == torch.float32 and curv.dtype == torch.float32
