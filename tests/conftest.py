"""Shared fixtures: small generated datasets in both MVTec layouts, the real bottle category."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.datasets import synthetic_3d, synthetic_ad

REPO = Path(__file__).resolve().parents[1]
BOTTLE = (
    Path(os.environ.get("MVTEC_AD_ROOT", REPO.parent / "shared" / "data" / "mvtec_ad")) / "bottle"
)


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
