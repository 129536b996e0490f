"""Expands a config into fits and jobs.

A fit is detector x params x training images x seed (bench.scopes decides which images); a job
is a fit x an evaluated category (x a few-shot draw). Jobs that share a fit share its state.
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
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.datasets import get_dataset
from bench.fingerprint import data_fingerprint
from bench.metrics import METRIC_VERSION
from bench.params import check_params
from bench.registry import get_detector_class
from bench.scopes import (
    FitScope,
    TrainSource,
    draw_references,
    read_shot_file,
    resolve_scope,
)


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
    out = cls.resolve_params(out)
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
    adds one category's references (two-stage detectors, ``Detector.reference_stage``)."""

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
        return _size(self.dataset.image_size if own is None else own)

    @property
    def crop_size(self):
        own = self.detector.crop_size
        return _size(self.dataset.crop_size if own is None else own)

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


def check_supported(det: DetectorEntry, cls, scope: FitScope) -> None:
    """The detector takes the scope it is asked to fit under, or a ConfigError names both."""
    if cls.reference_stage and scope.train_on is None:
        raise ConfigError(
            f"detector {det.display!r} ({det.name}) is fitted in two stages: set train_on to "
            "the dataset of its first stage (its references come from each evaluated category)"
        )
    missing = [s for s in scope.needs() if s not in cls.scopes]
    if missing:
        raise ConfigError(
            f"detector {det.display!r} ({det.name}) supports the fit scope(s) "
            f"{', '.join(cls.scopes)}; the config asks for {', '.join(missing)}"
        )
    if not cls.reference_stage and scope.train_on is not None and scope.few_shot:
        raise ConfigError(
            f"detector {det.display!r} ({det.name}) is fitted in one stage: train_on and shots "
            "together need a two-stage detector (one with a reference stage)"
        )


def _serves(spec) -> str:
    extra = [m for m in spec.feeds if m not in spec.modalities]
    fed = f" (and feeds {', '.join(extra)} to a detector entry that names it in datasets)"
    return f"{spec.name} serves {', '.join(spec.modalities)}" + (fed if extra else "")


def chosen_datasets(cfg: BenchConfig, det: DetectorEntry, cls) -> list[DatasetEntry]:
    accepted = cls.accepted_modalities(det.params)
    if det.datasets is not None:
        missing = set(det.datasets) - {d.name for d in cfg.datasets}
        if missing:
            raise ConfigError(
                f"detector {det.display!r} names dataset(s) {sorted(missing)} that are not configured"
            )
    chosen = [
        d
        for d in cfg.datasets
        if (det.datasets is None and set(accepted) & set(get_dataset(d.name).modalities))
        or (det.datasets is not None and d.name in det.datasets)
    ]
    for ds in chosen:
        if not set(accepted) & set(get_dataset(ds.name).feeds):
            raise ConfigError(
                f"detector {det.display!r} needs {' or '.join(map(repr, accepted))} input, "
                f"which {ds.name} cannot provide"
            )
    return chosen


def dataset_categories(cfg: BenchConfig, ds: DatasetEntry) -> tuple[str, list[str]]:
    """(resolved root, evaluated categories) of a dataset entry."""
    spec = get_dataset(ds.name)
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
    return str(Path(root).resolve()), categories


def source_parts(src: TrainSource, det: DetectorEntry, cls) -> tuple[Part, ...]:
    """The training splits of a ``train_on`` dataset."""
    spec = get_dataset(src.dataset)
    accepted = cls.accepted_modalities(det.params)
    if not set(accepted) & set(spec.feeds):
        raise ConfigError(
            f"detector {det.display!r}: train_on dataset {src.dataset} cannot provide "
            f"{' or '.join(accepted)} input"
        )
    root = spec.root(src.root)
    try:
        available = spec.categories(root, list(src.categories) if src.categories else None)
    except FileNotFoundError as err:  # DatasetLayoutError: say which setting it comes from
        raise ConfigError(
            f"train_on dataset {src.dataset} (root {root}; set it with --root "
            f"{src.dataset}=PATH or train_on = {{ dataset = ..., root = ... }}): {err}"
        ) from err
    absent = sorted(set(src.categories or ()) - set(available))
    if absent:
        raise ConfigError(
            f"train_on dataset {src.dataset} at {root} has no categor(ies) {absent}; "
            f"found {available}"
        )
    options = json.dumps(dict(src.options), sort_keys=True, default=str)
    resolved = str(Path(root).resolve())
    return tuple(Part(src.dataset, resolved, c, options) for c in (src.categories or available))


class ShotLists:
    """The reference images listed in ``shot_files`` (one file per draw), matched against the
    evaluated categories' training splits; lines matching none are an error."""

    def __init__(self, files: tuple[str, ...]) -> None:
        self.files = files
        self.entries = [read_shot_file(f) for f in files]
        self.matched: list[set[int]] = [set() for _ in files]
        self.categories: set[str] = set()

    def references(self, draw: int, root: str, category: str, paths: list[str]) -> tuple[str, ...]:
        known, found = set(paths), []
        self.categories.add(category)
        for n, line in self.entries[draw]:
            rel = Path(line)
            if rel.is_absolute() and rel.resolve().is_relative_to(Path(root).resolve()):
                rel = rel.resolve().relative_to(Path(root).resolve())
            if rel.as_posix() in known:
                found.append(rel.as_posix())
                self.matched[draw].add(n)
        if not found:
            raise ConfigError(
                f"shot file {self.files[draw]} lists no training image of category {category} "
                f"(paths relative to {root}, e.g. {sorted(paths)[0]})"
            )
        return tuple(sorted(set(found)))

    def check_all_matched(self) -> None:
        """Every line of an evaluated category (the first part of a relative path) names one
        of its training images; lines of other categories are left alone (a list of every
        category, such as the shipped official ones, run on some of them)."""
        for path, entries, matched in zip(self.files, self.entries, self.matched):
            for n, line in entries:
                rel = Path(line)
                other = not rel.is_absolute() and rel.parts[0] not in self.categories
                if n not in matched and not other:
                    raise ConfigError(
                        f"shot file {path} line {n}: {line} is not a training image of any "
                        "evaluated category (expected a path relative to the dataset root, as "
                        "a job record's references list them)"
                    )


