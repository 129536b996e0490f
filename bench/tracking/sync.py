"""Uploading finished jobs that have no MLflow run yet (tracking was down, or another server
was used)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.results import ResultStore

if TYPE_CHECKING:
    from bench.tracking.tracker import Tracker


def ensure_logged(tracker: Tracker | None, store: ResultStore, record: dict[str, Any]) -> None:
    """Logs a finished job that has no MLflow run yet (tracking was down when it finished, or
    the task that ran it could not log it) and saves its record with the new run's id."""
    if tracker is None or record.get("mlflow_run_id"):
        return
    run_id = tracker.log_job(record)
    if run_id:
        record["mlflow_run_id"] = run_id
        store.save(record)


def sync(
    store: ResultStore, tracker: Tracker, records: list[dict] | None = None
) -> tuple[int, int]:
    """Uploads every finished job of ``store`` (or of ``records``) that has no run on
    ``tracker``'s server yet (tracking was down, or another server was used); returns
    (uploaded, already there).

    A job goes under the parent run it finished in when this server still holds that run
    (:meth:`Tracker.ledger_parent`: a run whose server went down keeps its jobs); the others
    under the benchmark's own parent run when this server still holds it (the latest of the
    parents of the jobs it already has and of those the results folder's ledger records),
    else under one new parent run for this sync, opened with the first upload (a sync with
    nothing to upload creates no run). The leaderboard of every job is logged on that parent."""
    records = store.records() if records is None else records
    missing, parents = [], set()
    for record in records:
        run = tracker.job_run(record)
        if run is None:
            missing.append(record)
        else:
            parents.add(run.data.tags.get("mlflow.parentRunId"))
    if tracker.failed:  # the server stopped answering: nothing more is asked of it
        return 0, len(records) - len(missing)
    if not all(tracker.ledger_parent(record) for record in missing):
        tracker.adopt_parent(parents - {None})
    uploaded = 0
    for record in missing:
        new_id = tracker.log_job(record)
        if new_id is None:
            break
        record["mlflow_run_id"] = new_id
        store.save(record)
        uploaded += 1
    if tracker.parent_id is None and tracker.filed_under:  # each job went under its own run
        tracker.parent_id = tracker.filed_under[-1]
    if uploaded:
        tracker.log_summary(records)
    return uploaded, len(records) - len(missing)
