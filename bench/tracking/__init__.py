"""MLflow mirror of the results: a parent run per ``bench run``, a child run per job.

A parent records the host and pid of its process (tags ``adbench.host``, ``adbench.pid``,
``adbench.pid_started``), so that the next ``bench run`` of the benchmark can mark a parent
left RUNNING by a killed process as KILLED; the results folder's ledger
(``<output>/<name>/tracking.json``) records the parents it opened and how they ended, so that a
run that completed while the store was down is never called KILLED (statuses:
:mod:`bench.tracking.statuses`).

The default store is ``sqlite:///<output>/mlflow.db`` with artifacts under
``<output>/mlartifacts``; ``MLFLOW_TRACKING_URI`` (or ``tracking_uri`` in the config) points at a
server instead. A tracking failure never loses results: they are on disk already, and the user
gets one message; after it the run makes no further MLflow call (:mod:`bench.tracking.link`),
and MLflow's HTTP retries are bounded to seconds (:data:`bench.tracking.uris.HTTP_WAITS`). A
SQLite store that is not a readable database is named with its recovery
(:func:`bench.tracking.uris.check_store`).

- :mod:`bench.tracking.uris`: where the runs go; the fast check that a server is up; bounded
  HTTP waits; the check of a SQLite store.
- :mod:`bench.tracking.link`: the one failure flag and message every path shares.
- :mod:`bench.tracking.ledger`, :mod:`bench.tracking.statuses`: how parent and training runs
  end, and how those left RUNNING get the status of what happened.
- :mod:`bench.tracking.process`: which process and machine a run belongs to; the git state.
- :mod:`bench.tracking.job_data`: what a job's record becomes in MLflow (tags, params, metrics,
  the per-defect table, the curves figure).
- :mod:`bench.tracking.tracker`: :class:`Tracker`, the benchmark's parent run and its job runs.
- :mod:`bench.tracking.fit_run`: :class:`FitRunLogger`, a training's live curve.
- :mod:`bench.tracking.sync`: uploading jobs that have no run yet.
"""

from bench.tracking.fit_run import FitRunLogger, find_fit_run
from bench.tracking.job_data import (
    JOB_FIELDS,
    curves_figure,
    flat_metrics,
    per_defect_table,
    scope_params,
)
from bench.tracking.process import _machine, _start_ticks, git_state, process_gone, process_tags
from bench.tracking.sync import ensure_logged, sync
from bench.tracking.tracker import Tracker
from bench.tracking.uris import check_store, default_tracking_uri, probe, resolve_tracking_uri

__all__ = [
    "JOB_FIELDS",
    "FitRunLogger",
    "Tracker",
    "_machine",
    "_start_ticks",
    "check_store",
    "curves_figure",
    "default_tracking_uri",
    "ensure_logged",
    "find_fit_run",
    "flat_metrics",
    "git_state",
    "per_defect_table",
    "probe",
    "process_gone",
    "process_tags",
    "resolve_tracking_uri",
    "scope_params",
    "sync",
]
