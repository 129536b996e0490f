"""Every check that needs a CUDA GPU, in one file that `make gpu-check` runs on a GPU machine.

It needs no mlflow, open3d or ray (an air-gapped GPU machine has none): only what the runner
and the detectors import (torch, timm, scipy, scikit-learn, matplotlib, open_clip; what the
machine lacks comes from `make gpu-wheels`). Without a GPU every test is skipped.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_metrics import auroc

from bench.benchmark import run_benchmark
from bench.config import BenchConfig, DatasetEntry, DetectorEntry
from bench.datasets import synthetic_visa
from bench.metrics import pixel_metrics
from bench.pointcloud import knn_indices, multiscale_surface_variation
from bench.registry import create_detector, get_detector_class
from bench.system import seed_everything
from bench.types import Batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: tiny settings of every registered detector (random weights: no hub on the GPU machine)
DINOMALY = dict(encoder="vit_small_patch14_reg4_dinov2", weights="random", encoder_depth=2,
                layers=(0, 1), decoder_depth=2, warmup=3, hard_mining_ramp=4, map_size=None,
                iterations=12)  # fmt: skip
DICTAS = dict(backbone="ViT-B-16", weights="random", input_size=64, backbone_depth=2,
              backbone_width=64, epochs=2, val_fraction=0.2)  # fmt: skip
CASL = dict(encoder_channels=(8, 8, 16, 16), decoder_channels=(16, 16, 8, 8), layers=(1,) * 8,
            stem_channels=8, stem_kernel=3, ks=(8, 16), voxel_size=0.05,
            pretrain_iterations=10, finetune_iterations=10)  # fmt: skip
#: detectors whose fit involves no random training: CPU and GPU must rank alike
DETERMINISTIC = {"feature_stats", "knn", "curvature", "grid_curvature"}


def test_metrics_gpu_and_cpu_give_the_same_values():
    rng = np.random.default_rng(4)
    masks = torch.from_numpy(rng.random((6, 64, 64)) < 0.03)
    maps = torch.from_numpy(rng.random((6, 64, 64)).astype(np.float32)) + masks * 0.3
    cpu = pixel_metrics(maps, masks)
    gpu = pixel_metrics(maps.cuda(), masks)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, abs=1e-12), key


def test_curvature_torch_path_matches_on_cpu_and_cuda():
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(4000, 2, generator=gen) * torch.tensor([math.pi, 2 * math.pi])
    sphere = torch.stack(
        [
            angles[:, 0].sin() * angles[:, 1].cos(),
            angles[:, 0].sin() * angles[:, 1].sin(),
            angles[:, 0].cos(),
        ],
        dim=1,
    )
    cloud = sphere + 0.002 * torch.randn(4000, 3, generator=gen)
    # the neighbour search: the GPU's exact distances (float32) against the CPU's KD-tree
    # (float64); near-ties may swap a rare far neighbour, so the sets agree on almost all
    cpu_knn = knn_indices(cloud, 64, "kdtree")
    gpu_knn = knn_indices(cloud.cuda(), 64, "torch").cpu()
    same = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(cpu_knn, gpu_knn)]
    assert sum(same) / cpu_knn.numel() > 0.999
    # the covariances and eigenvalues on the same neighbours: equal to float precision
    cpu = multiscale_surface_variation(cloud, (16, 32, 64), neighbours=cpu_knn)
    gpu = multiscale_surface_variation(cloud.cuda(), (16, 32, 64), neighbours=cpu_knn.cuda()).cpu()
    assert gpu.shape == cpu.shape
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_amp_training_on_cuda(ad_root, amp):
    """A trained detector under each autocast setting: finite losses, a loss that falls; the
    autocast dtype is the one asked for. The trained model's maps and scores on the GPU (float32,
    TF32 off) equal those of the same model moved to the CPU, to float32 rounding."""
    from bench.datasets import get_dataset
    from bench.loading import EpochLoader
    from bench.training import amp_dtype
    from bench.types import collate_training

    device = torch.device("cuda")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    seed_everything(0)
    train = get_dataset("mvtec_ad").open("weave", "train", str(ad_root), image_size=64)
    loader = EpochLoader(train, 4, shuffle=True, seed=0, collate_fn=collate_training)
    det = create_detector("autoencoder", iterations=40, amp=amp)
    det.to(device)
    det.fit(loader)
    losses = [loss for _, loss in det.train_log_]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert amp_dtype(device, amp) == {"bf16": torch.bfloat16, "fp16": torch.float16,
                                      "off": None}[amp]  # fmt: skip
    test = get_dataset("mvtec_ad").open("weave", "test", str(ad_root), image_size=64)
    batch: Batch = next(iter(EpochLoader(test, 4)))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu = det.predict(batch.to(device))
    cpu = det.to("cpu").predict(batch.to("cpu"))
    assert gpu.anomaly_map.shape == cpu.anomaly_map.shape and len(cpu.anomaly_map) == 4
    # the same float32 network on other kernels: sums in another order, 1e-4 of the map's range
    scale = float(cpu.anomaly_map.abs().max())
    torch.testing.assert_close(gpu.anomaly_map.cpu(), cpu.anomaly_map, rtol=1e-3, atol=1e-4 * scale)
    torch.testing.assert_close(gpu.score.cpu(), cpu.score, rtol=1e-3, atol=1e-4 * scale)


def _grid(ad_root, ad3d_root, visa_root, device: str, output, only=None, knn=None) -> BenchConfig:
    """Every detector (``only``: those named) on the small sets, maps and scores exported;
    ``knn``: extra knn parameters."""
    detectors = [
        DetectorEntry("feature_stats", params={"weights": "random"}, datasets=["mvtec_ad"]),
        DetectorEntry(
            "knn", params={"backbone": "efficientnet_lite0", **(knn or {})}, datasets=["mvtec_ad"]
        ),
        DetectorEntry("autoencoder", params={"iterations": 20}, datasets=["mvtec_ad"]),
        DetectorEntry("dinomaly", params=DINOMALY, datasets=["mvtec_ad"], scope="unified"),
        DetectorEntry(
            "dictas",
            params=DICTAS,
            datasets=["mvtec_ad"],
            train_on={"dataset": "visa", "root": str(visa_root)},
            shots=1,
        ),
        DetectorEntry("curvature", datasets=["mvtec_3d"]),
        DetectorEntry("grid_curvature", datasets=["mvtec_3d"]),
        DetectorEntry("casl", params=CASL, datasets=["mvtec_3d"]),
    ]
    return BenchConfig(
        name=f"cuda-{device}",
        device=device,
        batch_size=4,
        num_workers=0,
        output=str(output),
        export_maps=str(Path(output) / "maps"),
        detectors=[d for d in detectors if only is None or d.name in only],
        datasets=[
            DatasetEntry("mvtec_ad", root=str(ad_root), image_size=64),
            DatasetEntry("mvtec_3d", root=str(ad3d_root), image_size=None),
        ],
    )


def _runs(cfg: BenchConfig) -> dict[str, dict]:
    records, failed = run_benchmark(cfg, track=False)
    assert not failed, failed
    return {r["run_name"]: r for r in records}


def _image_scores(record: dict) -> tuple[list[bool], list[float]]:
    """(defective, score) of every test image, from the scores.csv the job exported."""
    path = Path(record["maps_exported_to"]) / record["category"] / "scores.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["defect"] != "good" for r in rows], [float(r["score"]) for r in rows]


def _clearly_ordered(labels: list[bool], scores: list[float], rtol: float) -> bool:
    """No good and defective score within ``rtol`` of each other: errors of that size cannot
    reorder them, so the image AUROC cannot change."""
    good = [s for d, s in zip(labels, scores) if not d]
    bad = [s for d, s in zip(labels, scores) if d]
    return all(abs(g - b) > rtol * max(abs(g), abs(b)) for g in good for b in bad)


#: how far the float32 GPU image scores of the deterministic detectors may be from the CPU's:
#: float32 convolutions and matrix products on other kernels (sums in another order) for
#: feature_stats and knn; float64 on both devices for grid_curvature; for curvature float32
#: eigenvalues on the GPU (float64 on the CPU) and an exact GPU neighbour search against the
#: CPU's KD-tree, which swap near-tied neighbours (about 0.1% of them, see the curvature test
#: above): a point's surface variation moves by up to a few percent when one of its k
#: neighbours is another at the same distance
SCORE_RTOL = {"feature_stats": 1e-3, "knn": 1e-3, "grid_curvature": 1e-6, "curvature": 5e-2}


def test_every_detector_fits_and_predicts_on_cuda(ad_root, ad3d_root, tmp_path, monkeypatch):
    """Every registered detector, through the runner, on the GPU as a benchmark runs it (predict
    under autocast where the detector allows it) and on the CPU: every job finishes, and each
    recorded image AUROC is the reference AUROC (tests/reference_metrics.py) of the image
    scores the job exported. The detectors without random training (DETERMINISTIC) further: a
    second GPU run repeats every exported score and every metric exactly, and in float32
    (autocast and TF32 off; knn without coreset, whose farthest-point picks could flip at a
    float near-tie) their GPU image scores are the CPU's to SCORE_RTOL, and their image AUROC
    the CPU's exactly wherever no good and defective score are that close."""
    visa = synthetic_visa.generate(tmp_path / "visa", n_train=8, n_test_good=1, n_anomaly=1)
    grid = functools.partial(_grid, ad_root, ad3d_root, visa)
    runs = {device: _runs(grid(device, tmp_path / device)) for device in ("cuda", "cpu")}
    gpu_name = torch.cuda.get_device_name(0)
    assert runs["cuda"].keys() == runs["cpu"].keys()
    assert {r["detector_name"] for r in runs["cuda"].values()} == {
        "feature_stats", "knn", "autoencoder", "dinomaly", "dictas", "curvature",
        "grid_curvature", "casl",
    }  # fmt: skip
    for name, record in runs["cuda"].items():
        assert record["device"] == gpu_name, name
        labels, scores = _image_scores(record)
        assert len(labels) == record["n_test"] and 0 < sum(labels) < len(labels), name
        expected = auroc(labels, scores)
        assert record["metrics"]["all"]["image_auroc"] == pytest.approx(expected, abs=1e-12), name

    again = _runs(grid("cuda", tmp_path / "cuda-again", only=DETERMINISTIC))
    first = {n: r for n, r in runs["cuda"].items() if r["detector_name"] in DETERMINISTIC}
    assert again.keys() == first.keys()
    for name, record in again.items():
        assert record["metrics"] == first[name]["metrics"], name
        assert _image_scores(record) == _image_scores(first[name]), name

    for detector in ("feature_stats", "knn"):
        monkeypatch.setattr(get_detector_class(detector), "inference_amp", False)
    assert torch.get_float32_matmul_precision() == "highest"  # no TF32 matrix products
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # nor convolutions
        fp32 = {
            device: _runs(
                grid(
                    device,
                    tmp_path / f"{device}-fp32",
                    only=DETERMINISTIC,
                    knn={"coreset_ratio": 1.0},
                )
            )
            for device in ("cuda", "cpu")
        }
    assert fp32["cuda"].keys() == fp32["cpu"].keys() == first.keys()
    for name, record in fp32["cuda"].items():
        cpu = fp32["cpu"][name]
        rtol = SCORE_RTOL[record["detector_name"]]
        labels, scores = _image_scores(record)
        cpu_labels, cpu_scores = _image_scores(cpu)
        assert labels == cpu_labels, name
        np.testing.assert_allclose(scores, cpu_scores, rtol=rtol, atol=0, err_msg=name)
        if _clearly_ordered(cpu_labels, cpu_scores, 2 * rtol):
            assert record["metrics"]["all"]["image_auroc"] == cpu["metrics"]["all"]["image_auroc"]
