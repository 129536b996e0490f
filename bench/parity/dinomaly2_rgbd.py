"""Dinomaly2's RGB + depth mode against the official code: the depth image and the masked RGB
image of the official preparation (``prepare_data/preprocess_mvtec3d_2.py``, imported as it is
from the checkout, so that it fills the gaps of every scan of a generated MVTec 3D-AD folder at
``../mvtec_3d`` as its last line does) and of its ``MVTec3DDataset``, and ``DinomalyRGBD`` as
``dinomaly_mvtec3d.py`` builds it, against ours (``inputs="rgb+depth"``), float32."""

from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from bench.adapters.dinomaly.depth import rgb_and_depth
from bench.types import Batch

from . import Report
from . import dinomaly_checks as check
from .dinomaly_common import GROUPS, LAYERS, SIZE, Official, official_normalize, shared_detector

SCANS = 2


def scans(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB images (uint8 [n, H, W, 3]) and organised clouds (float32 [n, H, W, 3]): a tilted
    surface half a metre away with bumps and holes (all-zero points), one hole wider than the
    three fill passes; row 0 and column 0 are whole (the official fill never reaches them)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    xyz = np.zeros((n, size, size, 3), np.float32)
    for i in range(n):
        bumps = 0.003 * np.sin(9 * xx + i) * np.cos(7 * yy)
        z = 0.5 + 0.04 * yy + 0.02 * xx + bumps + 1e-4 * g.random((size, size))
        xyz[i] = np.stack([xx - 0.5, yy - 0.5, z], -1)
        holes = g.random((size, size)) < 0.15
        holes[20:32, 40:55] = True
        holes[0, :] = holes[:, 0] = False
        xyz[i][holes] = 0
    return rgb, xyz


def official_inputs(off: Official, rgb: np.ndarray, xyz: np.ndarray, tmp: Path) -> torch.Tensor:
    """The official RGB and depth images ([n, 6, H, W] in [0, 1]: ``ToTensor`` only)."""
    category = tmp / "mvtec_3d" / "part" / "train" / "good"
    for sub in ("rgb", "xyz"):
        (category / sub).mkdir(parents=True)
    (tmp / "mvtec_3d" / "part" / "test").mkdir()  # the preparation walks train and test
    for i, (image, cloud) in enumerate(zip(rgb, xyz)):
        Image.fromarray(image).save(category / "rgb" / f"{i:03d}.png")
        tifffile.imwrite(category / "xyz" / f"{i:03d}.tiff", cloud)
    (tmp / "work").mkdir()
    quiet = io.StringIO()  # its progress lines
    with contextlib.chdir(tmp / "work"), contextlib.redirect_stdout(quiet), \
            contextlib.redirect_stderr(quiet):  # fmt: skip
        importlib.import_module("prepare_data.preprocess_mvtec3d_2")  # preprocess_3D('../mvtec_3d')
    data = off.dataset.MVTec3DDataset(
        root=str(tmp / "mvtec_3d" / "part"), transform=transforms.ToTensor(), gt_transform=None,
        phase="train", cat_3D=True,
    )  # fmt: skip
    items = sorted((data[i] for i in range(len(data))), key=lambda item: item[3])
    return torch.stack([item[0] for item in items])


def compare_rgbd(
    report: Report,
    off: Official,
    encoder: nn.Module,
    parts: tuple[nn.Module, nn.Module],
    bottleneck_names: dict[str, str],
    weights: Path,
    tmp: Path,
) -> None:
    rgb, xyz = scans(SCANS, SIZE, seed=8)
    theirs = official_inputs(off, rgb, xyz, tmp)
    cloud = torch.from_numpy(xyz).permute(0, 3, 1, 2)
    batch = Batch(
        label=torch.zeros(SCANS), xyz=cloud, valid=cloud[:, 2] > 0,
        rgb=torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255,
    )  # fmt: skip
    masked, depth = rgb_and_depth(batch.rgb, cloud[:, 2], batch.valid, passes=3)
    report.add("rgb+depth: depth image (fill, min-max, 1 - 0.8 d, 8 bits, hot)", depth,
               theirs[:, 3:])  # fmt: skip
    report.add("rgb+depth: RGB image, pixels without depth black", masked, theirs[:, :3])
    bottleneck, decoder = parts
    model = off.uad.DinomalyRGBD(
        encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=LAYERS,
        fuse_layer_encoder=GROUPS, fuse_layer_decoder=GROUPS, add_class_token_weight=-1.0,
        norm_encoder_token=True, rgb_ratio=0.5,
    )  # fmt: skip
    det = shared_detector(model, bottleneck_names, torch.float32, weights,
                          variant="dinomaly2", inputs="rgb+depth")  # fmt: skip
    norm = official_normalize(off)
    x = torch.cat([norm(theirs[:, :3]), norm(theirs[:, 3:])], 1)
    tag = "rgb+depth"
    check.compare_forward(report, tag, model, det, batch, x, model.bottleneck[1])
    check.compare_gradients(report, tag, off, model, det, batch, x, step=3)
    check.compare_maps(report, tag, off, model, det, batch, x)
    report.notes.append(
        "rgb+depth: the scans' first row and column have no gap: the official fill never fills "
        "them (its 3 x 3 window's slice starts at -1 there and is empty), ours does"
    )
