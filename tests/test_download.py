"""``bench download`` on loopback: a local HTTP server (standard library, 127.0.0.1, a free
port) serves archives built here from generated VisA-layout data, so the VisA loader's own
layout check runs on what was unpacked. Covers the licence step, resume with and without HTTP
Range, checksum mismatch, unsafe archives, the disk-space check and the missing-root hint."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.cli import main
from bench.datasets import DatasetLayoutError, get_dataset, list_datasets, synthetic_visa
from bench.datasets.download import RECORD, ManualDownloadError, download
from bench.datasets.extract import UnsafeArchiveError
from bench.datasets.sources import SOURCES, Source
from bench.errors import ConfigError, DataError


@dataclass
class Served:
    """What the test server sends, and the Range header of every request it got."""

    payload: bytes = b""
    cuts: list[int] = field(default_factory=list)  # close after n bytes, one per request
    honour_range: bool = True
    length: int | None = None  # a Content-Length to announce instead of the real one
    ranges: list[str | None] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        st: Served = self.server.served
        asked = self.headers.get("Range")
        st.ranges.append(asked)
        start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1)) if asked else 0
        if asked and st.honour_range:
            self.send_response(206)
            end = len(st.payload) - 1
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(st.payload)}")
        else:
            start = 0
            self.send_response(200)
        body = st.payload[start:]
        self.send_header("Content-Length", str(st.length or len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if st.length is not None:
            self.close_connection = True
            return
        if st.cuts:
            body = body[: st.cuts.pop(0)]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.served = Served()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd, name: str = "VisA_test.tar") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A small VisA release as the official archive holds it."""
    return synthetic_visa.generate(
        tmp_path_factory.mktemp("visa"),
        ("candle",),
        (60, 80),
        n_train=3,
        n_test_good=2,
        n_anomaly=2,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != RECORD
    }


def build(tree: Path, kind: str = "tar", wrap: str | None = None, extra=()) -> bytes:
    """The archive of ``tree`` (optionally under one folder ``wrap``) followed by ``extra``
    tar members ``(TarInfo, bytes or None)`` or zip entries ``(name, bytes)``."""
    buf = io.BytesIO()
    prefix = f"{wrap}/" if wrap else ""
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for rel, data in _files(tree).items():
                zf.writestr(prefix + rel, data)
            for name, data in extra:
                zf.writestr(name, data)
        return buf.getvalue()
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[kind]
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for rel, data in _files(tree).items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def source(url: str | None, payload: bytes | None = None, **kw) -> Source:
    """A catalogue entry for the test server, checked by the VisA loader."""
    sums = {"sha256": hashlib.sha256(payload).hexdigest()} if payload is not None else {}
    return Source(
        "visa_test",
        "VisA (test copy)",
        "CC BY 4.0",
        "https://creativecommons.org/licenses/by/4.0/",
        homepage="http://127.0.0.1/",
        url=url,
        **{"dataset": "visa", "version": "test", **sums, **kw},
    )


def test_catalogue_covers_every_downloadable_dataset():
    needed = {"mvtec_ad", "mvtec_ad2", "mvtec_3d", "mvtec_loco", "visa", "btad", "mpdd"}
    assert needed | {"real3d_ad", "anomaly_shapenet"} <= set(SOURCES)
    for s in SOURCES.values():
        if s.url is None:  # by hand: steps that name the root, and the layout
            assert "{root}" in s.manual and s.layout, s.name
            continue
        assert s.url.startswith("https://") and (s.sha256 or s.md5), s.name
        assert s.checksum_source and s.licence_url.startswith("https://"), s.name
    # the sum anomalib files as SHA-256 for MVTec 3D-AD has an MD5's length: kept as an MD5
    assert SOURCES["mvtec_3d"].sha256 is None and len(SOURCES["mvtec_3d"].md5) == 32
    for info in list_datasets():
        if info.spec.download is not None:
            assert info.spec.download in SOURCES, info.name
    with pytest.raises(ValueError, match="64 lowercase hex"):
        source("https://x/a.tar", sha256="abc")


