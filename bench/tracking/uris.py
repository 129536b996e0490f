"""Where the MLflow runs go; the fast check that a tracking server is up; bounded waits for a
server; the check that a SQLite store is a readable database."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from bench.config import BenchConfig
from bench.errors import DataError

#: MLflow's HTTP settings for a tracking server, unless the environment sets them: a brief
#: hiccup is still retried (3 times, about 1, 2 and 4 s apart), a dead server costs about 10 s
#: and a hung one under a minute, instead of MLflow's 7 retries up to 2 minutes apart (about 4
#: minutes a call)
HTTP_WAITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def default_tracking_uri(output: str | Path) -> str:
    """The default store: ``sqlite:///<output>/mlflow.db``."""
    return f"sqlite:///{(Path(output) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: BenchConfig) -> str:
    """The config's ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the default store."""
    return (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.output)
    )


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def bound_http_waits(uri: str) -> None:
    """Sets :data:`HTTP_WAITS` for a server ``uri`` where the environment does not say."""
    if is_server(uri):
        for key, value in HTTP_WAITS.items():
            os.environ.setdefault(key, value)


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fails fast (instead of MLflow's minutes of retries) when a tracking server is down."""
    if not is_server(uri):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"tracking server {uri} is unreachable ({err})") from err


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def sqlite_damage(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is not a readable database (SQLite's words), or None
    when it reads (``PRAGMA quick_check``), is missing or empty (MLflow creates the tables),
    or is busy (another process writes it: MLflow waits for it)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        busy = isinstance(err, sqlite3.OperationalError) and "locked" in str(err)
        return None if busy else str(err)
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    return "; ".join(problems)[:200] if problems else None


def check_store(uri: str, output: str | Path, name: str | None = None) -> None:
    """Raises :class:`DataError` naming a ``sqlite:`` store that is not a readable database
    (truncated, overwritten) and how to recover, before MLflow turns it into a SQLAlchemy
    traceback. The results folder (``output``) is never touched: ``bench sync`` re-uploads
    its finished jobs into a fresh store."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    reason = sqlite_damage(path)
    if reason is None:
        return
    shown = _shown(path)
    sync = f"bench sync --name {name or '<name>'} --output {_shown(Path(output))}"
    if uri != default_tracking_uri(output):
        sync += f" --tracking-uri {uri}"
    each = "" if name else " (for each benchmark)"
    raise DataError(
        f"MLflow store {shown} is not a readable SQLite database ({reason}); move it aside "
        f"(mv {shown} {shown}.bad) and run `{sync}`{each} to re-upload the finished jobs; "
        "the results folder is untouched"
    )
