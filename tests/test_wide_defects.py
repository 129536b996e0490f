"""Opt-in wide, smooth defects of the 3D generators: the default data is byte-identical to the
committed generators', the wide masks are the visibly moved region, and the wide kinds barely
raise the local surface variation that a compact bulge raises a lot."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from bench.datasets import MVTec3D, real3d, synthetic_3d, synthetic_real3d
from bench.pointcloud import multiscale_surface_variation

REPO = Path(__file__).resolve().parents[1]
SMALL_3D = dict(categories=("dome",), n_train=1, n_validation=1, n_test_good=1, n_per_defect=1)
SMALL_REAL3D = dict(n_train=1, n_test_good=1, n_per_defect=2, n_points=500)


def _committed(module: str, tmp_path: Path):
    """``datasets/<module>.py`` as committed at HEAD, imported inside ``bench.datasets`` (so its
    relative imports resolve) under a private name."""
    source = subprocess.run(
        ["git", "show", f"HEAD:datasets/{module}.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if source.returncode:
        pytest.skip(f"no committed datasets/{module}.py: {source.stderr.strip()}")
    path = tmp_path / f"{module}_head.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"bench.datasets._head_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    ("module", "kwargs"), [(synthetic_3d, SMALL_3D), (synthetic_real3d, SMALL_REAL3D)]
)
def test_default_output_is_byte_identical_to_the_committed_generator(tmp_path, module, kwargs):
    name = module.__name__.rsplit(".", 1)[-1]
    head = _committed(name, tmp_path)
    reference = _files(head.generate(tmp_path / "head", seed=3, **kwargs))
    assert reference
    assert _files(module.generate(tmp_path / "default", seed=3, **kwargs)) == reference
    explicit = module.generate(tmp_path / "explicit", seed=3, defects=module.DEFECTS, **kwargs)
    assert _files(explicit) == reference
    assert module.DEFECTS == head.DEFECTS


@pytest.mark.parametrize("module", [synthetic_3d, synthetic_real3d])
def test_unknown_defect_kind_is_refused_with_the_allowed_ones(tmp_path, module):
    with pytest.raises(ValueError, match=r"'wobble'.*wide_") as err:
        module.generate(tmp_path, defects=("wobble",))
    assert all(k in str(err.value) for k in module.DEFECTS + module.WIDE_DEFECTS)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def _real3d_wide(seed: int, kind: str, n: int):
    rng = np.random.default_rng(seed)
    points, q = synthetic_real3d._ellipsoid(rng, n)
    moved, mask = synthetic_real3d._defect(rng, points, kind, q)
    return points, moved, mask, q


@pytest.mark.parametrize("kind", synthetic_real3d.WIDE_DEFECTS)
def test_real3d_wide_defect_mask_is_the_visibly_moved_region(kind):
    for seed in range(3):
        points, moved, mask, q = _real3d_wide(seed, kind, 4000)
        step = moved.astype(np.float64) - points
        disp = np.linalg.norm(step, axis=1)
        amp = disp.max()  # the centre is a cloud point: it moves by the full amplitude
        assert 0.002 <= amp <= 0.004 + 1e-6
        assert np.array_equal(mask, disp > synthetic_real3d.MASK_FRACTION * amp)
        # along the ellipsoid's true outward normal, outwards for the bulge, inwards for the sink
        normal = synthetic_real3d._normals(points, q)
        along = (step * normal).sum(1)
        sign = 1 if kind == "wide_bulge" else -1
        moving = disp > 1e-6
        assert (sign * along[moving] > 0).all()
        assert np.allclose(np.abs(along[moving]), disp[moving], atol=1e-6)
        centre = points[disp.argmax()]
        radius = np.linalg.norm(points[mask] - centre, axis=1).max()
        assert radius > 0.01  # wider than the largest compact defect (6-10 mm)
        assert radius < 0.025


def test_real3d_normals_are_the_ellipsoid_gradient():
    rng = np.random.default_rng(0)
    points, q = synthetic_real3d._ellipsoid(rng, 200)
    local = points @ q
    assert np.allclose((local**2 / synthetic_real3d.AXES**2).sum(1), 1)
    n = synthetic_real3d._normals(points, q)
    # the normal is perpendicular to the surface: a small step along a tangent stays on it
    tangent = np.cross(n, rng.normal(size=n.shape))
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    moved = (points + 1e-5 * tangent) @ q
    assert np.abs((moved**2 / synthetic_real3d.AXES**2).sum(1) - 1).max() < 1e-6
    assert ((n * points).sum(1) > 0).all()  # outward


def test_real3d_wide_files_keep_their_own_defect_type(tmp_path):
    root = synthetic_real3d.generate(
        tmp_path, defects=synthetic_real3d.WIDE_DEFECTS + ("bulge",), **SMALL_REAL3D
    )
    stems = sorted(p.stem for p in (root / "ellipsoid" / "test").glob("*.pcd"))
    assert stems == ["0_good", "1_widebulge", "2_widebulge_cut", "3_widesink", "4_widesink_cut"] + [
        "5_bulge",
        "6_bulge_cut",
    ]
    assert {real3d.defect_of(s) for s in stems} == {"good", "widebulge", "widesink", "bulge"}
    points, labels = real3d.read_labelled_points(root / "ellipsoid" / "gt" / "1_widebulge.txt")
    assert len(points) == 500 and 0 < labels.sum() < len(points)


@pytest.mark.parametrize("kind", synthetic_3d.WIDE_DEFECTS)
def test_3d_wide_defect_mask_is_the_visibly_moved_region(kind):
    shape = (192, 192)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    pitch = synthetic_3d.FIELD / shape[1]
    rng = np.random.default_rng(7)
    for category in ("dome", "puck"):
        for _ in range(2):
            _, support = synthetic_3d._height(category, rng, rows, cols, pitch)
            disp, mask = synthetic_3d._defect(rng, shape, support, kind, pitch)
            amp = np.abs(disp).max()
            assert 0.8e-3 <= amp <= 1.6e-3
            assert ((1 if kind == "wide_bump" else -1) * disp[mask] > 0).all()
            assert np.array_equal(mask, np.abs(disp) > synthetic_3d.MASK_FRACTION * amp)
            assert not (disp[~support]).any() and not mask[~support].any()
            centre = np.unravel_index(np.abs(disp).argmax(), shape)
            radius = np.hypot(rows[mask] - centre[0], cols[mask] - centre[1]).max()
            assert 10 < radius < 28  # wider than the largest dent/bump (5-10 px)
            # the whole displacement lies on the part: no step at the silhouette
            assert not disp[support & ~ndimage.binary_erosion(support)].any()


def test_3d_wide_defects_load_and_scale_with_the_grid(tmp_path):
    root = synthetic_3d.generate(
        tmp_path, grid=(96, 104), defects=synthetic_3d.WIDE_DEFECTS, **SMALL_3D
    )
    test = MVTec3D(root, "dome", "test", image_size=32)
    assert test.defect_types == ["good", "wide_bump", "wide_dent"]
    # the mask is a disc of radius sqrt(1 - sqrt(0.05)) = 0.881 of the 18-28 px radius, x scale
    scale = 104 / synthetic_3d.CATEGORIES["dome"][1]
    low, high = (np.pi * (0.881 * r * scale) ** 2 for r in (18, 28))
    for item in test:
        area = int(item["mask"].sum())
        assert item["mask"].shape == (96, 104)
        assert (0.9 * low < area < 1.1 * high) if item["label"] else area == 0


def _variation_ratio(points: np.ndarray, mask: np.ndarray) -> float:
    sv = multiscale_surface_variation(torch.from_numpy(points.astype(np.float64)), (16, 32, 64))
    sv = sv.mean(0).numpy()
    return float(sv[mask].mean() / sv[~mask].mean())


def test_wide_bulge_barely_raises_the_local_surface_variation():
    """Mean surface variation (k = 16, 32, 64) inside the mask over outside it: several times
    the rest of the part for a compact bulge, close to it for a wide one (same clouds)."""
    for seed in (1, 3):
        compact = _variation_ratio(*_real3d_wide(seed, "bulge", 8000)[1:3])
        wide = _variation_ratio(*_real3d_wide(seed, "wide_bulge", 8000)[1:3])
        assert compact > 3 and wide < 2.5 and wide < compact / 2
