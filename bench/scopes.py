"""Fit scopes: which training images a fit receives (the config side of bench.plan).

- ``per_category`` (default): each category's own training split.
- ``unified``: one fit over the training splits of every configured category of the dataset,
  scored per category (the multi-class / MUAD setting of ADer and Dinomaly).
- ``train_on``: the training split of another dataset (all or some of its categories), scored on
  the configured one (cross-dataset transfer).
- ``shots = k``: k normal training images per category, ``shot_draws`` seeded draws, or the
  images listed in ``shot_files`` (one file per draw).

A draw depends only on the category and the draw index (not on the model seed), and the k-shot
set of a draw holds the (k-1)-shot set of the same draw: seeds and draws vary independently.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import ConfigError
from bench.value_checks import Check, Naming, integer, one_of, optional, paths

SCOPES = ("per_category", "unified")


@dataclass(frozen=True)
class TrainSource:
    """Another dataset's training split, the training data of ``train_on``."""

    dataset: str
    root: str | None = None
    categories: tuple[str, ...] | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        cats = f" ({'+'.join(self.categories)})" if self.categories else ""
        return f"from {self.dataset}{cats}"

    @property
    def slug(self) -> str:
        cats = f".{'+'.join(self.categories)}" if self.categories else ""
        return f"from-{self.dataset}{cats}"


@dataclass(frozen=True)
class FitScope:
    """The resolved fit scope of one detector."""

    scope: str = "per_category"
    train_on: TrainSource | None = None
    shots: int | None = None
    shot_draws: int = 1
    shot_files: tuple[str, ...] = ()

    @property
    def few_shot(self) -> bool:
        return self.shots is not None or bool(self.shot_files)

    @property
    def draws(self) -> int:
        return len(self.shot_files) if self.shot_files else self.shot_draws

    def needs(self) -> list[str]:
        """The scopes a detector must support to run under this one."""
        out = ["train_on"] if self.train_on is not None else [self.scope]
        return out + (["shots"] if self.few_shot else [])

    def label(self, k: int | None = None) -> str:
        """What the leaderboard's ``fit`` column shows, e.g. "unified 4-shot"; references
        listed in files are "4-shot listed", never averaged with seeded draws."""
        parts = [self.train_on.label if self.train_on else self.scope.replace("_", "-")]
        if self.few_shot:
            shot = f"{k or self.shots or 'k'}-shot" + (" listed" if self.shot_files else "")
            parts = [shot] if parts == ["per-category"] else [*parts, shot]
        return " ".join(parts)

    def slug(self, draw: int | None, k: int | None = None) -> str:
        """The run-name part of a job under this scope; empty for ``per_category``."""
        parts = [self.train_on.slug] if self.train_on else []
        if self.scope == "unified":
            parts.append("unified")
        if self.few_shot:
            kind = "list" if self.shot_files else "d"
            parts.append(f"{k or self.shots or 'k'}shot-{kind}{draw}")
        return "-".join(parts)


def parse_train_on(value: Any, name: Naming) -> TrainSource | None:
    """``"visa"``, ``"visa:candle,pcb1"`` or a table ``{dataset, root, categories, options}``;
    ``name`` says where it was set."""
    if value is None:
        return None

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{name('train_on', value)} is not valid; expected {expected}")

    if isinstance(value, str):
        dataset, _, cats = value.partition(":")
        categories = tuple(c.strip() for c in cats.split(",") if c.strip()) or None
        if not dataset.strip():
            raise bad("DATASET[:CATEGORY,...], e.g. visa:candle,pcb1")
        return TrainSource(dataset.strip(), categories=categories)
    if not isinstance(value, dict):
        raise bad("DATASET[:CATEGORY,...] or a table { dataset = ..., root = ... }")
    allowed = {"dataset", "root", "categories", "options"}
    if set(value) - allowed or not isinstance(value.get("dataset"), str):
        raise bad(f"a table with a 'dataset' name, and optionally {sorted(allowed - {'dataset'})}")
    cats = value.get("categories")
    if cats is not None and not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
        raise bad("its categories as a list of names")
    return TrainSource(
        value["dataset"],
        value.get("root"),
        tuple(cats) if cats else None,
        tuple(sorted((value.get("options") or {}).items())),
    )


