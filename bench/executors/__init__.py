"""Where a benchmark's jobs run. An executor only schedules: every job runs through
:func:`bench.job.run.run_job`, whichever executor runs it.

- ``local`` (bench.executors.local): this process, one job after the other.
- ``ray`` (bench.executors.ray_executor): each job a Ray task, on this machine or a cluster.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bench.progress import console

#: executor name -> "module:function"; the function runs a config's jobs:
#: ``run(cfg, force, track) -> (records, failed run names)``
EXECUTORS = {
    "local": "bench.executors.local:run_local",
    "ray": "bench.executors.ray_executor:run_on_ray",
}


def get_executor(name: str) -> Callable[..., tuple[list[dict[str, Any]], list[str]]]:
    """The run function of executor ``name`` (imported on demand: Ray only when used)."""
    module, _, function = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def still_to_track(track: bool, done: dict[str, dict[str, Any] | None]) -> bool:
    """Whether a run opens MLflow: not when every job finished before and has its MLflow run
    (e.g. the second of two runs started at once, which waited for the first): no empty
    parent run."""
    if track and done and all(r is not None and r.get("mlflow_run_id") for r in done.values()):
        console.print("every job finished before and has its MLflow run: no new MLflow run")
        return False
    return track