def scope_jobs(
    cfg: BenchConfig,
    det: DetectorEntry,
    cls,
    scope: FitScope,
    ds: DatasetEntry,
    root: str,
    categories: list[str],
    seed: int,
    params: dict[str, Any],
    shot_lists: ShotLists | None,
) -> list[Job]:
    """The jobs of one detector, dataset and seed under ``scope``: which fit each uses."""
    image_size = _size(ds.image_size if det.image_size is None else det.image_size)
    crop_size = _size(ds.crop_size if det.crop_size is None else det.crop_size)
    options = json.dumps(ds.options, sort_keys=True, default=str)
    batch_size = det.batch_size or cfg.batch_size

    def make_fit(parts, slug, label, stage="fit", parent=None, by_content=False) -> Fit:
        return Fit(
            det, params, seed, batch_size, image_size, crop_size, tuple(parts),
            parts_fingerprint(tuple(parts)), slug, label, stage, parent, by_content,
        )  # fmt: skip

    def job(category: str, fit: Fit, draw: int | None, refs: tuple[str, ...] | None) -> Job:
        test = split_fingerprint(ds.name, root, category, options, "test", None)
        return Job(
            det, ds, root, category, seed, params, batch_size, cfg.protocol, fit, test,
            draw, refs or (), scope,
        )  # fmt: skip

    def train_paths(category: str) -> list[str]:
        split = open_split(ds.name, root, category, options, "train")
        return [relative(it, root) for it in split.items]

    base = None
    if scope.train_on is not None:
        source = source_parts(scope.train_on, det, cls)
        if cls.reference_stage:  # one first stage for every k, draw and entry label
            base = make_fit(source, scope.train_on.slug, scope.train_on.label, by_content=True)
        else:
            base = make_fit(source, scope.slug(None), scope.label())
        if not scope.few_shot and not cls.reference_stage:
            return [job(c, base, None, None) for c in categories]
    jobs = []
    for draw in range(scope.draws) if scope.few_shot else [None]:
        refs: dict[str, tuple[str, ...] | None] = {}
        for c in categories:
            if shot_lists is not None:
                refs[c] = shot_lists.references(draw, root, c, train_paths(c))
            elif scope.shots is not None:
                paths = train_paths(c)
                if scope.draws > 1 and scope.shots >= len(paths):
                    raise ConfigError(
                        f"{ds.name}/{c}: shots = {scope.shots} takes all {len(paths)} training "
                        f"images, so its {scope.draws} draws would be the same; lower shots or "
                        "set shot_draws = 1"
                    )
                refs[c] = draw_references(paths, scope.shots, c, draw, f"{ds.name}/{c}")
            else:
                refs[c] = None
            if scope.shots is not None and refs[c] is not None and len(refs[c]) != scope.shots:
                raise ConfigError(
                    f"shot file {scope.shot_files[draw]} lists {len(refs[c])} image(s) of {c}, "
                    f"but shots = {scope.shots}"
                )
        parts = {c: Part(ds.name, root, c, options, refs[c]) for c in categories}
        ks = {len(r) for r in refs.values() if r is not None}
        k = ks.pop() if len(ks) == 1 else None
        if base is None and scope.scope == "unified":
            shared = make_fit(parts.values(), scope.slug(draw, k), scope.label(k))
            jobs += [job(c, shared, draw, refs[c]) for c in categories]
            continue
        for c in categories:
            kc = len(refs[c]) if refs[c] is not None else None
            if base is None:
                fit = make_fit([parts[c]], scope.slug(draw, kc), scope.label(kc))
            else:
                fit = make_fit(
                    [parts[c]], scope.slug(draw, kc), scope.label(kc), "references", base
                )
            jobs.append(job(c, fit, draw, refs[c]))
    return jobs


def plan_jobs(cfg: BenchConfig) -> list[Job]:
    open_split.cache_clear()  # files may have changed since the last plan
    split_fingerprint.cache_clear()
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
        scope = resolve_scope(cfg, det)
        check_supported(det, cls, scope)
        shot_lists = ShotLists(scope.shot_files) if scope.shot_files else None
        for ds in chosen_datasets(cfg, det, cls):
            root, categories = dataset_categories(cfg, ds)
            seen.update(categories)
            for seed in cfg.seeds:
                jobs += scope_jobs(
                    cfg, det, cls, scope, ds, root, categories, seed,
                    seeded_params(det, params, seed), shot_lists,
                )  # fmt: skip
        if shot_lists is not None:
            shot_lists.check_all_matched()
    if cfg.categories is not None and set(cfg.categories) - seen:
        raise ConfigError(
            f"categor(ies) {sorted(set(cfg.categories) - seen)} are in none of the configured datasets"
        )
    if not jobs:
        wants = "; ".join(
            f"{d.display} takes {' or '.join(get_detector_class(d.name).accepted_modalities(d.params))}"
            for d in cfg.detectors
        )
        serves = "; ".join(_serves(get_dataset(d.name)) for d in cfg.datasets)
        raise ConfigError(
            f"the config yields no job: no dataset feeds the configured detectors' modalities "
            f"({wants}; {serves})"
        )
    return jobs
