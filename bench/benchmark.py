"""Runs a benchmark: its planned jobs, on the executor the config names."""

from __future__ import annotations

from bench.config import BenchConfig, validate
from bench.executors import get_executor


def run_benchmark(
    cfg: BenchConfig, force: bool = False, track: bool = True
) -> tuple[list[dict], list[str]]:
    """Runs every planned job not already finished (``force``: every job, fitted anew) on the
    executor ``cfg.executor`` names; returns (records, failed run names). ``track``: log the
    jobs to MLflow. A config built in code is checked like a file's first (a ConfigError names
    its first bad field)."""
    validate(cfg, "BenchConfig")
    return get_executor(cfg.executor)(cfg, force=force, track=track)
