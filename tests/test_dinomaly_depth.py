"""Dinomaly2's RGB + depth mode (MVTec 3D-AD): the colourised depth against a loop-by-loop
reading of the official preparation and OpenCV's colour map, the fused encoder layers, the
plan's modality checks, and a unified benchmark run on generated MVTec 3D-AD-layout scans."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.adapters.dinomaly import Dinomaly
from bench.adapters.dinomaly.depth import depth_grey, fill_gaps, hot_colours, rgb_and_depth
from bench.backbones import normalize
from bench.types import Batch

TINY = dict(
    encoder="vit_small_patch14_reg4_dinov2",
    weights="random",
    encoder_depth=2,
    layers=(0, 1),
    decoder_depth=2,
    warmup=2,
    hard_mining_ramp=4,
    map_size=None,
)


def official_fill(z: np.ndarray, passes: int) -> np.ndarray:
    """The official fill, pixel by pixel: each pixel that is 0 at the start of a pass and has a
    non-zero 3 x 3 neighbour takes sum(window) / count(window > 0) of the previous pass
    (windows clipped at the border)."""
    h, w = z.shape
    for _ in range(passes):
        prev = z.copy()
        for y in range(h):
            for x in range(w):
                if prev[y, x] != 0:
                    continue
                win = prev[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                n = (win > 0).sum()
                if n:
                    z[y, x] = win.sum() / n
    return z


def official_grey(z: np.ndarray, passes: int) -> np.ndarray:
    z = official_fill(z.astype(np.float64), passes)
    mask = z > 0
    d = (z - z[mask].min()) / (z.max() - z[mask].min())
    d = 1 - 0.8 * d
    d[~mask] = 0
    return (d * 255).astype(np.uint8)


def _scan(seed: int, h: int = 24, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """A tilted surface 0.5-0.6 m away with holes (invalid pixels), [h, w] z and valid."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    z = 0.5 + 0.004 * yy + 0.002 * xx + 0.001 * torch.rand(h, w, generator=g)
    valid = torch.rand(h, w, generator=g) > 0.3
    valid[:6, :5] = False  # a region wider than three fill passes
    return z * valid, valid


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_depth_grey_levels_follow_the_official_preparation(passes):
    zs, valids = zip(*(_scan(s) for s in range(3)))
    z, valid = torch.stack(zs), torch.stack(valids)
    grey, filled = depth_grey(z, valid, passes)
    for i in range(3):
        expected = official_grey(z[i].numpy(), passes)
        ours = grey[i].numpy().astype(int)
        assert np.array_equal(filled[i].numpy(), official_fill(z[i].numpy().copy(), passes) > 0)
        # float32 here, float64 there: a level may differ where 255 (1 - 0.8 d) is an integer
        assert np.abs(ours - expected).max() <= 1 and (ours == expected).mean() > 0.99
        assert grey[i][~filled[i]].eq(0).all() and grey[i][filled[i]].min() >= 50


def test_fill_grows_one_pixel_per_pass_into_a_hole():
    valid = torch.ones(1, 9, 9, dtype=torch.bool)
    valid[0, 2:7, 2:7] = False  # a 5 x 5 hole: 9, 1, then 0 empty
    z = torch.full((1, 9, 9), 2.0) * valid
    for passes, empty in ((1, 9), (2, 1), (3, 0)):
        filled_z, filled = fill_gaps(z, valid, passes)
        assert int((~filled).sum()) == empty
        assert torch.allclose(filled_z[filled], torch.tensor(2.0))


def test_hot_colours_match_opencv_colormap_hot():
    cv2 = pytest.importorskip("cv2")
    levels = np.arange(256, dtype=np.uint8)
    expected = cv2.applyColorMap(levels[:, None], cv2.COLORMAP_HOT)[:, 0, ::-1].astype(int)
    ours = (hot_colours(torch.from_numpy(levels).float()) * 255).round().int().numpy()
    assert np.abs(ours - expected).max() <= 2
    assert (ours[0] == 0).all() and (ours[255] == 255).all()


def test_rgb_is_blacked_out_where_no_depth_remains():
    z, valid = _scan(0)
    rgb = torch.rand(1, 3, *z.shape)
    masked, depth = rgb_and_depth(rgb, z[None], valid[None], passes=1)
    _, filled = fill_gaps(z[None], valid[None], 1)
    assert masked[:, :, ~filled[0]].eq(0).all()
    assert torch.equal(masked[:, :, filled[0]], rgb[:, :, filled[0]])
    assert depth[:, :, ~filled[0]].eq(0).all() and depth.shape == rgb.shape


