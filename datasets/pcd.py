"""Reading .pcd point clouds (PCD v0.7) with the header checked against the body.

A reader that trusts the header fills what a cut file lacks: open3d gives the missing points of
a truncated ascii cloud as (0, 0, 0), and scores them. Here the header must be complete and
consistent (FIELDS with x y z; SIZE, TYPE and COUNT one per field; POINTS = WIDTH * HEIGHT) and
the body must hold exactly what it promises: ascii, POINTS lines of sum(COUNT) values; binary,
POINTS * sum(SIZE * COUNT) bytes (a file-size check, then one ``np.fromfile``); binary_compressed,
the two size words, the whole compressed payload and the right uncompressed size (decompressed
by open3d, whose point count is checked again). Every mismatch is a :class:`DataError` naming the
file, what the header says and what the file holds. Points with NaN or infinite coordinates are
an error too, with their count: no detector can score them, and which to drop is the user's call.
See https://pointclouds.org/documentation/tutorials/pcd_file_format.html.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import DataError

KINDS = ("ascii", "binary", "binary_compressed")
REQUIRED = ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "POINTS", "DATA")
TYPES = {("F", 4): "<f4", ("F", 8): "<f8"} | {
    (t, s): f"<{t.lower()}{s}" for t in "IU" for s in (1, 2, 4, 8)
}
MAX_HEADER_LINES = 1000
FIX = "re-download or re-extract it"


@dataclass(frozen=True)
class PcdHeader:
    """The parsed header of a .pcd file; ``offset`` is where its body starts."""

    path: Path
    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    points: int
    data: str
    offset: int

    @property
    def values_per_point(self) -> int:
        return sum(self.counts)

    @property
    def point_bytes(self) -> int:
        return sum(s * c for s, c in zip(self.sizes, self.counts))

    def dtype(self) -> np.dtype:
        """One binary record (the fields in order, ``COUNT`` values each)."""
        return np.dtype(
            [
                (f"f{i}", TYPES[(t, s)], (c,))
                for i, (t, s, c) in enumerate(zip(self.types, self.sizes, self.counts))
            ]
        )

    def column(self, name: str) -> int:
        """Index of field ``name``'s first value in an ascii line."""
        return sum(self.counts[: self.fields.index(name)])


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"point cloud {path} has a malformed .pcd header: {what}; {FIX}")


def _ints(path: Path, key: str, values: list[str], n: int | None = None) -> tuple[int, ...]:
    """A header line's non-negative integers: ``n`` of them (one per field), or exactly one."""
    if n is not None and len(values) != n:
        raise _bad(path, f"{key} has {len(values)} values for {n} FIELDS")
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise _bad(path, f"{key} {' '.join(values)!r} is not whole numbers") from None
    if any(v < 0 for v in out) or (n is None and len(out) != 1):
        raise _bad(path, f"{key} {' '.join(values)!r} is not one non-negative whole number")
    return out


def _header_lines(path: Path) -> tuple[dict[str, list[str]], int]:
    """The header's ``KEY values`` up to and including DATA, and the body's byte offset."""
    entries: dict[str, list[str]] = {}
    with open(path, "rb") as f:
        for _ in range(MAX_HEADER_LINES):
            raw = f.readline()
            if not raw:
                break
            words = raw.decode("ascii", errors="replace").split()
            if not words or words[0].startswith("#"):
                continue
            entries[words[0].upper()] = words[1:]
            if words[0].upper() == "DATA":
                return entries, f.tell()
    raise _bad(path, "no DATA line (the file is empty, cut inside its header or not a .pcd)")


