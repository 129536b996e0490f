"""Fits and jobs: what a plan is made of, and their identities (hashes) and training files.

A fit is detector x params x training images x seed, computed once and shared by every job
that uses it; a job is a fit x an evaluated category (x a few-shot draw). Their hashes name the
results folder's state and records: they must never change for the same configuration.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import __version__
from bench.config import DatasetEntry, DetectorEntry
from bench.datasets import get_dataset
from bench.errors import ConfigError
from bench.fingerprint import data_fingerprint
from bench.metrics import METRIC_VERSION
from bench.registry import get_detector_class


def given_size(value):
    return None if value in (None, "native", "none", 0) else value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Part:
    """The training images of one category: its whole training split, or the listed files
    (paths relative to the dataset root)."""

    dataset: str
    root: str
    category: str
    options: str = "{}"  # the dataset entry's loader options, as sorted JSON
    files: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "root": self.root,
            "category": self.category,
        }
        if self.options != "{}":
            out["options"] = json.loads(self.options)
        if self.files is not None:
            out["files"] = list(self.files)
        return out


@dataclass(frozen=True)
class Fit:
    """One fitted state: detector x params x training images x seed, computed once and shared by
    every job that uses it. A ``references`` stage starts from its ``parent`` fit's state and
    adds one category's references (two-stage detectors, ``bench.capabilities.ReferenceStage``)."""

    detector: DetectorEntry
    params: dict[str, Any]
    seed: int
    batch_size: int
    image_size: Any
    crop_size: Any
    parts: tuple[Part, ...]
    #: fingerprint of the training files (bench.fingerprint)
    data: str
    #: run-name part (empty for per-category fits) and the leaderboard's ``fit`` column
    slug: str = ""
    label: str = "per-category"
    stage: str = "fit"  # "fit" or "references"
    parent: Fit | None = None
    #: named by its content (detector name, training data, seed), not by the config entry's
    #: label: the first stage of a two-stage detector, shared by entries that differ only in
    #: their references (k, draws)
    by_content: bool = False

    @property
    def legacy(self) -> bool:
        """A per-category fit, identified as before fit scopes existed (results stay valid)."""
        return self.stage == "fit" and not self.slug and len(self.parts) == 1

    def config(self) -> dict[str, Any]:
        """Everything that determines the fitted state."""
        test_only = get_detector_class(self.detector.name).test_params
        common = {
            "detector": self.detector.name,
            "params": {k: v for k, v in self.params.items() if k not in test_only},
            "image_size": self.image_size,
            "crop_size": self.crop_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "harness_version": __version__,
            "train_data": self.data,
            # named only when not "tensor": fits from before the choice keep their hashes
            **({"resampling": self.resampling} if self.resampling != "tensor" else {}),
        }
        if self.legacy:
            part = self.parts[0]
            options = json.loads(part.options)
            return {
                **common,
                "dataset": part.dataset,
                "root": part.root,
                "category": part.category,
                **({"dataset_options": options} if options else {}),
            }
        return {
            **common,
            "stage": self.stage,
            "parts": [p.describe() for p in self.parts],
            **({"parent": self.parent.hash} if self.parent is not None else {}),
        }

    @property
    def resampling(self) -> str:
        """How its images are resized: the entry's own, else the detector's (official) one."""
        return self.detector.resampling or get_detector_class(self.detector.name).resampling

    @property
    def hash(self) -> str:
        return _digest(self.config())

    @property
    def name(self) -> str:
        """Where its state lives and what its MLflow run is called."""
        if self.legacy:
            p = self.parts[0]
            return f"{self.detector.display}/{p.dataset}/{p.category}/seed{self.seed}"
        datasets = "+".join(sorted({p.dataset for p in self.parts}))
        cats = {p.category for p in self.parts}
        where = f"{datasets}/{next(iter(cats))}" if len(cats) == 1 else datasets
        if self.by_content:  # the hash beside it in the folder name tells params apart
            return f"{self.detector.name}/{where}/{self.slug}/seed{self.seed}"
        return f"{self.detector.display}/{where}/{self.slug}/seed{self.seed}"

    @property
    def n_categories(self) -> int:
        return len(self.parts)