#: the most seeded draws of k shots (each draw is a job per category and seed)
MAX_SHOT_DRAWS = 1000

#: the checks of the scope fields of a BenchConfig or a DetectorEntry (None: left out)
SCOPE_CHECKS: dict[str, Check] = {
    "scope": optional(one_of(SCOPES)),
    "shots": optional(integer(1)),
    "shot_draws": optional(integer(1, MAX_SHOT_DRAWS)),
    "shot_files": optional(paths),
}


def check_scope_fields(obj: Any, name: Naming) -> None:
    """Type and value checks of the scope fields of a BenchConfig or a DetectorEntry; ``name``
    says where they were set (a flag, or a file's key)."""
    name.check(obj, SCOPE_CHECKS)
    train_on = parse_train_on(obj.train_on, name)
    if train_on is not None:
        from bench.datasets import get_dataset

        try:
            get_dataset(train_on.dataset)
        except ConfigError as err:  # an unknown dataset
            raise ConfigError(f"{name('train_on', obj.train_on)} is not valid: {err}") from None
    if obj.shot_files and (obj.shot_draws or 1) > 1:
        raise ConfigError(
            f"{name.where}: shot_files and shot_draws exclude each other: each listed file is "
            "one draw"
        )
    if train_on is not None and obj.scope == "unified":
        raise ConfigError(
            f"{name.where}: scope 'unified' and train_on exclude each other: a train_on fit is "
            "already one fit shared by every category"
        )


def resolve_scope(cfg: Any, det: Any) -> FitScope:
    """The fit scope of detector entry ``det``: its own training source (``scope`` /
    ``train_on``) replaces the benchmark's as a whole, and so do its listed references
    (``shot_files``) or its seeded draws (``shots`` / ``shot_draws``, each falling back to the
    benchmark's)."""
    own_source = det.scope is not None or det.train_on is not None
    source = det if own_source else cfg
    if det.shot_files is not None:  # listed references replace seeded draws, and back
        shots, draws, files = det.shots, 1, det.shot_files
    elif det.shots is not None or det.shot_draws is not None:
        shots = cfg.shots if det.shots is None else det.shots
        draws, files = det.shot_draws or cfg.shot_draws or 1, None
    else:
        shots, draws, files = cfg.shots, cfg.shot_draws or 1, cfg.shot_files
    listed = tuple(str(Path(f).resolve()) for f in files or ())
    train_on = parse_train_on(source.train_on, Naming(f"detector {det.display!r}"))
    scope = source.scope or "per_category"
    if train_on is not None and scope == "unified":
        raise ConfigError(
            f"detector {det.display!r}: scope 'unified' and train_on exclude each other"
        )
    return FitScope(scope, train_on, shots, 1 if listed else draws, listed)


def draw_references(
    paths: list[str], k: int, category: str, draw: int, where: str = ""
) -> tuple[str, ...]:
    """``k`` of ``paths`` (a category's training images, relative to its dataset root) for draw
    ``draw``: the first k of a permutation seeded by the category and the draw index, sorted."""
    if k > len(paths):
        raise ConfigError(
            f"{where or category}: shots = {k} but its training split holds only "
            f"{len(paths)} image(s)"
        )
    seed = int.from_bytes(hashlib.sha256(f"{category}|{draw}".encode()).digest()[:8], "big")
    order = random.Random(seed).sample(sorted(paths), len(paths))
    return tuple(sorted(order[:k]))


def read_shot_file(path: str | Path) -> list[tuple[int, str]]:
    """The (line number, image path) entries of a reference list: one path per line, relative
    to the dataset root (or absolute); blank lines and ``#`` comments are ignored."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"shot file {path}: cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError:
        raise ConfigError(
            f"shot file {path}: not a text file; expected one image path per line"
        ) from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((n, line))
    if not entries:
        raise ConfigError(f"shot file {path}: lists no image")
    return entries


def references_text(root: str, references: tuple[str, ...], header: str) -> str:
    """A reference list in the format :func:`read_shot_file` reads (``--shot-file`` replays it)."""
    return f"# {header}\n# dataset root: {root}\n" + "".join(f"{r}\n" for r in references)
