"""The training loop: exact resume after a crash, checkpoints on disk, cached fitted state."""

from __future__ import annotations

import pytest
import torch

from bench.adapters.autoencoder import AutoEncoder
from bench.adapters.grid_curvature import GridCurvature
from bench.datasets import MVTec3D, MVTecAD
from bench.loading import EpochLoader
from bench.system import seed_everything
from bench.training import CHECKPOINT_NAME, amp_dtype
from bench.types import collate

PARAMS = dict(input_size=128, width=4, latent=8, iterations=12, checkpoint_every=5, lr=1e-3)


class CrashAt7(AutoEncoder):
    def training_step(self, batch, step):
        if step == 7:
            raise KeyboardInterrupt("simulated interruption")
        return super().training_step(batch, step)


def _loader(ad_root):
    ds = MVTecAD(ad_root, "washer", "train", image_size=128)
    return EpochLoader(ds, 4, shuffle=True, seed=3, drop_last=True)  # 3 batches an epoch


@pytest.mark.slow
def test_interrupted_training_resumes_to_identical_weights(ad_root, tmp_path):
    seed_everything(0)
    straight = AutoEncoder(**PARAMS)
    straight.workdir = tmp_path / "straight"
    straight.fit(_loader(ad_root))

    seed_everything(0)
    crashed = CrashAt7(**PARAMS)
    crashed.workdir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(_loader(ad_root))
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 5

    seed_everything(1234)  # the checkpoint restores every RNG, so the global seed must not matter
    resumed = AutoEncoder(**PARAMS)
    resumed.workdir = tmp_path / "resumed"
    resumed.fit(_loader(ad_root))

    assert [s for s, _ in resumed.train_log_] == list(range(12))
    assert resumed.train_log_ == straight.train_log_
    for (k, a), (_, b) in zip(
        straight.model_.state_dict().items(), resumed.model_.state_dict().items()
    ):
        assert torch.equal(a, b), k
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)["step"] == 12


@pytest.mark.slow
def test_training_reduces_the_loss(ad_root):
    seed_everything(0)
    det = AutoEncoder(**{**PARAMS, "iterations": 60})
    det.fit(_loader(ad_root))
    first = sum(v for _, v in det.train_log_[:5]) / 5
    last = sum(v for _, v in det.train_log_[-5:]) / 5
    assert last < 0.6 * first  # measured 0.571 (mean of the last 5 losses over the first 5)


@pytest.mark.slow
def test_checkpoint_of_another_config_is_not_resumed(ad_root, tmp_path):
    """A checkpoint left in the workdir by another configuration is ignored: the run is the run
    from scratch with the same seed, not a continuation of the other one's weights and RNG."""
    seed_everything(0)
    other = AutoEncoder(**{**PARAMS, "iterations": 5})
    other.workdir = tmp_path / "shared"
    other.fit(_loader(ad_root))
    assert torch.load(tmp_path / "shared" / CHECKPOINT_NAME, weights_only=False)["step"] == 5

    mine = {**PARAMS, "iterations": 6, "lr": 5e-4}
    seed_everything(1)
    b = AutoEncoder(**mine)
    b.workdir = tmp_path / "shared"
    b.fit(_loader(ad_root))

    seed_everything(1)
    fresh = AutoEncoder(**mine)
    fresh.workdir = tmp_path / "fresh"
    fresh.fit(_loader(ad_root))

    assert [s for s, _ in b.train_log_] == list(range(6))
    assert b.train_log_ == fresh.train_log_
    for (k, x), (_, y) in zip(b.model_.state_dict().items(), fresh.model_.state_dict().items()):
        assert torch.equal(x, y), k
    # resuming would have kept the other run's five losses (another seed: other weights)
    assert b.train_log_[:5] != other.train_log_
    ckpt = torch.load(tmp_path / "shared" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 6 and ckpt["params"] == b.get_params()


def test_fitted_state_round_trips(ad3d_root, tmp_path):
    train = EpochLoader(MVTec3D(ad3d_root, "dome", "train", image_size=64), 4)
    test = collate([MVTec3D(ad3d_root, "dome", "test", image_size=64)[i] for i in range(3)])
    det = GridCurvature()
    det.fit(train)
    det.save_state(tmp_path / "fitted.pt")
    again = GridCurvature()
    again.load_state(tmp_path / "fitted.pt")
    assert torch.equal(det.predict(test).anomaly_map, again.predict(test).anomaly_map)
    with pytest.raises(ValueError, match="holds state of GridCurvature"):
        AutoEncoder().load_state(tmp_path / "fitted.pt")


def test_mixed_precision_is_for_gpus_only():
    assert amp_dtype(torch.device("cpu"), "auto") is None
    with pytest.raises(ValueError, match="amp must be"):
        amp_dtype(torch.device("cuda"), "int8")


def test_epoch_loader_iterates_when_only_its_iterator_is_kept():
    """``iter(EpochLoader(...))`` on a temporary (the runner's test loop does this): the
    batches must not depend on the loader object staying alive."""
    import gc

    import torch as _torch
    from torch.utils.data import TensorDataset

    class Samples(TensorDataset):
        def __getitem__(self, i):
            return {"meta": {"index": i}, "label": super().__getitem__(i)[0]}

    data = Samples(_torch.arange(10.0))
    batches = iter(EpochLoader(data, 3))
    gc.collect()
    assert [b.label.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]

    shuffled = EpochLoader(data, 10, shuffle=True, seed=5)
    shuffled.set_epoch(2)
    expected = _torch.Generator().manual_seed(5 * 1_000_003 + 2)
    _torch.empty((), dtype=_torch.int64).random_(generator=expected)
    assert (
        next(iter(shuffled)).label.long().tolist()
        == _torch.randperm(10, generator=expected).tolist()
    )


def test_epoch_loader_close_stops_its_persistent_workers():
    """A training loader's workers persist across epochs; ``close`` ends them at once (the
    runner calls it after a fit, before the test loader forks its own workers)."""
    from torch.utils.data import TensorDataset

    class Samples(TensorDataset):
        def __getitem__(self, i):
            return {"meta": {"index": i}, "label": super().__getitem__(i)[0]}

    loader = EpochLoader(Samples(torch.arange(8.0)), 4, shuffle=True, num_workers=2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sorted(x for b in loader for x in b.label.tolist()) == list(range(8))
    workers = loader._loader._iterator._workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert sorted(x for b in loader for x in b.label.tolist()) == list(range(8))  # reopens
    loader.close()
