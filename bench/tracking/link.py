"""A run's connection to its MLflow store, shared by every path that calls it: the parent
run, job runs, fit runs and their training curves, artifacts and the summary. The first
failure is one message; after it nothing calls the store again in this run (the results are
on disk; ``bench sync`` uploads them later)."""

from __future__ import annotations

import re

from rich.markup import escape

from bench.progress import console

#: the cause inside MLflow's long report of a failed HTTP request
_CAUSE = re.compile(r"\[Errno -?\d+\][^'\")]*|Connection broken: [^'\"]*|Read timed out[^'\"]*")


def short(err: BaseException) -> str:
    """``Type: reason`` of an error in one short line: the network cause of a failed HTTP
    request, else the first line (SQLAlchemy adds the statement on further lines), at most
    200 characters."""
    text = str(err).strip()
    cause = _CAUSE.search(text) if text.startswith("API request") else None
    reason = cause.group(0) if cause else (text.splitlines() or [""])[0]
    return f"{type(err).__name__}: {reason.strip()[:200]}"


class Link:
    """Whether the store at ``uri`` still answers (:attr:`down` once a call failed).
    ``resync`` is how the user uploads later what this run could not."""

    def __init__(self, uri: str, resync: str = "`bench sync`") -> None:
        self.uri, self.resync = uri, resync
        self.down = False

    def fail(self, err: BaseException, doing: str, goes_on: str = "") -> None:
        """Turns tracking off; the first failure prints one yellow line saying what failed,
        that tracking is off for the rest of the run, and how to upload later."""
        if not self.down:
            console.print(
                f"[yellow]MLflow: {escape(doing)} failed ({escape(short(err))}){goes_on}; "
                f"tracking at {escape(self.uri)} is off for the rest of this run: the results "
                f"are in the results folder, {escape(self.resync)} uploads them later.[/]",
                soft_wrap=True,
            )
        self.down = True
