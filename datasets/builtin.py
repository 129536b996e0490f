"""The built-in data: generated once into a cache folder, reused by every later run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import synthetic_3d, synthetic_ad, synthetic_real3d

GENERATOR_VERSION = "1"


def cache_dir() -> Path:
    return Path(os.environ.get("ADBENCH_CACHE", Path.home() / ".cache" / "adbench"))


def ensure_generated(kind: str) -> Path:
    """Root of the generated ``kind`` ("ad", "3d" or "points") data, generating it if missing.

    Generation writes into a temporary sibling and renames it at the end, so an interrupted
    generation never leaves a half-written dataset behind.
    """
    generators = {
        "ad": synthetic_ad.generate,
        "3d": synthetic_3d.generate,
        "points": synthetic_real3d.generate,
    }
    if kind not in generators:
        raise ValueError(f"built-in data kind must be one of {sorted(generators)}, got {kind!r}")
    root = cache_dir() / f"builtin_{kind}_v{GENERATOR_VERSION}"
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generators[kind](tmp)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
