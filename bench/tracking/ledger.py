"""The results folder's own account of the MLflow parent runs it opened
(``<output>/<name>/tracking.json``): which store and run, and how the run ended. It outlives
an outage of the store: ``bench sync`` and the next ``bench run`` find the original parent
run there and give it the status the run really ended with (see
:mod:`bench.tracking.statuses`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.results import write_json

LEDGER = "tracking.json"


def read(root: Path) -> list[dict[str, Any]]:
    """Every parent run recorded under the benchmark folder ``root`` (none if unreadable)."""
    try:
        entries = json.loads((root / LEDGER).read_text())["parents"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [e for e in entries if isinstance(e, dict) and e.get("run_id")]


def _write(root: Path, entries: list[dict[str, Any]]) -> None:
    try:
        write_json(root / LEDGER, {"parents": entries})
    except OSError:  # a bookkeeping file: the results themselves are written elsewhere
        pass


def on_store(root: Path, uri: str) -> list[dict[str, Any]]:
    """The parent runs recorded for the store at ``uri``, oldest first."""
    return [e for e in read(root) if e.get("uri") == uri]


def opened(root: Path, uri: str, experiment_id: str, run_id: str) -> None:
    """Records a parent run just opened (RUNNING on the store)."""
    entries = read(root)
    entries.append(
        {"run_id": run_id, "uri": uri, "experiment_id": experiment_id, "status": "RUNNING",
         "on_store": True, "opened": time.time()}
    )  # fmt: skip
    _write(root, entries)


def ended(root: Path, run_id: str, status: str, note: str, on_store: bool) -> None:
    """Records how a parent run ended and whether the store has that status yet."""
    entries = read(root)
    for entry in entries:
        if entry["run_id"] == run_id:
            entry.update(status=status, note=note, on_store=on_store)
            entry.setdefault("ended", time.time())
    _write(root, entries)