def read_header(path: str | Path) -> PcdHeader:
    """The header of ``path``, checked to be complete and consistent."""
    path = Path(path)
    entries, offset = _header_lines(path)
    missing = [k for k in REQUIRED if k not in entries]
    if missing:
        raise _bad(path, f"no {', '.join(missing)} line")
    fields = tuple(entries["FIELDS"])
    n = len(fields)
    if not {"x", "y", "z"} <= set(fields):
        raise _bad(path, f"FIELDS {' '.join(fields)} lack x y z")
    sizes = _ints(path, "SIZE", entries["SIZE"], n)
    counts = _ints(path, "COUNT", entries.get("COUNT", ["1"] * n), n)
    types = tuple(t.upper() for t in entries["TYPE"])
    if len(types) != n:
        raise _bad(path, f"TYPE has {len(types)} values for {n} FIELDS")
    unknown = [f"{t}{s}" for t, s in zip(types, sizes) if (t, s) not in TYPES]
    if unknown:
        raise _bad(path, f"TYPE/SIZE {unknown[0]} is none of F4 F8 I1-I8 U1-U8")
    (width,) = _ints(path, "WIDTH", entries["WIDTH"])
    (height,) = _ints(path, "HEIGHT", entries["HEIGHT"])
    (points,) = _ints(path, "POINTS", entries["POINTS"])
    if points != width * height:
        raise _bad(path, f"POINTS {points} is not WIDTH x HEIGHT = {width} x {height}")
    data = (entries["DATA"] or [""])[0].lower()
    if data not in KINDS:
        raise _bad(path, f"DATA {data!r} is none of {', '.join(KINDS)}")
    return PcdHeader(path, fields, sizes, types, counts, width, height, points, data, offset)


def _mismatch(header: PcdHeader, expected: int, actual: int, unit: str) -> DataError:
    """The body holds ``actual`` ``unit`` where the header promises ``expected``."""
    what = "is truncated" if actual < expected else "holds more data than its header says"
    return DataError(
        f"point cloud {header.path} {what}: its header says {header.points} points "
        f"({expected} {unit}), the file holds {actual} {unit}; {FIX}"
    )


def _binary_size(header: PcdHeader, body: int) -> None:
    """Checks that a binary body of ``body`` bytes holds exactly ``points`` records."""
    if body != header.points * header.point_bytes:
        raise _mismatch(header, header.points * header.point_bytes, body, "bytes of binary data")


def _compressed_sizes(header: PcdHeader, body: int) -> None:
    """Checks a binary_compressed body of ``body`` bytes: its two size words, the uncompressed
    size against the header's, the compressed payload against the file."""
    expected = header.points * header.point_bytes
    if body < 8:
        raise DataError(
            f"point cloud {header.path} is truncated: its header says {header.points} points "
            f"of binary_compressed data, the file holds {body} bytes of data (not even the two "
            f"size words); {FIX}"
        )
    with open(header.path, "rb") as f:
        f.seek(header.offset)
        compressed, uncompressed = struct.unpack("<II", f.read(8))
    if uncompressed != expected:
        raise DataError(
            f"point cloud {header.path} is corrupt: its header says {header.points} points "
            f"({expected} bytes of data), its compressed data says {uncompressed} bytes; {FIX}"
        )
    if body - 8 != compressed:
        raise _mismatch(header, compressed, body - 8, "bytes of compressed data")


def check_pcd(path: str | Path) -> PcdHeader:
    """Checks that ``path``'s body holds what its header promises, without decoding it: a size
    check for binary data, a count of the values for ascii."""
    header = read_header(path)
    body = header.path.stat().st_size - header.offset
    if header.data == "binary":
        _binary_size(header, body)
    elif header.data == "binary_compressed":
        _compressed_sizes(header, body)
    else:
        with open(header.path, "rb") as f:
            f.seek(header.offset)
            values = len(f.read().split())
        expected = header.points * header.values_per_point
        if values != expected:
            raise _mismatch(header, expected, values, "ascii values")
    return header


def _bad_line(header: PcdHeader, lines: list[str]) -> str | None:
    """Where an ascii body's lines stop having ``values_per_point`` values, for messages."""
    n = header.values_per_point
    rows = [line.split() for line in lines if line.strip()]
    bad = next((k for k, row in enumerate(rows) if len(row) != n), None)
    if bad is None:
        return None
    return f"point {bad + 1} of {header.points} has {len(rows[bad])} values, its header says {n}"