@dataclass(frozen=True)
class Job:
    detector: DetectorEntry
    dataset: DatasetEntry
    root: str
    category: str
    seed: int
    params: dict[str, Any]
    batch_size: int
    protocol: str
    fit: Fit
    #: fingerprint of the test files (bench.fingerprint): a changed file changes the result
    test_data: str = ""
    #: the few-shot draw (None without shots) and the references the fit got for this category
    draw: int | None = None
    references: tuple[str, ...] = ()
    scope: Any = None  # bench.scopes.FitScope

    @property
    def train_data(self) -> str:
        return self.fit.data

    @property
    def run_name(self) -> str:
        scope = f"/{self.fit.slug}" if self.fit.slug else ""
        return f"{self.detector.display}/{self.dataset.name}/{self.category}{scope}/seed{self.seed}"

    @property
    def slug(self) -> str:
        return self.run_name.replace("/", "__")

    @property
    def image_size(self):
        own = self.detector.image_size
        return given_size(self.dataset.image_size if own is None else own)

    @property
    def crop_size(self):
        own = self.detector.crop_size
        return given_size(self.dataset.crop_size if own is None else own)

    def fit_config(self) -> dict[str, Any]:
        """Everything that determines the fitted state."""
        return self.fit.config()

    def config(self) -> dict[str, Any]:
        """Everything that determines the result."""
        evaluated = {}
        if not self.fit.legacy:  # the fit does not name the evaluated category
            evaluated = {
                "evaluated": {
                    "dataset": self.dataset.name,
                    "root": self.root,
                    "category": self.category,
                    **({"options": self.dataset.options} if self.dataset.options else {}),
                    "draw": self.draw,
                }
            }
        return {
            **self.fit_config(),
            **evaluated,
            "protocol": self.protocol,
            "metric_version": METRIC_VERSION,
            "test_data": self.test_data,
        }

    @property
    def fit_hash(self) -> str:
        return self.fit.hash

    @property
    def config_hash(self) -> str:
        return _digest(self.config())


@functools.cache
def open_split(name: str, root: str, category: str, options: str, split: str):
    """A category's split as indexed at plan time (this also checks its layout)."""
    return get_dataset(name).open(category, split, root, image_size=None, **json.loads(options))


def relative(item: dict[str, Any], root: str | Path) -> str:
    """An item's image path relative to its dataset root, as reference lists name it."""
    path, root = Path(item["path"]), Path(root)
    return (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()


def select(dataset, files: tuple[str, ...] | None):
    """``dataset`` restricted to the items whose relative paths are ``files`` (None: all)."""
    if files is None:
        return dataset
    chosen = set(files)
    subset = copy.copy(dataset)
    subset.items = [it for it in dataset.items if relative(it, dataset.root) in chosen]
    missing = chosen - {relative(it, dataset.root) for it in subset.items}
    if missing:
        raise ConfigError(
            f"{dataset.category}: reference image(s) {sorted(missing)} are not in its training "
            f"split under {dataset.root}"
        )
    return subset


@functools.cache
def split_fingerprint(
    name: str, root: str, category: str, options: str, split: str, files: tuple | None
) -> str:
    return data_fingerprint(select(open_split(name, root, category, options, split), files))


def parts_fingerprint(parts: tuple[Part, ...]) -> str:
    if len(parts) == 1:
        p = parts[0]
        return split_fingerprint(p.dataset, p.root, p.category, p.options, "train", p.files)
    splits = [open_split(p.dataset, p.root, p.category, p.options, "train") for p in parts]
    return data_fingerprint(*(select(ds, p.files) for ds, p in zip(splits, parts)))
