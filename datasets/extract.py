"""Safe unpacking of tar (plain, gz, bz2, xz) and zip archives, on every supported Python.

Every member is checked before it is written, against what the archive created so far: no
absolute path, no ``..``; no path through (or replacing) a symbolic link member; no symbolic
link whose target, resolved through the links already on disk, leaves the destination; no hard
link except to a regular file unpacked before it; no device, FIFO or other special member; zip
archives: no links at all. Once every member is out, the links are resolved again (a later link
can redirect an earlier one). Where Python has it (3.11.4+), tar members also go through the
``data`` extraction filter as a second guard. A refused member stops the extraction; the caller
removes the half-written folder. A damaged archive is reported as such, not as a refusal.
"""

from __future__ import annotations

import errno
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
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
SPECIAL = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}
SPECIAL[tarfile.FIFOTYPE] = "FIFO"
#: what a broken archive raises while it is read (an OSError without errno: bad gzip/bz2 data)
DAMAGED = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)


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


def _norm(name: str) -> str:
    """A member name as one spelling ("./a//b/" and "a/b" are the same member)."""
    return posixpath.normpath(name.replace("\\", "/"))


def _inside(path: str, real_dest: str) -> bool:
    return os.path.commonpath([path, real_dest]) == real_dest


class _TarGuard:
    """The checks of each tar member against the links and files unpacked before it."""

    def __init__(self, dest: Path) -> None:
        self.dest, self.real = dest, os.path.realpath(dest)
        self.links: dict[str, str] = {}  #: symbolic link members: name -> target
        self.files: set[str] = set()  #: regular files (and hard links to them) unpacked

    def check(self, member: tarfile.TarInfo) -> None:
        why = self._why(member)
        if why:
            raise UnsafeArchiveError(f"refused member {member.name!r}: {why}")

    def _why(self, m: tarfile.TarInfo) -> str | None:
        name = _norm(m.name)
        if why := _escapes(m.name):
            return why
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            kind = SPECIAL.get(m.type, f"special member (type {m.type!r})")
            return f"a {kind}; only files, folders and links are unpacked"
        if name == "." and not m.isdir():
            return "an empty name"
        parts = name.split("/")
        for i in range(1, len(parts)):
            if (prefix := "/".join(parts[:i])) in self.links:
                return f"a path through the symbolic link member {prefix!r}"
        if name in self.links:
            return f"it replaces the symbolic link member {name!r}"
        parent = os.path.realpath(self.dest / posixpath.dirname(name))
        if (name != "." and os.path.islink(self.dest / name)) or not _inside(parent, self.real):
            return "a path through a symbolic link on disk"
        if m.issym():
            return self._symlink(name, m.linkname)
        if m.islnk():
            return self._hardlink(m.linkname)
        return None

    def _symlink(self, name: str, target: str) -> str | None:
        if not target or target.startswith("/") or (len(target) > 1 and target[1] == ":"):
            return f"a link to the absolute path {target!r}"
        folder = posixpath.dirname(name)
        textual = posixpath.normpath(posixpath.join(folder, target))
        resolved = os.path.realpath(self.dest / folder / target)
        if textual == ".." or textual.startswith("../") or not _inside(resolved, self.real):
            return f"a link to {target!r}, outside the destination"
        return None

    def _hardlink(self, target: str) -> str | None:
        if _escapes(target) or _norm(target) not in self.files:
            return f"a hard link to {target!r}, which is not a file unpacked before it"
        return None

    def record(self, member: tarfile.TarInfo) -> None:
        """Notes what ``member`` (checked and unpacked) put at its name."""
        name = _norm(member.name)
        if member.issym():
            self.links[name] = member.linkname
            self.files.discard(name)
        elif member.isfile() or member.islnk():
            self.files.add(name)

    def check_links(self) -> None:
        """Every link, resolved once all are in place, still ends inside the destination."""
        for name, target in self.links.items():
            if not _inside(os.path.realpath(self.dest / name), self.real):
                raise UnsafeArchiveError(
                    f"refused member {name!r}: a link to {target!r}, which leads outside the "
                    "destination through the links unpacked after it"
                )


def _tame(member: tarfile.TarInfo) -> None:
    """No set-uid/gid, sticky or group/other write bits; owner keeps read/write (and folder
    access); ownership is not taken from the archive. (What the ``data`` filter also does.)"""
    if member.isfile() or member.isdir():
        member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    member.uid, member.gid, member.uname, member.gname = -1, -1, "", ""  # chown(-1, -1): none


def _stdlib_filter() -> dict:
    """The ``extract`` keywords of Python's own guard: the ``data`` filter where it exists."""
    if hasattr(tarfile, "data_filter"):
        return {"filter": "data"}
    if hasattr(tarfile, "fully_trusted_filter"):  # silences the warning of a missing filter
        return {"filter": "fully_trusted"}
    return {}


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
    guard, second = _TarGuard(dest), _stdlib_filter()
    refusal = getattr(tarfile, "FilterError", ())
    with archive.open("rb") as raw, tarfile.open(fileobj=_Counting(raw, bar), mode="r:*") as tar:
        for member in tar:
            guard.check(member)
            _tame(member)
            try:
                tar.extract(member, dest, **second)
            except refusal as err:  # the data filter's second opinion
                raise UnsafeArchiveError(f"refused member {member.name!r}: {err}") from err
            guard.record(member)
    guard.check_links()


def _zip_refusal(zf: zipfile.ZipFile, info: zipfile.ZipInfo, real_dest: str) -> str | None:
    if why := _escapes(info.filename):
        return why
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        target = zf.read(info).decode("utf-8", "replace")
        where = posixpath.normpath(posixpath.join(posixpath.dirname(info.filename), target))
        outside = target.startswith("/") or where == ".." or where.startswith("../")
        return f"a symbolic link to {target!r}" + (
            ", outside the destination" if outside else " (links are not unpacked from zip files)"
        )
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a device, FIFO or socket; only files and folders are unpacked"
    parent = os.path.realpath(Path(real_dest, posixpath.dirname(_norm(info.filename))))
    return None if _inside(parent, real_dest) else "a path through a symbolic link on disk"


def _unzip(archive: Path, dest: Path, bar: ByteBar) -> None:
    real = os.path.realpath(dest)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if why := _zip_refusal(zf, info, real):
                raise UnsafeArchiveError(f"refused member {info.filename!r}: {why}")
            zf.extract(info, dest)
            bar.advance(info.compress_size)


def _unpack_error(archive: Path, dest: Path, err: BaseException) -> DataError:
    """A damaged archive, a full disk or another file-system error, in one line."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(
            f"no space left in {dest} while unpacking {archive.name}: make room (or pass --root "
            "on another disk) and re-run"
        )
    if isinstance(err, OSError) and err.errno is not None:
        return DataError(f"cannot unpack {archive} into {dest}: {err}")
    return DataError(f"{archive} is damaged ({err}); delete it and download it again")


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
    except (*DAMAGED, OSError) as err:
        raise _unpack_error(archive, dest, err) from err
