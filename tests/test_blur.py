"""The shared Gaussian blur equals scipy's ``gaussian_filter`` (the official PatchCore, PaDiM and
DictAS smoothing), borders included."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from bench.adapters.common import gaussian_blur


@pytest.mark.parametrize(
    "shape, sigma",
    [
        ((2, 336, 336), 6.0),  # DictAS's default at its input size
        ((2, 224, 224), 4.0),  # PatchCore's
        ((1, 64, 80), 2.0),  # DictAS's best-classification mode, not square
        ((3, 9, 5), 6.0),  # radius (24) far beyond the map: the reflection continues
        ((1, 33, 17), 1.3),  # a non-integer sigma: radius int(4 sigma + 0.5)
    ],
)
def test_gaussian_blur_equals_scipy(shape, sigma):
    maps = np.random.default_rng(int(sigma * 10)).random(shape).astype(np.float32)
    # a border-touching bright region, where a padding rule shows most
    maps[:, : shape[1] // 3, : shape[2] // 4] = 1.0
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    official = np.stack([gaussian_filter(m, sigma) for m in maps])  # float32, as the official
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)


def test_gaussian_blur_edge_pixel_is_repeated():
    """A step at the border: torch's whole-sample ``reflect`` would mirror around the edge
    pixel and differ here by far more than 1e-6."""
    maps = torch.zeros(1, 40, 40)
    maps[:, :, 0] = 1.0
    ours = gaussian_blur(maps, 6.0)
    official = gaussian_filter(maps[0].double().numpy(), 6.0)
    assert abs(float(ours[0, 20, 0]) - official[20, 0]) < 1e-6
    assert gaussian_blur(maps, 0.0) is maps
