"""One ``bench run`` at a time per benchmark folder (``<output>/<name>/``).

A run holds an exclusive ``flock`` on ``<output>/<name>/.bench-run.lock`` from before it reads
which jobs are finished until its MLflow parent run is closed; a second run of the same folder
waits for it (saying who holds it), then finds the first run's jobs finished and skips them. The
lock belongs to the open file, so a holder that dies, even by SIGKILL, never leaves a stale
lock; the file itself stays (it only holds the last holder's pid, host and start, for the
message). ``bench sync`` does not wait: it refuses while a run holds the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.markup import escape

from bench.errors import ConfigError
from bench.progress import console

#: the lock file in the benchmark folder
LOCK_FILE = ".bench-run.lock"


def lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK_FILE


def holder_text(handle: IO[str], path: Path) -> str:
    """Who holds the lock, as its holder wrote it: "pid 123 on host, since 2026-01-01 10:00:00
    (bench run); lock <path>"."""
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return f"a process that is starting; lock {path}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    what = info.get("command", "bench")
    return f"pid {info['pid']} on {info.get('host', '?')}, since {since} ({what}); lock {path}"


def _open(path: Path, make_folder: bool = True) -> IO[str] | None:
    """The lock file, opened for reading and writing (created if missing); None where it
    cannot be (a read-only folder; without ``make_folder``, a folder that is not there)."""
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+", encoding="utf-8")
    except OSError:
        return None


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(handle: IO[str], command: str) -> None:
    handle.seek(0)
    handle.truncate()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": command, "argv": sys.argv}  # fmt: skip
    handle.write(json.dumps(info))
    handle.flush()


@contextmanager
def _holding(handle: IO[str], command: str) -> Iterator[None]:
    """While the lock on ``handle`` is held: its holder written for others' messages, then
    the lock released."""
    _write_holder(handle, command)
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def run_lock(folder: Path, command: str = "bench run", poll: float = 0.5) -> Iterator[None]:
    """Holds the benchmark folder ``folder`` for this process; while another process holds it,
    waits, saying who holds it (again whenever that changes)."""
    path = lock_path(folder)
    handle = _open(path)
    if handle is None:
        console.print(
            f"[yellow]cannot create the lock file {escape(str(path))}: another run of this "
            "folder started meanwhile would not wait for this one[/]",
            soft_wrap=True,
        )
        yield
        return
    with handle:
        waited, shown = time.monotonic(), None
        while not _try_lock(handle):
            holder = holder_text(handle, path)
            if holder != shown:
                console.print(
                    f"[yellow]{escape(str(folder))} is in use by another process: "
                    f"{escape(holder)}. Waiting for it to finish ...[/]",
                    soft_wrap=True,
                )
                shown = holder
            time.sleep(poll)
        if shown is not None:
            console.print(
                f"waited {time.monotonic() - waited:.0f} s for {escape(str(folder))}; going on "
                "(the jobs finished meanwhile are skipped)",
                soft_wrap=True,
            )
        with _holding(handle, command):
            yield


@contextmanager
def refuse_if_running(folder: Path, command: str) -> Iterator[None]:
    """Holds ``folder`` like :func:`run_lock` but never waits: a folder a run holds is a
    :class:`ConfigError` naming the holder. A folder it cannot create the lock file in (read
    only, or not there) has no run writing into it: nothing is held then."""
    path = lock_path(folder)
    handle = _open(path, make_folder=False)
    if handle is None:  # no folder, or a read-only one: no run writes into it
        yield
        return
    with handle:
        if not _try_lock(handle):
            raise ConfigError(
                f"{folder} is in use by another process: {holder_text(handle, path)}; "
                f"{command} it after that ends (a run logs its jobs to MLflow as they finish)"
            )
        with _holding(handle, command):
            yield


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Holds the lock file ``path`` (created if missing) for a short critical section shared by
    several benchmark folders, waiting for any other process holding it: e.g. creating a new
    MLflow SQLite store (``<output>/mlflow.db``), which two processes must not do at once
    ("duplicate column name: step"). Where the file cannot be created, nothing is held."""
    handle = _open(path)
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
