"""Expands a config into jobs: detectors x datasets x categories x seeds."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import __version__
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.datasets import get_dataset
from bench.fingerprint import data_fingerprint
from bench.metrics import METRIC_VERSION
from bench.params import check_params
from bench.registry import get_detector_class


def resolved_params(entry: DetectorEntry) -> dict[str, Any]:
    """The detector's constructor defaults overridden by the entry's params (no instantiation)."""
    import inspect

    cls = get_detector_class(entry.name)
    sig = inspect.signature(cls.__init__)
    names = cls.param_names()
    unknown = set(entry.params) - set(names)
    if unknown:
        raise ConfigError(
            f"detector {entry.display!r}: unknown parameter(s) {sorted(unknown)}; {entry.name} takes {names}"
        )
    out = {
        n: sig.parameters[n].default
        for n in names
        if sig.parameters[n].default is not inspect.Parameter.empty
    }
    check_params(cls, entry.params, f"detector {entry.display!r}")
    out.update(entry.params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def seeded_params(entry: DetectorEntry, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``params`` with the job seed as the detector's own ``seed`` parameter, unless the user
    pinned it: a detector's random choices follow ``--seeds``."""
    if "seed" in params and "seed" not in entry.params:
        return {**params, "seed": seed}
    return params


def _size(value):
    return None if value in (None, "native", "none", 0) else value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    #: fingerprints of the training and test files (bench.fingerprint): a changed file changes
    #: the fit identity (training data) or the result identity (test data)
    train_data: str = ""
    test_data: str = ""

    @property
    def run_name(self) -> str:
        return f"{self.detector.display}/{self.dataset.name}/{self.category}/seed{self.seed}"

    @property
    def slug(self) -> str:
        return self.run_name.replace("/", "__")

    @property
    def image_size(self):
        own = self.detector.image_size
        return _size(self.dataset.image_size if own is None else own)

    @property
    def crop_size(self):
        own = self.detector.crop_size
        return _size(self.dataset.crop_size if own is None else own)

    def fit_config(self) -> dict[str, Any]:
        """Everything that determines the fitted state."""
        return {
            "detector": self.detector.name,
            "params": self.params,
            "dataset": self.dataset.name,
            "root": self.root,
            "category": self.category,
            "image_size": self.image_size,
            "crop_size": self.crop_size,
            **({"dataset_options": self.dataset.options} if self.dataset.options else {}),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "harness_version": __version__,
            "train_data": self.train_data,
        }

    def config(self) -> dict[str, Any]:
        """Everything that determines the result."""
        return {
            **self.fit_config(),
            "protocol": self.protocol,
            "metric_version": METRIC_VERSION,
            "test_data": self.test_data,
        }

    @property
    def fit_hash(self) -> str:
        return _digest(self.fit_config())

    @property
    def config_hash(self) -> str:
        return _digest(self.config())


@functools.cache
def split_fingerprints(name: str, root: str, category: str, options: str) -> tuple[str, str]:
    """Fingerprints of a category's training and test files; opening both splits also checks
    the category's layout before any job starts."""
    spec = get_dataset(name)
    opts = json.loads(options)
    return tuple(
        data_fingerprint(spec.open(category, split, root, image_size=None, **opts))
        for split in ("train", "test")
    )


def plan_jobs(cfg: BenchConfig) -> list[Job]:
    split_fingerprints.cache_clear()  # files may have changed since the last plan
    if not cfg.detectors:
        raise ConfigError(
            "no detectors configured: add [[detectors]] to the config or pass --detectors"
        )
    if not cfg.datasets:
        raise ConfigError(
            "no datasets configured: add [[datasets]] to the config or pass --datasets"
        )
    jobs: list[Job] = []
    seen: set[str] = set()
    for det in cfg.detectors:
        cls = get_detector_class(det.name)
        params = resolved_params(det)
        accepted = cls.accepted_modalities()
        chosen = [
            d
            for d in cfg.datasets
            if (det.datasets is None and set(accepted) & set(get_dataset(d.name).modalities))
            or (det.datasets is not None and d.name in det.datasets)
        ]
        if det.datasets is not None:
            missing = set(det.datasets) - {d.name for d in cfg.datasets}
            if missing:
                raise ConfigError(
                    f"detector {det.display!r} names dataset(s) {sorted(missing)} that are not configured"
                )
        for ds in chosen:
            spec = get_dataset(ds.name)
            if not set(accepted) & set(spec.feeds):
                raise ConfigError(
                    f"detector {det.display!r} needs {' or '.join(map(repr, accepted))} input, "
                    f"which {ds.name} cannot provide"
                )
            root = spec.root(ds.root)
            named = ds.categories or cfg.categories
            available = spec.categories(root, named)
            categories = ds.categories or available
            absent = sorted(set(categories) - set(available))
            if absent:
                raise ConfigError(
                    f"dataset {ds.name} at {root} has no categor(ies) {absent}; found {available}"
                )
            if cfg.categories is not None:
                categories = [c for c in categories if c in cfg.categories]
                seen.update(categories)
            for category in categories:
                options = json.dumps(ds.options, sort_keys=True, default=str)
                train_data, test_data = split_fingerprints(
                    ds.name, str(Path(root).resolve()), category, options
                )
                for seed in cfg.seeds:
                    jobs.append(
                        Job(
                            det,
                            ds,
                            str(Path(root).resolve()),
                            category,
                            seed,
                            seeded_params(det, params, seed),
                            cfg.batch_size,
                            cfg.protocol,
                            train_data,
                            test_data,
                        )
                    )
    if cfg.categories is not None and set(cfg.categories) - seen:
        raise ConfigError(
            f"categor(ies) {sorted(set(cfg.categories) - seen)} are in none of the configured datasets"
        )
    if not jobs:
        raise ConfigError(
            "the config yields no job: no dataset feeds the configured detectors' modalities"
        )
    return jobs