@pytest.mark.parametrize(
    "kind, wrap", [("tar", None), ("tar.gz", "VisA_20220922"), ("tar.xz", None), ("zip", "v")]
)
def test_download_unpacks_the_loader_layout_and_records_the_licence(
    server, tree, tmp_path, kind, wrap
):
    payload = build(tree, kind, wrap)
    server.served.payload = payload
    src = source(_url(server, f"VisA.{kind}"), payload)
    root, said = tmp_path / "data" / "visa", []
    done = download(src, root, accept=True, retries=0, say=said.append)
    assert not done.already and done.root == root
    assert get_dataset("visa").categories(root) == ["candle"]
    assert _files(root) == _files(tree)  # the top folder (if any) is mapped onto the root
    record = json.loads((root / RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["verified"] == "sha256"
    assert (record["dataset"], record["licence"], record["url"]) == (
        "visa_test",
        "CC BY 4.0",
        src.url,
    )
    assert record["accepted_at"] and record["downloaded_at"] and record["version"] == "test"
    assert any("CC BY 4.0" in line for line in said)  # the licence was shown
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["visa"]  # no staging left
    again = download(src, root, retries=0, say=said.append)  # no --accept-license needed
    assert again.already and again.record == record and len(server.served.ranges) == 1
    assert f"already at {root}" in said[-1]


def test_a_wrong_checksum_deletes_the_download_and_unpacks_nothing(server, tree, tmp_path):
    server.served.payload = build(tree)
    src = source(_url(server), b"another file")
    root = tmp_path / "visa"
    with pytest.raises(DataError, match="SHA-256 is .* the published one is .* deleted") as err:
        download(src, root, accept=True, retries=0, say=lambda _: None)
    assert hashlib.sha256(server.served.payload).hexdigest() in str(err.value)
    stage = tmp_path / ".visa.download"
    assert not root.exists()
    assert [p.name for p in stage.iterdir()] == ["accepted.json"]  # no archive, nothing unpacked


def test_a_cut_connection_resumes_with_range_on_the_next_run(server, tree, tmp_path):
    payload = build(tree)
    half = len(payload) // 2
    server.served.payload, server.served.cuts = payload, [half]
    src, root = source(_url(server), payload), tmp_path / "visa"
    with pytest.raises(DataError, match="interrupted after .* re-run the same command"):
        download(src, root, accept=True, retries=0, say=lambda _: None)
    part = tmp_path / ".visa.download" / "VisA_test.tar.part"
    assert part.read_bytes() == payload[:half] and not root.exists()
    download(src, root, retries=0, say=lambda _: None)  # the acceptance was kept
    assert server.served.ranges == [None, f"bytes={half}-"]
    assert json.loads((root / RECORD).read_text())["sha256"] == hashlib.sha256(payload).hexdigest()
    assert _files(root) == _files(tree)


def test_a_lost_connection_is_resumed_within_the_run(server, tree, tmp_path):
    payload = build(tree)
    server.served.payload, server.served.cuts = payload, [1000]
    download(source(_url(server), payload), tmp_path / "v", accept=True, retries=1, say=print)
    assert server.served.ranges == [None, "bytes=1000-"]
    assert _files(tmp_path / "v") == _files(tree)


def test_a_server_without_range_restarts_from_zero_and_still_verifies(server, tree, tmp_path):
    payload = build(tree)
    server.served.payload, server.served.cuts = payload, [len(payload) // 3]
    server.served.honour_range = False
    src, root, said = source(_url(server), payload), tmp_path / "visa", []
    with pytest.raises(DataError, match="interrupted"):
        download(src, root, accept=True, retries=0, say=said.append)
    download(src, root, retries=0, say=said.append)
    assert server.served.ranges[1] == f"bytes={len(payload) // 3}-"  # asked, got the whole file
    assert any("starts over from zero" in line for line in said)
    assert json.loads((root / RECORD).read_text())["sha256"] == hashlib.sha256(payload).hexdigest()
    assert _files(root) == _files(tree)


def _link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info, None


def _member(name: str, data: bytes = b"owned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("tar", lambda out: [_member("../evil.txt")]),
        ("tar", lambda out: [_member(str(out / "evil.txt"))]),
        ("tar", lambda out: [_link("candle/up", "../../.."), _member("candle/up/evil.txt")]),
        ("tar", lambda out: [_link("candle/abs", str(out)), _member("candle/abs/evil.txt")]),
        ("tar", lambda out: [_link("hard", "../outside.txt", hard=True)]),
        ("zip", lambda out: [("../evil.txt", b"owned")]),
    ],
    ids=["dotdot", "absolute", "symlink-up", "symlink-absolute", "hardlink", "zip-dotdot"],
)
def test_unsafe_archives_are_refused_and_leave_nothing(server, tree, tmp_path, kind, extra):
    out = tmp_path / "outside"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("kept")
    work = tmp_path / "work"
    payload = build(tree, kind, extra=extra(out))
    server.served.payload = payload
    root = work / "visa"
    with pytest.raises(DataError, match="refused member"):
        download(source(_url(server), payload), root, accept=True, retries=0, say=lambda _: None)
    assert not root.exists() and not (work / ".visa.download" / "unpacked").exists()
    assert list(out.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
    assert not (work / "evil.txt").exists() and (tmp_path / "outside.txt").read_text() == "kept"


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def _zip_link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _snapshot(top: Path) -> dict[str, bytes | None]:
    """Every path under ``top`` (links not followed) with a regular file's bytes."""
    found = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(folder, name)
            found[p.relative_to(top).as_posix()] = p.read_bytes() if name in files else None
    return found


# The unpacked folder is <tmp>/work/.visa.download/unpacked: a link to "." there has ".." lead
# to the staging folder, which holds accepted.json while the archive is unpacked.
ESCAPES = {
    "symlink-chain": ("tar", [_link("l1", "."), _link("l1/l2", ".."), _member("l1/l2/evil.txt")]),
    "link-through-link": ("tar", [_link("a", "."), _link("b", "a/.."), _member("b/evil.txt")]),
    "link-redirected-later": ("tar", [_link("b", "x/.."), _link("x", ".")]),
    "write-through-link": (
        "tar",
        [_link("f", "x/../accepted.json"), _link("x", "."), _member("f")],
    ),
    "hardlink-via-link": (
        "tar",
        [_link("a", "."), _link("h", "a/../accepted.json", hard=True), _member("h")],
    ),
    "hardlink-absolute": ("tar", lambda top: [_link("h", str(top / "outside.txt"), hard=True)]),
    "hardlink-to-a-link": ("tar", [_link("s", "candle"), _link("h", "s", hard=True)]),
    "fifo": ("tar", [_special("candle/pipe", tarfile.FIFOTYPE)]),
    "char-device": ("tar", [_special("candle/null", tarfile.CHRTYPE)]),
    "zip-symlink-out": ("zip", [_zip_link("candle/up", "../../../outside.txt")]),
}


@pytest.mark.parametrize("stdlib_filter", [True, False], ids=["data-filter", "no-data-filter"])
@pytest.mark.parametrize("case", list(ESCAPES))
def test_links_and_special_members_cannot_reach_outside(
    tree, tmp_path, monkeypatch, case, stdlib_filter
):
    if not stdlib_filter:  # as on Python 3.11.0 - 3.11.3, where tarfile has no data filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    kind, extra = ESCAPES[case]
    payload = build(tree, kind, extra=extra(tmp_path) if callable(extra) else extra)
    archive = tmp_path / f"by_hand.{kind}"
    archive.write_bytes(payload)
    (tmp_path / "outside.txt").write_text("kept")
    (tmp_path / "work").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="refused member"):
        download(source(None, payload), tmp_path / "work" / "visa", accept=True, archive=archive)
    after = _snapshot(tmp_path)
    marker = after.pop("work/.visa.download/accepted.json")  # the licence step, kept for a re-run
    assert json.loads(marker)["licence"] == "CC BY 4.0" and after.pop("work/.visa.download") is None
    assert after == before  # nothing written, linked or changed outside; no partial root


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_a_damaged_archive_is_reported_as_damaged_not_refused(tree, tmp_path, kind):
    payload = build(tree, kind)
    if kind == "tar":  # cut in the middle of the largest member's bytes
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            big = max(tar.getmembers(), key=lambda m: m.size)
        cut = big.offset_data + big.size // 2
    else:
        cut = len(payload) * 2 // 3
    archive = tmp_path / f"cut.{kind}"
    archive.write_bytes(payload[:cut])
    root = tmp_path / "visa"
    with pytest.raises(DataError) as err:
        download(source(None), root, accept=True, archive=archive, say=lambda _: None)
    assert not isinstance(err.value, UnsafeArchiveError) and "refused" not in str(err.value)
    assert f"{archive} is damaged (" in str(err.value) and "download it again" in str(err.value)
    assert not root.exists() and not (tmp_path / ".visa.download" / "unpacked").exists()


class _TerminalAtEOF(io.StringIO):
    """Standard input of a terminal whose user pressed Ctrl-D."""

    def isatty(self) -> bool:
        return True


def test_user_mistakes_are_one_line_errors_naming_the_file(tree, tmp_path, capsys, monkeypatch):
    root, archive = tmp_path / "v", tmp_path / "visa.tar"
    cli = ["download", "visa", "--root", str(root), "--archive", str(archive)]
    assert main([*cli, "--accept-license"]) == 2  # --archive names a missing file
    assert f"--archive {archive} does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    archive.write_bytes(build(tree))
    monkeypatch.setattr("sys.stdin", _TerminalAtEOF(""))
    assert main(cli) == 2  # EOF at the licence prompt: not accepted
    assert "was not accepted; nothing fetched" in capsys.readouterr().err and not root.exists()
    marker = tmp_path / ".v.download" / "accepted.json"
    marker.parent.mkdir()
    marker.write_text('{"licence": "CC BY')  # cut short
    assert main([*cli, "--accept-license"]) == 2
    err = capsys.readouterr().err
    assert f"{marker} is damaged" in err and "delete it and re-run" in err and not root.exists()
    marker.unlink()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert main([*cli, "--accept-license", "--sha256", sha]) == 0
    capsys.readouterr()
    record = root / RECORD
    for damage in ("not json", "[1, 2]"):
        record.write_text(damage)
        assert main(cli) == 2
        err = capsys.readouterr().err
        assert f"{record} is damaged" in err and f"delete {root} and run `bench download" in err
        assert err.startswith("bench: error: ") and len(err.strip().splitlines()) == 1


def test_a_changed_file_on_the_server_restarts_the_download(server, tree, tmp_path):
    first, changed = build(tree), build(tree, "tar.gz")
    assert len(first) != len(changed)
    server.served.payload, server.served.cuts = first, [len(first) // 2]
    src, root, said = source(_url(server), changed), tmp_path / "visa", []
    with pytest.raises(DataError, match="interrupted"):
        download(src, root, accept=True, retries=0, say=said.append)
    server.served.payload = changed  # same URL and ETag, another length: not to be spliced
    download(src, root, retries=0, say=said.append)
    assert server.served.ranges == [None, f"bytes={len(first) // 2}-", None]
    assert any(f"({len(changed)} bytes now, {len(first)} before)" in line for line in said)
    assert json.loads((root / RECORD).read_text())["sha256"] == hashlib.sha256(changed).hexdigest()
    assert _files(root) == _files(tree)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_stops_the_download_at_once(server, tree, tmp_path):
    payload = build(tree)
    server.served.payload = payload
    stage = tmp_path / ".visa.download"
    stage.mkdir()
    (stage / "VisA_test.tar.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(DataError) as err:
        download(source(_url(server), payload), tmp_path / "visa", accept=True, retries=1)
    text = str(err.value)
    assert f"no space left in {stage}" in text and f": {len(payload)} more bytes" in text
    assert "interrupted" not in text and server.served.ranges == [None]  # not retried


def test_a_kept_archive_is_checked_for_room_to_unpack(tree, tmp_path):
    payload = build(tree)
    stage = tmp_path / ".visa.download"
    stage.mkdir()
    (stage / "VisA_test.tar").write_bytes(payload)  # left by an earlier run
    url, said = "http://127.0.0.1:9/VisA_test.tar", []  # nothing listens: nothing is fetched
    huge = source(url, payload, unpack_factor=1e12)
    assert len(payload) * 1e12 > shutil.disk_usage(stage).free
    with pytest.raises(DataError, match=f"needs about .* GB free in {re.escape(str(stage))}"):
        download(huge, tmp_path / "visa", accept=True, retries=0, say=said.append)
    assert (stage / "VisA_test.tar").read_bytes() == payload and not (tmp_path / "visa").exists()
    download(source(url, payload), tmp_path / "visa", retries=0, say=said.append)
    assert any("downloaded by an earlier run" in line for line in said)
    assert _files(tmp_path / "visa") == _files(tree)


def test_the_licence_must_be_accepted_before_anything_is_fetched(server, tree, tmp_path):
    payload = build(tree)
    server.served.payload = payload
    src, root, asked = source(_url(server), payload), tmp_path / "visa", []
    with pytest.raises(ConfigError, match="CC BY 4.0 .* --accept-license"):
        download(src, root, say=lambda _: None)
    with pytest.raises(ConfigError, match="not accepted"):
        download(src, root, confirm=lambda prompt: asked.append(prompt) or False, say=print)
    assert server.served.ranges == [] and list(tmp_path.iterdir()) == []
    download(src, root, confirm=lambda prompt: asked.append(prompt) or True, say=print)
    assert "CC BY 4.0" in asked[0] and len(asked) == 2
    assert json.loads((root / RECORD).read_text())["licence"] == "CC BY 4.0"


def test_cli_download_with_a_mirror_url(server, tree, tmp_path, capsys):
    payload = build(tree)
    server.served.payload = payload
    sha = hashlib.sha256(payload).hexdigest()
    args = ["download", "visa", "--root", str(tmp_path / "v"), "--url", _url(server)]
    assert main([*args, "--sha256", sha]) == 2
    assert "--accept-license" in capsys.readouterr().err
    assert main([*args, "--sha256", sha, "--accept-license"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "v")
    assert get_dataset("visa").categories(tmp_path / "v") == ["candle"]
    assert main([*args, "--sha256", "0" * 64]) == 0  # there already: nothing is fetched
    assert "already at" in capsys.readouterr().err and len(server.served.ranges) == 1
    assert main(["download", "visa", "--sha256", sha]) == 2  # a sum alone replaces nothing


@pytest.mark.parametrize("published", ["md5", None])
def test_without_a_published_sha256_the_computed_one_is_recorded(server, tree, tmp_path, published):
    payload = build(tree)
    server.served.payload = payload
    sums = {"md5": hashlib.md5(payload).hexdigest()} if published else {}
    said = []
    download(source(_url(server), **sums), tmp_path / "v", accept=True, say=said.append)
    record = json.loads((tmp_path / "v" / RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    if published:
        assert record["verified"] == "md5" and record["md5"] == sums["md5"]
    else:
        assert record["verified"] is None
        assert any("not verified: no sum is published" in line for line in said)
    with pytest.raises(DataError, match="MD5 is"):  # a wrong MD5 is refused like a SHA-256
        download(source(_url(server), md5="0" * 32), tmp_path / "w", accept=True, say=print)


def test_datasets_without_a_direct_link_print_the_steps(tmp_path, tree, capsys):
    root = tmp_path / "real3d"
    with pytest.raises(ManualDownloadError) as err:
        download(SOURCES["real3d_ad"], root, accept=True)
    text = str(err.value)
    assert "drive.google.com" in text and str(root) in text and "<root>/<category>/gt/" in text
    assert main(["download", "anomaly_shapenet", "--root", str(root)]) == 2
    assert "pan.baidu.com" in capsys.readouterr().err and not root.exists()
    # an archive fetched by hand goes through the same checks (here with the VisA loader)
    archive = tmp_path / "by_hand.tar"
    archive.write_bytes(build(tree))
    done = download(source(None), tmp_path / "v", accept=True, archive=archive, say=print)
    assert done.record["url"] is None and archive.is_file()
    assert _files(tmp_path / "v") == _files(tree)


def test_disk_space_is_checked_before_the_first_byte(server, tmp_path):
    server.served.payload, server.served.length = b"x", 10**16  # 10 PB announced
    src = source(_url(server), b"x")
    with pytest.raises(DataError, match="needs about .* GB free"):
        download(src, tmp_path / "visa", accept=True, retries=0, say=lambda _: None)
    assert not (tmp_path / ".visa.download" / "VisA_test.tar.part").exists()


def test_an_archive_in_another_layout_keeps_the_verified_download(server, tmp_path):
    other = tmp_path / "other"
    (other / "docs").mkdir(parents=True)
    (other / "docs" / "readme.txt").write_text("not VisA")
    (other / "license.txt").write_text("licence")
    payload = build(other)
    server.served.payload = payload
    src, root = source(_url(server), payload), tmp_path / "visa"
    with pytest.raises(DataError, match=r"holding \['docs', 'license.txt'\].*split_csv"):
        download(src, root, accept=True, retries=0, say=lambda _: None)
    assert not root.exists()
    assert (tmp_path / ".visa.download" / "VisA_test.tar").read_bytes() == payload


def test_a_dataset_without_a_loader_yet_is_unpacked_unchecked(server, tree, tmp_path):
    payload = build(tree, "tar", wrap="release")
    server.served.payload, said = payload, []
    src = source(_url(server), payload, dataset="not_registered_yet")
    download(src, tmp_path / "v", accept=True, retries=0, say=said.append)
    assert _files(tmp_path / "v") == _files(tree)  # the single wrapping folder is descended
    assert any("no dataset 'not_registered_yet' is registered" in line for line in said)


def test_a_foreign_non_empty_root_is_not_touched(tmp_path):
    root = tmp_path / "visa"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty but does not hold"):
        download(source("http://127.0.0.1:9/x.tar", b""), root, accept=True, say=print)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", ["mvtec_ad", "visa", "real3d_ad"])
def test_a_missing_root_names_the_download_command(tmp_path, name):
    missing = tmp_path / "no such" / name
    with pytest.raises(DatasetLayoutError) as err:
        get_dataset(name).categories(missing)
    assert str(err.value).endswith(f"fetch it with: bench download {name} --root '{missing}'")
    missing.mkdir(parents=True)  # there but empty: a layout problem, not a missing download
    with pytest.raises(DatasetLayoutError) as err:
        get_dataset(name).categories(missing)
    assert "bench download" not in str(err.value)
    with pytest.raises(DatasetLayoutError) as err:  # built-in data never needs a download
        get_dataset("builtin_visa").categories(tmp_path / "none")
    assert "bench download" not in str(err.value)
