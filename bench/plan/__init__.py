"""The plan of a benchmark: its config expanded into fits and jobs.

- :mod:`bench.plan.jobs`: :class:`Fit` and :class:`Job`, their identities and training files.
- :mod:`bench.plan.planner`: :func:`plan_jobs`, from a config to its jobs.
"""

from bench.plan.jobs import Fit, Job, Part, open_split, select
from bench.plan.planner import plan_jobs

__all__ = ["Fit", "Job", "Part", "open_split", "plan_jobs", "select"]
