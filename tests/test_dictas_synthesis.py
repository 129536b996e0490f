"""DictAS's training data: Perlin noise, rotation conventions, synthetic anomalies on the queries
(blend, labels, rate, texture sources) and the reference augmentation, all seeded."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.adapters.dictas.synthesis import (
    TextureFolder,
    augment_references,
    perlin_noise,
    rotate,
    synthesize_anomalies,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny ops: on a shared 2-core machine intra-op threads only add (large) overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n, 3, size, size] in [0, 1]."""
    coarse = torch.rand(n, 3, 8, 8, generator=_gen(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# -- Perlin noise ---------------------------------------------------------------------------------
def test_perlin_noise_bounded_smooth_and_odd_sizes():
    for res in [(2, 2), (2, 4), (4, 2), (4, 4)]:
        noise = perlin_noise((50, 70), res, _gen(1))
        assert noise.shape == (50, 70)
        # |n| <= sqrt(2) * sqrt(1/2) = 1 for unit gradients (DRAEM's sqrt(2) scaling)
        assert noise.abs().max() <= 1 + 1e-5
        assert noise.std() > 0.05
        white = torch.rand(50, 70, generator=_gen(2)) * 2 - 1
        step = (noise.diff(dim=0).abs().mean() + noise.diff(dim=1).abs().mean()) / 2
        white_step = (white.diff(dim=0).abs().mean() + white.diff(dim=1).abs().mean()) / 2
        assert step < white_step / 10


def test_perlin_noise_reproducible_per_seed():
    a, b = perlin_noise((33, 40), (4, 2), _gen(5)), perlin_noise((33, 40), (4, 2), _gen(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, perlin_noise((33, 40), (4, 2), _gen(6)))


def test_perlin_noise_padded_size_is_a_crop_of_the_multiple():
    """An odd size is the top-left crop of the noise computed on the next multiple of res."""
    full = perlin_noise((52, 72), (4, 4), _gen(3))
    assert torch.allclose(perlin_noise((50, 70), (4, 4), _gen(3)), full[:50, :70], atol=1e-6)


# -- rotation -------------------------------------------------------------------------------------
def test_rotate_conventions():
    x = _images(2, 32)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-5)
    assert torch.allclose(rotate(x, 360.0), x, atol=1e-4)
    # counter-clockwise, like OpenCV / albumentations and torch.rot90(k=1, dims=(-2, -1))
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate(x, -90.0), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-4)
    wide = torch.rand(1, 3, 20, 30, generator=_gen(4))
    assert torch.allclose(rotate(wide, 180.0), wide.flip(-2, -1), atol=1e-4)


def test_rotate_per_image_angles_and_borders():
    x = _images(3, 32)
    angles = torch.tensor([0.0, 90.0, 45.0])
    out = rotate(x, angles)
    for i, angle in enumerate(angles.tolist()):
        assert torch.allclose(out[i], rotate(x[i : i + 1], angle)[0], atol=1e-6)
    constant = torch.full((1, 1, 16, 16), 0.7)
    assert torch.allclose(rotate(constant, 45.0), constant, atol=1e-5)  # reflection: no holes
    zeros = rotate(constant, 45.0, padding="zeros")
    assert zeros[0, 0, 0, 0] == 0 and zeros[0, 0, 8, 8] == pytest.approx(0.7)


# -- synthetic anomalies ---------------------------------------------------------------------------
def test_synthesize_p1_labels_masks_and_blend():
    x = _images(12)
    before = x.clone()
    out, masks, labels = synthesize_anomalies(x, _gen(7), p=1.0)
    assert torch.equal(x, before)  # not modified in place
    assert out.shape == x.shape and masks.shape == (12, 1, 64, 64) and labels.dtype == torch.long
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(labels, (masks.flatten(1).sum(1) > 0).long())
    assert labels.sum() >= 8
    assert out.min() >= 0 and out.max() <= 1
    outside = masks.expand_as(x) == 0
    assert torch.equal(out[outside], x[outside])
    changed = [
        (out[i] - x[i]).abs().amax(0)[masks[i, 0] > 0].mean() > 1e-3 for i in range(12) if labels[i]
    ]
    assert sum(changed) >= 0.8 * len(changed)


def test_synthesize_p0_is_identity():
    x = _images(6)
    out, masks, labels = synthesize_anomalies(x, _gen(0), p=0.0)
    assert torch.equal(out, x) and not masks.any() and not labels.any()


def test_synthesize_anomaly_rate():
    """Labelled fraction ~= p * P(non-empty mask), P estimated with p = 1."""
    x = _images(400, 16)
    rate_nonempty = synthesize_anomalies(x, _gen(1), p=1.0)[2].float().mean()
    assert rate_nonempty > 0.3
    labels = synthesize_anomalies(x, _gen(2), p=0.3)[2].float()
    assert abs(labels.mean() - 0.3 * rate_nonempty) < 0.07


def test_synthesize_single_image_and_blend_weight():
    """B == 1 uses the image itself flipped; max_beta = 0 puts the pure texture in the mask."""
    x = _images(1)
    for seed in range(6):
        out, masks, labels = synthesize_anomalies(x, _gen(seed), p=1.0, max_beta=0.0)
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(labels, (masks.flatten(1).sum(1) > 0).long())


def _texture_folder(root, colour: tuple[int, int, int]):
    for cls in ("banded", "dotted", "woven"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (24, 20), colour).save(root / cls / "x.jpg")
    return TextureFolder(root)


def test_texture_folder_is_used(tmp_path):
    textures = _texture_folder(tmp_path / "dtd", (255, 0, 0))
    assert len(textures) == 3 and textures.files == sorted(textures.files)
    tex = textures.load(0, (40, 30))
    assert tex.shape == (3, 40, 30) and tex.min() >= 0 and tex.max() <= 1
    assert tex[0].mean() > 0.9 and tex[1:].mean() < 0.1
    gray = torch.full((16, 3, 64, 64), 0.5)
    out, masks, labels = synthesize_anomalies(gray, _gen(3), p=1.0, textures=textures)
    inside = masks[:, 0] > 0
    assert labels.sum() >= 10
    red_minus_green = (out[:, 0] - out[:, 1])[inside]
    assert red_minus_green.mean() > 0.15  # gray images have R == G: the red textures show


def test_synthesize_blend_reconstructed(tmp_path):
    """With folder textures the random draws do not depend on the images: two inputs differing by
    a constant 0.4 give out2 - out1 = 0.4 beta inside the mask, one beta in [0, 0.8) per image,
    and the recovered texture (out - beta x) / (1 - beta) lies in [0, 1]."""
    noise = (torch.rand(20, 24, 3, generator=_gen(8)) * 255).to(torch.uint8).numpy()
    (tmp_path / "tex" / "noisy").mkdir(parents=True)
    Image.fromarray(noise).save(tmp_path / "tex" / "noisy" / "a.png")
    textures = TextureFolder(tmp_path / "tex")
    x1 = 0.2 + 0.3 * _images(8)
    x2 = x1 + 0.4
    out1, masks, labels = synthesize_anomalies(x1, _gen(9), p=1.0, textures=textures)
    out2, masks2, _ = synthesize_anomalies(x2, _gen(9), p=1.0, textures=textures)
    assert torch.equal(masks, masks2) and labels.sum() >= 5
    for i in labels.nonzero().flatten().tolist():
        inside = masks[i, 0] > 0
        beta = (out2[i] - out1[i])[:, inside] / 0.4
        assert beta.std() < 1e-4 and 0 <= beta.mean() < 0.8
        b = float(beta.mean())
        texture = (out1[i] - b * x1[i])[:, inside] / (1 - b)
        assert texture.min() > -1e-4 and texture.max() < 1 + 1e-4


def test_texture_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        TextureFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        TextureFolder(tmp_path / "missing")


# -- reference augmentation ------------------------------------------------------------------------
def test_augment_references_p0_identity_p1_changes():
    x = _images(8)
    before = x.clone()
    assert torch.equal(augment_references(x, _gen(0), p=0.0), x)
    out = augment_references(x, _gen(0), p=1.0)
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 + 1e-6
    assert all(not torch.allclose(out[i], x[i], atol=1e-3) for i in range(8))
    wide = torch.rand(2, 3, 20, 36, generator=_gen(1))
    assert augment_references(wide, _gen(1), p=1.0).shape == wide.shape


def test_augment_references_drops_out_pixels():
    """A constant image stays constant under rotation and flips: only dropout makes zeros."""
    x = torch.full((32, 3, 64, 64), 0.6)
    out = augment_references(x, _gen(2), p=1.0)
    dropped = (out == 0).all(1).flatten(1).float().mean(1)
    assert ((dropped == 0) | (dropped > 0.005)).all()
    assert 0.5 < (dropped > 0).float().mean() < 0.95  # 1 - 0.5 * 0.5 = 0.75 expected
    kept = out.permute(1, 0, 2, 3)[:, (out != 0).all(1)]
    assert torch.allclose(kept, torch.tensor(0.6), atol=1e-5)


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_output_regardless_of_global_rng():
    x = _images(6)
    torch.manual_seed(0)
    first = synthesize_anomalies(x, _gen(11), p=0.5), augment_references(x, _gen(11))
    torch.manual_seed(123)
    torch.rand(100)
    second = synthesize_anomalies(x, _gen(11), p=0.5), augment_references(x, _gen(11))
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    assert torch.equal(first[1], second[1])
    other = synthesize_anomalies(x, _gen(12), p=1.0)[0], augment_references(x, _gen(12))
    assert not torch.equal(other[0], synthesize_anomalies(x, _gen(11), p=1.0)[0])
    assert not torch.equal(other[1], first[1])
