"""``bench download``: a dataset fetched, verified and unpacked into the root its loader reads.

The steps, each of which a re-run picks up where it stopped: the licence is shown and accepted
once; the archive is downloaded (resumably, :mod:`.fetch`) into a staging folder beside the root
(``.<root name>.download/``), after a disk-space check; its checksum is verified before anything
is unpacked; it is unpacked safely (:mod:`.extract`) into that staging folder, the archive's top
folder is mapped onto the root and the loader's own layout check runs; only then is the folder
renamed into place, with ``bench-download.json`` (licence, url, SHA-256, time, version) in it.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from bench.errors import ConfigError, DataError
from bench.progress import console

from .common import DatasetLayoutError
from .extract import extract
from .fetch import digests, fetch
from .sources import Source

RECORD = "bench-download.json"
#: entries of an archive's top level that are not data (macOS resource forks, hidden files)
IGNORED = ("__MACOSX",)
Say = Callable[[str], None]


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, highlight=False)


class ManualDownloadError(DataError):
    """The dataset has no direct link: the message holds the steps to fetch it by hand."""


@dataclass(frozen=True)
class Downloaded:
    root: Path
    record: dict  #: the contents of ``bench-download.json`` ({} for data placed by hand)
    already: bool  #: True when the data was there before this call


def default_root(source: Source) -> Path:
    """The root of the dataset's registered loader (its environment variable, else its default
    folder); ``data/<name>`` while no loader is registered under that name."""
    from .registry import UnknownDatasetError, get_dataset

    try:
        return get_dataset(source.loader).root()
    except UnknownDatasetError:
        return Path("data") / source.name


def command(source: Source, root: Path) -> str:
    return f"bench download {source.name} --root {shlex.quote(str(root))}"


def manual_instructions(source: Source, root: Path) -> str:
    return (
        f"{source.title} has no direct download link ({source.homepage}); fetch it by hand:\n"
        + source.manual.format(root=root)
        + f"\nexpected layout:\n  {source.layout}\n"
        f"licence: {source.licence} ({source.licence_url})\n"
        f"or unpack and check an archive you downloaded: {command(source, root)} --archive FILE"
    )


def licence_text(source: Source) -> str:
    return (
        f"{source.title} (release {source.version}) comes from {source.homepage}\n"
        f"  archive: {source.url}\n"
        f"  licence: {source.licence} ({source.licence_url})"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _loader(source: Source, say: Say):
    """The registered dataset whose ``categories(root)`` checks the layout (None, said once,
    while no loader is registered under that name)."""
    from .registry import UnknownDatasetError, get_dataset

    try:
        return get_dataset(source.loader)
    except UnknownDatasetError:
        say(
            f"[yellow]no dataset {source.loader!r} is registered yet: the unpacked layout of "
            f"{source.title} is not checked[/]"
        )
        return None


def _load(path: Path, key: str | None, remedy: str) -> dict:
    """The JSON object in ``path`` (holding ``key``); a damaged one is a :class:`DataError`
    that names the file and says how to go on (``remedy``)."""
    try:
        data = json.loads(path.read_text())
        why = None if isinstance(data, dict) and (key is None or key in data) else "incomplete"
    except (OSError, ValueError) as err:
        why = str(err)
    if why:
        raise DataError(f"{path} is damaged ({why}): {remedy}")
    return data


def _existing(source: Source, root: Path, say: Say) -> dict | None:
    """The record of data already at ``root`` ({} for data placed by hand), None if empty."""
    record = root / RECORD
    if record.is_file():
        return _load(
            record,
            None,
            f"delete it to use the data at {root} as placed by hand, or delete {root} and run "
            f"`{command(source, root)}` to fetch it again",
        )
    if not root.is_dir() or not any(root.iterdir()):
        return None
    spec = _loader(source, say)
    try:
        if spec is not None:
            spec.categories(root)
    except DatasetLayoutError as err:
        raise DataError(
            f"{root} is not empty but does not hold {source.title} ({err}); remove it, or pass "
            "--root to download elsewhere"
        ) from None
    return {}


def _accept(source: Source, stage: Path, accept: bool, confirm, say: Say) -> str:
    """The time the licence was accepted: now, or in an earlier, interrupted run."""
    marker = stage / "accepted.json"
    if marker.is_file():
        remedy = "delete it and re-run the command (the licence is then asked again)"
        return str(_load(marker, "accepted_at", remedy)["accepted_at"])
    say(licence_text(source))
    if not accept:
        if confirm is None:
            raise ConfigError(
                f"{source.title} is licensed under {source.licence} ({source.licence_url}); "
                "read it, then re-run with --accept-license to accept it"
            )
        if not confirm(f"accept the {source.licence} licence of {source.title}? [y/N] "):
            raise ConfigError(f"the licence of {source.title} was not accepted; nothing fetched")
    stage.mkdir(parents=True, exist_ok=True)
    when = _now()
    marker.write_text(json.dumps({"licence": source.licence, "accepted_at": when}))
    return when


def _space_check(source: Source, where: Path, say: Say):
    def check(total: int | None, have: int) -> None:
        total = total or source.size
        if total is None:
            say("[yellow]the archive's size is unknown: free disk space not checked[/]")
            return
        need = total - have + int(total * source.unpack_factor)
        free = shutil.disk_usage(where).free
        if free < need:
            raise DataError(
                f"{source.title} needs about {need / 1e9:.1f} GB free in {where} (the archive, "
                f"{total / 1e9:.1f} GB, and its contents, x{source.unpack_factor}); only "
                f"{free / 1e9:.1f} GB is free: make room or pass --root on another disk"
            )

    return check


def _verify(source: Source, archive: Path, downloaded: bool, say: Say) -> dict:
    """Checks the published sum before anything is unpacked; a downloaded archive that does not
    match is deleted. Returns what the record says about it."""
    sums = digests(archive, ("sha256", "md5") if source.md5 else ("sha256",))
    for algo, label in (("sha256", "SHA-256"), ("md5", "MD5")):
        want = getattr(source, algo)
        if want and sums[algo] != want:
            if downloaded:
                archive.unlink()
            fate = "the download was deleted: re-run to fetch it again" if downloaded else ""
            raise DataError(
                f"{archive.name}: its {label} is {sums[algo]}, the published one is {want} "
                f"({source.checksum_source}); {fate or 'not unpacked'}"
            )
    sha = sums["sha256"]
    if source.sha256:
        verified, text = "sha256", "SHA-256 verified against the published sum"
    elif source.md5:
        verified = "md5"
        text = f"MD5 verified against the published sum (no SHA-256 is published; computed: {sha})"
    else:
        verified = None
        text = f"[yellow]not verified: no sum is published; its SHA-256 is {sha}[/]"
    say(f"{archive.name}: {text}")
    return {
        "sha256": sha,
        **{a: sums[a] for a in sums if a != "sha256"},
        "verified": verified,
        "published_by": source.checksum_source if verified else None,
    }


def _only_folder(folder: Path) -> Path | None:
    entries = [p for p in folder.iterdir() if p.name not in IGNORED and not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else None


def _content_root(source: Source, unpacked: Path, say: Say) -> Path:
    """The folder of the unpacked archive that becomes the root: ``source.top`` (else the top
    level), descending through single wrapping folders until the loader's layout check passes
    (while no loader is registered: through every single wrapping folder)."""
    base = unpacked / source.top if source.top and (unpacked / source.top).is_dir() else unpacked
    spec = _loader(source, say)
    while True:
        try:
            if spec is not None:
                spec.categories(base)
                return base
            error = None
        except DatasetLayoutError as err:
            error = err
        inner = _only_folder(base)
        if inner is None and error is not None:
            held = sorted(p.name for p in unpacked.iterdir())[:12]
            raise DataError(
                f"the archive of {source.title} (holding {held}) is not in the layout its "
                f"loader reads: {error}"
            )
        if inner is None:
            return base
        base = inner


def _install(
    source: Source, archive: Path, unpacked: Path, root: Path, record: dict, say: Say
) -> dict:
    """Unpacks ``archive`` into ``unpacked``, maps its top folder, runs the layout check and
    renames the result to ``root`` with the record in it; ``unpacked`` is removed either way."""
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        extract(archive, unpacked)
        content = _content_root(source, unpacked, say)
        record = {**record, "downloaded_at": _now()}
        (content / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if root.is_dir():
            root.rmdir()  # empty: download() checked
        root.parent.mkdir(parents=True, exist_ok=True)
        content.rename(root)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return record


def _archive_name(source: Source) -> str:
    return Path(urlsplit(source.url or "").path).name or f"{source.name}.archive"


def download(
    source: Source,
    root: str | Path | None = None,
    *,
    accept: bool = False,
    confirm: Callable[[str], bool] | None = None,
    archive: str | Path | None = None,
    keep_archive: bool = False,
    retries: int = 3,
    say: Say = _say,
) -> Downloaded:
    """Fetches ``source`` into ``root`` (default: its loader's root); a no-op when the data is
    there. ``confirm(prompt)`` asks for the licence when ``accept`` is False (None: refuse);
    ``archive``: unpack a file fetched by hand instead of downloading."""
    root = Path(root) if root else default_root(source)
    found = _existing(source, root, say)
    if found is not None:
        say(f"{source.title} is already at {root}" + ("" if found else " (placed by hand)"))
        return Downloaded(root, found, already=True)
    if source.url is None and archive is None:
        raise ManualDownloadError(manual_instructions(source, root))
    if archive is not None and not Path(archive).is_file():
        what = "is a folder, not an archive file" if Path(archive).is_dir() else "does not exist"
        raise DataError(f"--archive {archive} {what}")
    stage = root.parent / f".{root.name}.download"
    accepted = _accept(source, stage, accept, confirm, say)
    path = stage / _archive_name(source) if archive is None else Path(archive)
    if archive is None and not path.is_file():
        fetch(source.url, path, _space_check(source, stage, say), retries=retries, say=say)
    else:  # fetched by hand, or kept from an earlier run: room to unpack it
        if archive is None:
            say(f"using {path}, downloaded by an earlier run")
        size = path.stat().st_size
        _space_check(source, stage, say)(size, size)
    record = {
        "dataset": source.name,
        "title": source.title,
        "licence": source.licence,
        "licence_url": source.licence_url,
        "source": source.homepage,
        "url": source.url if archive is None else None,
        "archive": path.name,
        **_verify(source, path, archive is None, say),
        "version": source.version,
        "accepted_at": accepted,
    }
    record = _install(source, path, stage / "unpacked", root, record, say)
    if archive is None and not keep_archive:
        path.unlink()
    (stage / "accepted.json").unlink(missing_ok=True)
    if stage.is_dir() and not any(stage.iterdir()):
        stage.rmdir()
    say(f"{source.title} is ready at {root}")
    return Downloaded(root, record, already=False)
