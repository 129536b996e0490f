"""Anomaly-type discovery: main-element binarisation, Hungarian F1, clustering end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bench.discovery import (
    cluster_f1,
    discover_types,
    estimate_types,
    main_element_masks,
    main_element_threshold,
)


def _blob_map(rng: np.random.Generator, centres, size: int = 96) -> np.ndarray:
    """Background noise around 20, smooth bumps peaking near 220 at ``centres``."""
    yy, xx = np.mgrid[0:size, 0:size]
    m = 20 + 5 * rng.random((size, size))
    for cy, cx in centres:
        m += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    return np.clip(m, 0, 255)


def test_main_element_threshold_ends_the_longest_stable_count():
    rng = np.random.default_rng(0)
    map255 = _blob_map(rng, [(25, 25), (70, 60)])
    t = main_element_threshold(map255)
    structure = np.ones((6, 6), dtype=bool)
    from scipy import ndimage

    def count(th):
        return ndimage.label(ndimage.binary_erosion(map255 > th, structure), np.ones((3, 3)))[1]

    # independently: the runs of equal non-zero counts over thresholds 255, 251, ...; the
    # answer is the lowest threshold of the longest run
    sweep = list(range(255, 0, -4))
    runs = [list(g) for _, g in itertools.groupby(sweep, key=count)]
    longest = max((r for r in runs if count(r[0]) and len(r) >= 4), key=len)
    assert t == longest[-1] and count(t) == 2 and count(t - 4) != 2
    assert 20 < t <= 27  # measured 23, within the noise (20..25) that erosion still removes
    assert main_element_threshold(np.zeros((40, 40))) is None  # nothing anomalous


def test_main_element_masks_use_the_range_of_image_maxima():
    """The weakest map sets the bottom of the range (its own mask is empty, as in MEBin)."""
    rng = np.random.default_rng(1)
    maps = torch.tensor(
        np.stack(
            [
                _blob_map(rng, [(40, 40)]),
                _blob_map(rng, [(20, 70), (70, 20)]),
                _blob_map(rng, [(50, 50)]) * 0.3,
            ]
        )
    )
    masks = main_element_masks(maps * 0.01 + 3.0)  # any increasing affine map: same masks
    assert torch.equal(masks, main_element_masks(maps))
    assert masks[0, 40, 40] and masks[1, 20, 70] and masks[1, 70, 20]
    assert not masks[0, 5, 90] and not masks[1, 45, 45] and not masks[2].any()


def _f1_of_best_matchings(true: np.ndarray, pred: np.ndarray) -> set[float]:
    """Macro F1 of every one-to-one type->cluster matching with the largest total overlap."""
    types, clusters = np.unique(true), np.unique(pred)
    slots = list(clusters) + [None] * len(types)
    scored = []
    for perm in itertools.permutations(slots, len(types)):
        tps = [
            0 if c is None else int(np.sum((true == t) & (pred == c))) for t, c in zip(types, perm)
        ]
        f1s = [
            0.0 if tp == 0 else 2 * tp / (np.sum(true == t) + np.sum(pred == c))
            for tp, t, c in zip(tps, types, perm)
        ]
        scored.append((sum(tps), round(float(np.mean(f1s)), 12)))
    best = max(total for total, _ in scored)
    return {f1 for total, f1 in scored if total == best}


@pytest.mark.parametrize("seed", range(6))
def test_cluster_f1_uses_the_largest_overlap_matching(seed):
    rng = np.random.default_rng(seed)
    true, pred = rng.integers(0, 3, 40), rng.integers(0, 2 + seed % 3, 40)
    assert round(cluster_f1(true, pred), 12) in _f1_of_best_matchings(true, pred)
    assert cluster_f1(true, true) == 1.0 and cluster_f1(true, (true + 1) % 3) == 1.0


def test_discovery_separates_two_kinds_of_defect():
    """Red spots vs blue spots on grey images; regions described by their mean colour."""
    rng = np.random.default_rng(2)
    noise = torch.Generator().manual_seed(2)
    images, maps, defects = [], [], []
    for i in range(12):
        kind = ["red", "blue"][i % 2]
        img = torch.full((3, 64, 64), 0.5)
        cy, cx = rng.integers(10, 54, 2)
        colour = torch.tensor([0.9, 0.1, 0.1] if kind == "red" else [0.1, 0.1, 0.9])
        img[:, cy - 4 : cy + 4, cx - 4 : cx + 4] = colour[:, None, None]
        amap = torch.zeros(64, 64)
        amap[cy - 4 : cy + 4, cx - 4 : cx + 4] = 1.0 + rng.random()
        (
            images.append(img),
            maps.append(amap + 0.01 * torch.rand(64, 64, generator=noise)),
            defects.append(kind),
        )

    def mean_colour(imgs, masks):
        w = masks[:, None].float() + 1e-6  # an empty region: the image average
        return (imgs * w).sum((2, 3)) / w.sum((2, 3))

    result = discover_types(torch.stack(images), torch.stack(maps), defects, mean_colour)
    assert result["n_types"] == 2 and result["n_images"] == 12
    assert result["nmi"] == pytest.approx(1.0) and result["ari"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(1.0)


def test_number_of_types_estimated_by_silhouette():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 8)) * 10
    points = np.concatenate([c + rng.normal(size=(15, 8)) for c in centres])
    assert estimate_types(points, seed=0) == 3