def _rgbd_batch(n: int = 2, size: int = 28, seed: int = 0) -> Batch:
    zs, valids = zip(*(_scan(seed + i, size, size) for i in range(n)))
    z, valid = torch.stack(zs), torch.stack(valids)
    xyz = torch.stack([torch.zeros_like(z), torch.zeros_like(z), z], 1)
    rgb = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return Batch(label=torch.zeros(n), image=rgb, rgb=rgb, xyz=xyz, valid=valid)


def test_encoder_layers_are_the_weighted_mean_of_rgb_and_depth():
    torch.manual_seed(0)
    det = Dinomaly(**TINY, variant="dinomaly2", inputs="rgb+depth", rgb_weight=0.3)
    batch = _rgbd_batch()
    det.build(batch)
    det.decoder_.eval()
    target, _ = det._features(batch)
    rgb, depth = rgb_and_depth(batch.rgb, batch.xyz[:, 2], batch.valid, 3)
    a, grid = det.frozen_encoder(normalize(rgb))  # each image on its own
    b, _ = det.frozen_encoder(normalize(depth))
    for t, la, lb in zip(target, a, b):
        fused = 0.3 * la + 0.7 * lb
        expected = F.layer_norm(fused[:, 5:] - fused[:, :1], (384,), eps=1e-8)
        torch.testing.assert_close(t.flatten(2).transpose(1, 2), expected, atol=2e-5, rtol=1e-4)


def test_images_only_batch_is_refused_with_what_is_missing():
    det = Dinomaly(**TINY, inputs="rgb+depth")
    batch = Batch(label=torch.zeros(1), image=torch.rand(1, 3, 28, 28))
    det.build(batch)
    with pytest.raises(ValueError, match="rgb\\+depth.*organised point clouds"):
        det._features(batch)


def test_modalities_follow_the_inputs():
    assert Dinomaly.accepted_modalities() == ("image", "rgb+point_cloud")
    assert Dinomaly.accepted_modalities({"inputs": "rgb"}) == ("image",)
    assert Dinomaly.accepted_modalities({"inputs": "rgb+depth"}) == ("rgb+point_cloud",)


def _run_args(out, *extra: str) -> list[str]:
    return [
        "run", "--detectors", "dinomaly", "--scope", "unified", "--batch-size", "4",
        "--num-workers", "0", "--no-tracking", "--output", str(out),
        "--param", "dinomaly.encoder=efficientnet_lite0", "--param", "dinomaly.iterations=4",
        "--param", "dinomaly.warmup=2", "--param", "dinomaly.decoder_depth=2",
        "--param", "dinomaly.variant=dinomaly2", "--param", "dinomaly.inputs=rgb+depth",
        *extra,
    ]  # fmt: skip


def test_plan_refuses_rgb_depth_on_images(tmp_path, ad_root, capsys):
    from bench.cli import main

    args = _run_args(tmp_path, "--datasets", "mvtec_ad", "--root", str(ad_root))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dinomaly takes rgb+point_cloud; mvtec_ad serves image" in err
    assert not list(tmp_path.glob("**/jobs/*.json"))


def test_unified_rgb_depth_run_on_mvtec_3d_layout(tmp_path, ad3d_root):
    from bench.cli import main

    out = tmp_path / "out"
    args = _run_args(
        out, "--datasets", "mvtec_3d", "--root", str(ad3d_root), "--image-size", "64",
        "--name", "rgbd",
    )  # fmt: skip
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "rgbd" / "jobs").glob("*.json"))]
    assert [r["category"] for r in records] == ["dome", "puck"]
    assert {r["modality"] for r in records} == {"rgb+point_cloud"}
    assert len({r["fit_hash"] for r in records}) == 1
    assert len(list(out.glob("rgbd/state/*/fitted.pt"))) == 1
    for r in records:
        assert r["params"]["inputs"] == "rgb+depth" and r["params"]["narrow_lr"] is None
        assert "encoder substitute" in r["substitutes"][0]
        assert "vit_base_patch14_reg4_dinov2" in r["substitutes"][0]
        assert 0 <= r["metrics"]["all"]["pixel_auroc"] <= 1
