"""The core's layers only point down: the import-linter contract in pyproject.toml holds, names
every module of ``bench``, and fails on an upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``bench`` package found first under ``root``."""
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )


def test_every_module_of_bench_is_in_a_layer():
    named = layers()
    graph = grimp.build_graph("bench")
    loose = [
        m
        for m in graph.modules
        if m not in ("bench", "bench.configs")
        and not any(m == n or m.startswith(n + ".") for n in named)
    ]
    assert loose == [], f"add these modules to a layer in pyproject.toml: {loose}"


def test_the_layer_contract_holds_and_fails_on_an_upward_import(tmp_path):
    kept = lint(ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout

    shutil.copytree(
        ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "bench" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport bench.job.run  # upward\n")
    broken = lint(tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "bench.errors is not allowed to import bench.job:" in broken.stdout
    assert "bench.errors -> bench.job.run" in broken.stdout


def test_every_executor_a_config_may_name_is_registered():
    from bench.config import EXECUTORS as NAMES
    from bench.executors import EXECUTORS, get_executor

    assert set(NAMES) == set(EXECUTORS)
    assert all(callable(get_executor(name)) for name in NAMES)
