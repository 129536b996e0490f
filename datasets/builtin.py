"""The built-in data: generated once into a cache folder, reused by every later run."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import synthetic_3d, synthetic_ad, synthetic_real3d, synthetic_visa

GENERATOR_VERSION = "1"
#: kinds whose generated data changed since version 1 (their cache folder moves with it)
KIND_VERSIONS = {"points": "2"}
#: the defects of the built-in clouds: the compact bulges and sinks local curvature sees, and
#: the wide, smooth ones it barely sees (where CASL's reconstruction should add to it)
BUILTIN_POINT_DEFECTS = synthetic_real3d.DEFECTS + synthetic_real3d.WIDE_DEFECTS


def cache_dir() -> Path:
    return Path(os.environ.get("ADBENCH_CACHE", Path.home() / ".cache" / "adbench"))


def generated_root(kind: str) -> Path:
    """Where the generated ``kind`` data lives (or will live) in the cache."""
    return cache_dir() / f"builtin_{kind}_v{KIND_VERSIONS.get(kind, GENERATOR_VERSION)}"


@dataclass(frozen=True)
class GeneratedRoot:
    """The default root of a built-in dataset: its cache folder, generated on first use."""

    kind: str
    env: str = "ADBENCH_CACHE"  # the variable that moves the cache

    def __call__(self) -> Path:
        return ensure_generated(self.kind)

    def __str__(self) -> str:
        return f"generated: {generated_root(self.kind)}"


def ensure_generated(kind: str) -> Path:
    """Root of the generated ``kind`` ("ad", "3d", "points" or "visa") data, generating it if
    missing.

    Generation writes into a temporary sibling and renames it at the end, so an interrupted
    generation never leaves a half-written dataset behind.
    """
    generators = {
        "ad": synthetic_ad.generate,
        "3d": synthetic_3d.generate,
        "points": partial(synthetic_real3d.generate, defects=BUILTIN_POINT_DEFECTS),
        "visa": synthetic_visa.generate,
    }
    if kind not in generators:
        raise ValueError(f"built-in data kind must be one of {sorted(generators)}, got {kind!r}")
    root = generated_root(kind)
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
