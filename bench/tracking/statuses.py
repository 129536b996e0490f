"""What the status of a benchmark's runs says, and how runs left RUNNING get the status they
really ended with.

A parent run (one per ``bench run``, or per ``bench sync`` that opens one) ends:

- FINISHED: every job of the run finished;
- FAILED: some jobs failed (the tag ``adbench.status_note`` names them), or the run stopped
  on an error;
- KILLED: the run was interrupted (Ctrl-C), or its process died without closing it (SIGKILL,
  a lost machine): the next ``bench run`` or ``bench sync`` on that host finds the process
  gone and says so in the note.

When the store stopped answering during the run, the run could not be closed: the results
folder's ledger (:mod:`bench.tracking.ledger`) keeps the status it ended with, and the next
``bench run`` or ``bench sync`` that reaches the store sets it, never KILLED for a run that
completed. A training-curve run (``adbench.kind = fit``) still RUNNING under a parent being
closed is FINISHED when its fitted state is on disk (its curve may stop early), else FAILED,
or KILLED with a killed parent. Each such status carries the note (tag ``adbench.status_note``
and the run's description)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from bench.progress import console
from bench.tracking import ledger
from bench.tracking.process import process_gone

NOTE_TAG = "adbench.status_note"
#: the run's description in the MLflow UI
DESCRIPTION_TAG = "mlflow.note.content"
#: written by bench.job.fitting (``FITTED_STATE``) in a fit's folder once its state is saved
_FITTED = "fitted.pt"


def outcome(exc_type: type[BaseException] | None, failed_jobs: list[str]) -> tuple[str, str]:
    """(status, note) of a parent run whose ``with`` block ended with ``exc_type`` (None: it
    completed) after the jobs ``failed_jobs`` failed."""
    if exc_type is not None and not issubclass(exc_type, Exception):
        return "KILLED", f"KILLED: the run was interrupted ({exc_type.__name__})"
    if exc_type is not None:
        return "FAILED", f"FAILED: the run stopped on an error ({exc_type.__name__})"
    if failed_jobs:
        names = ", ".join(failed_jobs[:5]) + (", ..." if len(failed_jobs) > 5 else "")
        return "FAILED", f"FAILED: {len(failed_jobs)} job(s) failed ({names})"
    return "FINISHED", ""


def close(client: Any, run_id: str, status: str, note: str, end_s: float | None = None) -> None:
    """Ends ``run_id`` with ``status``, the note as its tag and description."""
    if note:
        client.set_tag(run_id, NOTE_TAG, note)
        client.set_tag(run_id, DESCRIPTION_TAG, note)
    end_ms = int((end_s if end_s is not None else time.time()) * 1000)
    client.set_terminated(run_id, status, end_time=end_ms)


def close_fits(client: Any, experiment_id: str, parent_id: str, root: Path, status: str) -> int:
    """Closes the training-curve runs still RUNNING under ``parent_id`` (see the module);
    returns how many."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`adbench.kind` = "
        "'fit' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for run in runs:
        name, fit_hash = run.info.run_name or "", run.data.tags.get("fit_hash", "")
        folder = root / "state" / f"{name.replace('/', '__')}-{fit_hash}"
        if (folder / _FITTED).is_file():
            close(client, run.info.run_id, "FINISHED", "the training finished; its curve here "
                  "may stop early: the tracking store stopped answering while it trained")  # fmt: skip
        else:
            ended = "KILLED" if status == "KILLED" else "FAILED"
            close(client, run.info.run_id, ended, f"{ended}: the training did not finish")
    return len(runs)


def settle_pending(client: Any, root: Path, uri: str, by: str) -> list[str]:
    """Gives the parent runs the ledger records as ended while the store at ``uri`` was
    unreachable the status they ended with (and closes their training-curve runs); returns
    their ids."""
    settled = []
    for entry in ledger.on_store(root, uri):
        if entry.get("on_store", True) or entry.get("status") == "RUNNING":
            continue
        run_id, status = entry["run_id"], entry["status"]
        try:
            run = client.get_run(run_id)
        except Exception as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is not None and run.info.status == "RUNNING":
            note = (f"{entry.get('note') or status}; the tracking store was unreachable when "
                    f"the run ended, so {by} set this status later")  # fmt: skip
            close(client, run_id, status, note, entry.get("ended"))
            close_fits(client, run.info.experiment_id, run_id, root, status)
            settled.append(run_id)
        ledger.ended(root, run_id, status, entry.get("note", ""), on_store=True)
    if settled:
        console.print(
            f"MLflow: set the status of {len(settled)} earlier run(s) that ended while the "
            f"tracking store was unreachable ({', '.join(settled)})",
            soft_wrap=True,
        )
    return settled


def close_dead(client: Any, experiment_id: str, benchmark: str, root: Path) -> list[str]:
    """Marks KILLED this benchmark's parent runs left RUNNING by a process that is gone
    (see :func:`process_gone`: only runs opened on this host) and closes their training-curve
    runs; returns their ids."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.`adbench.kind` = 'benchmark' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    dead = [r for r in runs if r.info.run_name == benchmark and process_gone(r.data.tags)]
    for run in dead:
        tags = run.data.tags
        note = (f"KILLED: its bench process (pid {tags.get('adbench.pid')} on "
                f"{tags.get('adbench.host')}) ended without closing this run: it was killed "
                "(SIGKILL, a lost machine) or crashed")  # fmt: skip
        close(client, run.info.run_id, "KILLED", note)
        close_fits(client, experiment_id, run.info.run_id, root, "KILLED")
        ledger.ended(root, run.info.run_id, "KILLED", note, on_store=True)
    if dead:
        console.print(
            f"MLflow: marked {len(dead)} earlier run(s) of {escape(benchmark)} as KILLED: "
            f"left RUNNING by a process on this host that is gone "
            f"({', '.join(r.info.run_id for r in dead)})",
            soft_wrap=True,
        )
    return [r.info.run_id for r in dead]
