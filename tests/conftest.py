"""Shared fixtures: small generated datasets in both MVTec layouts, the real bottle category."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.datasets import synthetic_3d, synthetic_ad

REPO = Path(__file__).resolve().parents[1]
# the tests' shared reference implementations (tests/reference_metrics.py) import as
# `from reference_metrics import ...`: pytest's importlib mode puts no test folder on sys.path
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
BOTTLE = (
    Path(os.environ.get("MVTEC_AD_ROOT", REPO.parent / "shared" / "data" / "mvtec_ad")) / "bottle"
)


@pytest.fixture(scope="session", autouse=True)
def _share_the_cores():
    """Under ``make test``'s worker processes (pytest-xdist), each worker's torch gets its share
    of the cores: intra-op threads of two workers on the same cores only add contention. The
    processes a test starts get the same count (``OMP_NUM_THREADS``), so that a run in the test's
    process and one in a subprocess sum floats alike (exact-resume tests compare them bit for
    bit)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in data and progress bars never touch the user's home during tests."""
    os.environ["ADBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["ADBENCH_PROGRESS"] = "0"


@pytest.fixture(scope="session")
def ad_root(tmp_path_factory) -> Path:
    """A small MVTec AD-layout dataset: 2 categories, 12 train, 4 good + 3 per defect test."""
    return synthetic_ad.generate(
        tmp_path_factory.mktemp("ad"), size=128, n_train=12, n_test_good=4, n_per_defect=3
    )


@pytest.fixture(scope="session")
def ad3d_root(tmp_path_factory) -> Path:
    return synthetic_3d.generate(
        tmp_path_factory.mktemp("ad3d"), n_train=8, n_validation=2, n_test_good=4, n_per_defect=3
    )


@pytest.fixture(scope="session")
def bottle() -> Path:
    """The real MVTec AD bottle category (../shared/data/mvtec_ad/bottle, or $MVTEC_AD_ROOT).
    Missing data fails the tests that need it; ADBENCH_ALLOW_NO_SHARED=1 skips them instead."""
    if not (BOTTLE / "train" / "good").is_dir():
        message = (
            f"real MVTec AD bottle category not found: expected {BOTTLE / 'train' / 'good'} "
            "(set MVTEC_AD_ROOT to the folder holding bottle/, or ADBENCH_ALLOW_NO_SHARED=1 "
            "to skip the tests on real data)"
        )
        if os.environ.get("ADBENCH_ALLOW_NO_SHARED") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return BOTTLE


@pytest.fixture(scope="session")
def plugin_installer():
    """:func:`install_plugin`, for tests that build a plugin distribution."""
    return install_plugin


def install_plugin(
    tmp: Path, module: str, source: str, entry_points: dict[str, dict[str, str]]
) -> Path:
    """Builds ``source`` as the one-module distribution ``adbench-<module>`` with
    ``entry_points`` ({group: {name: target}}) and installs it with pip into a folder of its
    own; returns that folder (for PYTHONPATH)."""
    src, site = tmp / "src", tmp / "site"
    src.mkdir()
    (src / f"{module}.py").write_text(source)
    groups = "".join(
        f'\n[project.entry-points."{group}"]\n'
        + "".join(f'{name} = "{target}"\n' for name, target in points.items())
        for group, points in entry_points.items()
    )
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "adbench-{module.replace("_", "-")}"
            version = "0.1"
            """
        )
        + groups
        + f'\n[tool.setuptools]\npy-modules = ["{module}"]\n'
    )
    pip = Path(sys.executable).parent / "pip"
    subprocess.run(
        [str(pip), "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(src)],
        check=True,
    )
    return site
