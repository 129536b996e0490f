"""Safe unpacking of tar (plain, gz, bz2, xz) and zip archives.

Every member is checked before it is written: no absolute path, no ``..``, no device or FIFO,
no symbolic or hard link that points outside the destination (zip archives: no links at all).
Tar members are then written through Python's ``data`` extraction filter as a second guard. A
refused member stops the extraction; the caller removes the half-written folder.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from bench.errors import DataError

from .fetch import ByteBar, byte_bar

#: leading bytes of each compressed tar flavour, and of a zip archive
MAGIC = {
    b"\xfd7zXZ\x00": "tar",
    b"\x1f\x8b": "tar",
    b"BZh": "tar",
    b"PK\x03\x04": "zip",
    b"PK\x05\x06": "zip",
}


class UnsafeArchiveError(DataError):
    """An archive member would be written outside the destination, or is not a plain file."""


def archive_kind(path: Path) -> str:
    """ "tar" or "zip", from the file's first bytes (a plain tar: "ustar" at byte 257)."""
    with path.open("rb") as f:
        head = f.read(512)
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    raise DataError(f"{path} is neither a tar (plain, gz, bz2, xz) nor a zip archive")


def _escapes(name: str) -> str | None:
    """Why the member path ``name`` would land outside the destination (None: it stays in)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component"
    return None


def _link_escapes(member: str, target: str, hard: bool) -> str | None:
    """Why a link at ``member`` pointing to ``target`` leaves the destination (None: it stays
    in). A symlink's target is relative to the member's folder, a hard link's to the root."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return f"a link to the absolute path {target!r}"
    base = "" if hard else posixpath.dirname(member)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        return f"a link to {target!r}, outside the destination"
    return None


def _check_tar(member: tarfile.TarInfo) -> None:
    why = _escapes(member.name)
    if why is None and (member.issym() or member.islnk()):
        why = _link_escapes(member.name, member.linkname, member.islnk())
    if why is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        why = "not a file, folder or link (a device or FIFO)"
    if why:
        raise UnsafeArchiveError(f"refused member {member.name!r}: {why}")


class _Counting:
    """A read-only file wrapper that advances a byte bar as the archive is read."""

    def __init__(self, f: BinaryIO, bar: ByteBar) -> None:
        self._f, self._bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.advance(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _untar(archive: Path, dest: Path, bar: ByteBar) -> None:
    guard = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with archive.open("rb") as raw, tarfile.open(fileobj=_Counting(raw, bar), mode="r:*") as tar:
        for member in tar:
            _check_tar(member)
            try:
                tar.extract(member, dest, **guard)
            except tarfile.TarError as err:  # the data filter's FilterError and broken data
                raise UnsafeArchiveError(f"refused member {member.name!r}: {err}") from err


def _unzip(archive: Path, dest: Path, bar: ByteBar) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            why = _escapes(info.filename)
            if why is None and stat.S_ISLNK(info.external_attr >> 16):
                why = "a symbolic link (not unpacked from zip archives)"
            if why:
                raise UnsafeArchiveError(f"refused member {info.filename!r}: {why}")
            zf.extract(info, dest)
            bar.advance(info.compress_size)


def extract(archive: Path, dest: Path) -> None:
    """Unpacks ``archive`` into ``dest`` (created); raises :class:`UnsafeArchiveError` at the
    first member that would leave ``dest``, and :class:`DataError` for a damaged archive."""
    kind = archive_kind(archive)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with byte_bar(f"unpacking {archive.name}", archive.stat().st_size) as bar:
            (_untar if kind == "tar" else _unzip)(archive, dest, bar)
    except UnsafeArchiveError as err:
        raise UnsafeArchiveError(f"{archive}: {err}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(f"cannot unpack {archive}: {err}") from err
