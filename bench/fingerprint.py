"""What a result was computed from: a hash of the input files (path, size, modification time)."""

from __future__ import annotations

import hashlib
from pathlib import Path

PATH_KEYS = ("path", "gt_path", "rgb_path", "mask_path")


def data_fingerprint(*datasets) -> str:
    """A hash of every input file of ``datasets`` (its path below the dataset root, its size and
    modification time): a changed, added or removed file changes it."""
    digest = hashlib.sha256()
    for ds in datasets:
        root = Path(ds.root)
        for item in ds.items:
            for key in PATH_KEYS:
                path = item.get(key)
                if path is None:
                    continue
                path = Path(path)
                stat = path.stat()
                rel = path.relative_to(root) if path.is_relative_to(root) else path
                digest.update(f"{key}|{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
