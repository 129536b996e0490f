"""The built-in data: generated once into a cache folder, reused by every later run."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import synthetic_real3d

GENERATOR_VERSION = "1"
#: kinds whose generated data changed since version 1 (their cache folder moves with it)
KIND_VERSIONS = {"points": "2"}
#: the defects of the built-in clouds: the compact bulges and sinks local curvature sees, and
#: the wide, smooth ones it barely sees (where CASL's reconstruction should add to it)
BUILTIN_POINT_DEFECTS = synthetic_real3d.DEFECTS + synthetic_real3d.WIDE_DEFECTS


#: kind -> the module of this package whose ``generate(root)`` writes it (imported on first use)
GENERATORS = {
    "ad": "synthetic_ad",
    "3d": "synthetic_3d",
    "points": "synthetic_real3d",
    "visa": "synthetic_visa",
    "loco": "synthetic_loco",
    "ad2": "synthetic_ad2",
    "folder": "synthetic_folder",
    "btad": "synthetic_btad",
    "mpdd": "synthetic_mpdd",
}


def generator(kind: str) -> Callable[[Path], object]:
    """The function that writes the generated ``kind`` data into a folder."""
    if kind not in GENERATORS:
        raise ValueError(f"built-in data kind must be one of {sorted(GENERATORS)}, got {kind!r}")
    module = importlib.import_module(f"{__package__}.{GENERATORS[kind]}")
    if kind == "points":
        return partial(synthetic_real3d.generate, defects=BUILTIN_POINT_DEFECTS)
    return module.generate


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
    """Root of the generated ``kind`` (a key of ``GENERATORS``) data, generating it if missing.

    Generation writes into a temporary sibling and renames it at the end, so an interrupted
    generation never leaves a half-written dataset behind.
    """
    generate = generator(kind)
    root = generated_root(kind)
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