def _ascii_xyz(header: PcdHeader) -> np.ndarray:
    """[N, 3] float64 of an ascii body: ``points`` lines of ``values_per_point`` numbers."""
    with open(header.path, "rb") as f:
        f.seek(header.offset)
        body = f.read()
    if not body.strip():
        raise _mismatch(header, header.points, 0, "lines of ascii data")
    try:
        table = np.loadtxt(io.BytesIO(body), dtype=np.float64, ndmin=2, comments=None)
    except ValueError as err:
        lines = body.decode("ascii", errors="replace").splitlines()
        rows = sum(1 for line in lines if line.strip())
        if rows < header.points:  # a cut file: its last line is usually cut too
            raise _mismatch(header, header.points, rows, "lines of ascii data") from err
        where = _bad_line(header, lines) or f"its data is not numbers ({err})"
        raise DataError(
            f"point cloud {header.path} is truncated or malformed: {where} "
            f"({' '.join(header.fields)}); {FIX}"
        ) from err
    if table.shape[0] and table.shape[1] != header.values_per_point:
        raise DataError(
            f"point cloud {header.path} is malformed: its lines have {table.shape[1]} values, "
            f"its header says {header.values_per_point} ({' '.join(header.fields)}); {FIX}"
        )
    if table.shape[0] != header.points:
        raise _mismatch(header, header.points, table.shape[0], "lines of ascii data")
    return table[:, [header.column(a) for a in "xyz"]]


def _binary_xyz(header: PcdHeader) -> np.ndarray:
    """[N, 3] of a binary body, after checking its size."""
    _binary_size(header, header.path.stat().st_size - header.offset)
    records = np.fromfile(header.path, header.dtype(), header.points, offset=header.offset)
    return np.stack([records[f"f{header.fields.index(a)}"][:, 0] for a in "xyz"], 1)


def _compressed_xyz(header: PcdHeader) -> np.ndarray:
    """[N, 3] of a binary_compressed body (sizes checked here, LZF decompressed by open3d)."""
    import open3d as o3d

    _compressed_sizes(header, header.path.stat().st_size - header.offset)
    kinds = {f"{header.types[i]}{header.sizes[i]}" for i in map(header.fields.index, "xyz")}
    if kinds != {"F4"}:
        raise DataError(
            f"point cloud {header.path}: binary_compressed x y z of TYPE/SIZE "
            f"{' '.join(sorted(kinds))} cannot be read (only F 4); save it as binary or ascii"
        )
    cloud = o3d.io.read_point_cloud(str(header.path), format="pcd")
    points = np.asarray(cloud.points)
    if len(points) != header.points:  # open3d gives no points when LZF decompression fails
        raise DataError(
            f"point cloud {header.path} is corrupt: its header says {header.points} points, "
            f"its compressed data decompresses to {len(points)}; {FIX}"
        )
    return points


def read_pcd(path: str | Path) -> np.ndarray:
    """Points [N, 3] float32 of a .pcd file whose body holds exactly what its header promises
    and whose coordinates are all finite; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"point cloud {path} does not exist")
    header = read_header(path)
    if header.points == 0:
        raise DataError(f"point cloud {path} holds no points (its header says POINTS 0)")
    read = {"ascii": _ascii_xyz, "binary": _binary_xyz, "binary_compressed": _compressed_xyz}
    points = np.asarray(read[header.data](header), dtype=np.float32)
    check_finite(points, f"point cloud {path}")
    return points


def check_finite(points: np.ndarray, what: str) -> None:
    """Raises a :class:`DataError` naming ``what`` if a point has a NaN or infinite coordinate."""
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        xyz = " ".join(f"{v:g}" for v in points[first])
        raise DataError(
            f"{what} has {int(bad.sum())} of {len(points)} points with NaN or infinite "
            f"coordinates (the first is point {first + 1}: {xyz}); "
            "remove those points or re-export the cloud"
        )
