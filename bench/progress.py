"""Rich progress bars for long loops; silent when the output is not a terminal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)


def _enabled() -> bool:
    flag = os.environ.get("ADBENCH_PROGRESS", "auto")
    return flag == "1" or (flag == "auto" and console.is_terminal)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[_Bar]:
    if not _enabled():
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
