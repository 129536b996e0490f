"""Resumable HTTP download of one archive, with a byte progress bar, and file checksums.

The bytes go to ``<archive>.part``, kept between runs; the next run asks for the rest with an
HTTP ``Range`` request (``If-Range`` with the server's ETag or Last-Modified, so a file that
changed on the server is fetched again from zero, as is the whole file from a server that
ignores ``Range``, or announces another total size than the one recorded for the part file).
The part file becomes ``<archive>`` once every byte has arrived. A lost connection is retried;
a full disk stops the download at once.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bench.errors import DataError
from bench.progress import console

CHUNK = 1 << 20
USER_AGENT = "adbench-download/1"
#: called with (archive size or None, bytes already on disk) before any byte is written
SpaceCheck = Callable[[int | None, int], None]


def _progress_enabled() -> bool:
    flag = os.environ.get("ADBENCH_PROGRESS", "auto")
    return flag == "1" or (flag == "auto" and console.is_terminal)


class ByteBar:
    """Advances a rich bar of bytes (size, rate, ETA); a no-op when progress is off."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)


@contextmanager
def byte_bar(description: str, total: int | None, done: int = 0) -> Iterator[ByteBar]:
    """A progress bar over ``total`` bytes (None: unknown) starting at ``done``."""
    if not _progress_enabled():
        yield ByteBar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        yield ByteBar(progress, progress.add_task(description, total=total, completed=done))


def digests(path: Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a file, read once for every algorithm."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with path.open("rb") as f, byte_bar(f"verifying {path.name}", path.stat().st_size) as bar:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            bar.advance(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


class _Lost(Exception):
    """The connection ended before the last byte (the part file is kept)."""


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a ``Content-Range: bytes a-b/n`` header."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not m:
        raise _Lost(f"unreadable Content-Range {value!r}")
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _read_meta(meta: Path) -> dict:
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}


def _open(url: str, offset: int, validator: str | None, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


class _Restart(Exception):
    """The part file cannot be continued (the file on the server changed): start from zero."""


def _resumed_at(resp, offset: int, state: dict, name: str, say) -> tuple[int, int | None]:
    """(the byte the reply starts at, the file's total size or None) of a reply to a request
    for the bytes from ``offset`` on; raises :class:`_Restart` when the part file is stale."""
    if offset and resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:
            raise _Lost(f"the server resumed at byte {start}, not {offset}")
        known = state.get("total")
        if known is not None and total is not None and total != known:
            raise _Restart(f"the file on the server changed ({total} bytes now, {known} before)")
        say(f"resuming {name} at {offset / 1e6:.1f} MB")
        return offset, total
    if offset:
        say(
            f"the server sent the whole file instead of the rest (no HTTP Range, or the file "
            f"changed): {name} starts over from zero"
        )
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _disk_full(part: Path, total: int | None, err: OSError) -> DataError:
    have = part.stat().st_size if part.is_file() else 0
    need = (
        f"{total - have} more bytes ({(total - have) / 1e9:.2f} GB) are needed for the archive"
        if total is not None
        else "the archive's size is unknown"
    )
    return DataError(
        f"no space left in {part.parent} ({err.strerror}): {need}; {part.name} is kept: make "
        "room and re-run the same command to resume, or pass --root on another disk"
    )


def _transfer(url: str, part: Path, check_space: SpaceCheck, timeout: float, say) -> None:
    """One request: appends the rest of the file to ``part`` (or rewrites it)."""
    meta = part.with_name(part.name + ".json")
    state = _read_meta(meta)
    offset = part.stat().st_size if part.is_file() and state.get("url") == url else 0
    if offset and state.get("total") == offset:
        return  # complete already (an earlier run stopped before renaming it)
    try:
        resp = _open(url, offset, state.get("validator"), timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the part is not a prefix of the file any more
            raise _Restart("the server refused to resume") from err
        if err.code >= 500:
            raise _Lost(f"HTTP {err.code} {err.reason}") from err
        raise DataError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    with resp:
        offset, total = _resumed_at(resp, offset, state, part.name, say)
        check_space(total, offset)
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        try:
            meta.write_text(json.dumps({"url": url, "total": total, "validator": validator}))
            with (
                part.open("ab" if offset else "wb") as f,
                byte_bar(part.stem, total, offset) as bar,
            ):
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.advance(len(chunk))
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):  # not worth retrying: stop now
                raise _disk_full(part, total, err) from err
            raise
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Lost(f"the connection closed after {got} of {total} bytes")
    if total is not None and got > total:
        part.unlink()
        raise DataError(f"{url} sent {got} bytes, more than the {total} it announced")


def _attempt(url: str, part: Path, check_space: SpaceCheck, timeout: float, say) -> None:
    """One request, and a second one from byte zero where the part file proved stale."""
    try:
        _transfer(url, part, check_space, timeout, say)
    except _Restart as why:
        say(f"{why}: {part.name} starts over from zero")
        part.unlink(missing_ok=True)
        _transfer(url, part, check_space, timeout, say)


def fetch(
    url: str,
    dest: Path,
    check_space: SpaceCheck,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    say: Callable[[str], None] = print,
) -> Path:
    """Downloads ``url`` to ``dest`` through ``dest.part``, resuming what an earlier run left;
    a lost connection is resumed up to ``retries`` times (1, 2, 4 ... s apart), then the part
    file is kept for the next run and the error says so."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _attempt(url, part, check_space, timeout, say)
            break
        except (_Lost, OSError, http.client.HTTPException) as err:
            if isinstance(err, urllib.error.URLError) and not part.is_file():
                reason = getattr(err, "reason", err)
                raise DataError(f"cannot download {url}: {reason}") from err
            if attempt == retries:
                have = part.stat().st_size if part.is_file() else 0
                raise DataError(
                    f"download of {url} interrupted after {have} bytes ({err}); {part} is kept: "
                    "re-run the same command to resume"
                ) from err
            say(f"connection lost ({err}); resuming in {2**attempt} s")
            time.sleep(2**attempt)
    part.replace(dest)
    part.with_name(part.name + ".json").unlink(missing_ok=True)
    return dest
