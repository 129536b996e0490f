"""Expands a config into fits and jobs (bench.scopes decides which training images each fit
receives)."""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.capabilities import ReferenceStage
from bench.config import BenchConfig, DatasetEntry, DetectorEntry
from bench.datasets import get_dataset
from bench.errors import ConfigError
from bench.params import ParamError, check_params
from bench.plan.jobs import (
    Fit,
    Job,
    Part,
    given_size,
    open_split,
    parts_fingerprint,
    relative,
    split_fingerprint,
)
from bench.registry import get_detector_class
from bench.scopes import FitScope, TrainSource, draw_references, read_shot_file, resolve_scope


def resolved_params(entry: DetectorEntry) -> dict[str, Any]:
    """The detector's constructor defaults overridden by the entry's params (no instantiation)."""
    cls = get_detector_class(entry.name)
    sig = inspect.signature(cls.__init__)
    names = cls.param_names()
    unknown = set(entry.params) - set(names)
    if unknown:
        close = {u: difflib.get_close_matches(u, names, n=1) for u in sorted(unknown)}
        hint = "".join(f"; {u}: did you mean {c[0]!r}?" for u, c in close.items() if c)
        raise ConfigError(
            f"detector {entry.display!r}: unknown parameter(s) {sorted(unknown)}{hint}; "
            f"{entry.name} takes {names}"
        )
    out = {
        n: sig.parameters[n].default
        for n in names
        if sig.parameters[n].default is not inspect.Parameter.empty
    }
    where = f"detector {entry.display!r}"
    check_params(cls, entry.params, where)
    out.update(entry.params)
    try:  # what the hints cannot say, then the defaults that depend on other arguments
        cls.validate_params(out)
        out = cls.resolve_params(out)
    except ParamError as err:
        if str(err).startswith(where):
            raise
        raise ParamError(f"{where}: {err}") from err
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def seeded_params(entry: DetectorEntry, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``params`` with the job seed as the detector's own ``seed`` parameter, unless the user
    pinned it: a detector's random choices follow ``--seeds``."""
    if "seed" in params and "seed" not in entry.params:
        return {**params, "seed": seed}
    return params


def check_supported(det: DetectorEntry, cls, scope: FitScope) -> None:
    """The detector takes the scope it is asked to fit under, or a ConfigError names both."""
    if issubclass(cls, ReferenceStage) and scope.train_on is None:
        raise ConfigError(
            f"detector {det.display!r} ({det.name}) is fitted in two stages: set train_on to "
            "the dataset of its first stage (its references come from each evaluated category)"
        )
    missing = [s for s in scope.needs() if s not in cls.fit_scopes]
    if missing:
        raise ConfigError(
            f"detector {det.display!r} ({det.name}) supports the fit scope(s) "
            f"{', '.join(cls.fit_scopes)}; the config asks for {', '.join(missing)}"
        )
    if not issubclass(cls, ReferenceStage) and scope.train_on is not None and scope.few_shot:
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


def check_scoring(cfg: BenchConfig, ds: DatasetEntry) -> None:
    """What a dataset's own scoring needs, checked before anything is fitted: MVTec LOCO's
    sPRO only under the official protocol, MVTec AD 2's private sets only with an export."""
    metrics = get_dataset(ds.name).metrics
    if metrics == "loco" and cfg.protocol != "official":
        raise ConfigError(
            f"dataset {ds.name}: MVTec LOCO AD is scored with the official protocol only "
            f"(sPRO's saturation areas are pixel counts at native resolution), got protocol "
            f"{cfg.protocol!r}"
        )
    if metrics == "mvtec_ad2" and ds.options.get("private_sets") and cfg.export_maps is None:
        raise ConfigError(
            f"dataset {ds.name}: private_sets = true predicts the private test sets only to "
            "write their submission; pass --export-maps DIR (or set export_maps in the config)"
        )


def dataset_categories(cfg: BenchConfig, ds: DatasetEntry) -> tuple[str, list[str]]:
    """(resolved root, evaluated categories) of a dataset entry."""
    spec = get_dataset(ds.name)
    check_scoring(cfg, ds)
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


@dataclass(frozen=True)
class Entry:
    """One detector entry of a config, resolved: its class, parameters and fit scope."""

    cfg: BenchConfig
    det: DetectorEntry
    cls: type
    params: dict[str, Any]
    scope: FitScope
    shot_lists: ShotLists | None


def check_enough_images(det: DetectorEntry, cls, scope: FitScope, parts: tuple[Part, ...]) -> None:
    """A fit receives at least the detector's ``min_train_images`` (one image has no variance)."""
    need = cls.min_train_images
    if need <= 1:
        return
    n = sum(
        len(p.files) if p.files is not None
        else len(open_split(p.dataset, p.root, p.category, p.options, "train").items)
        for p in parts
    )  # fmt: skip
    if n >= need:
        return
    if scope.shots is not None:
        got, fix = f"shots = {scope.shots} gives {n}", f"; use shots >= {need}"
    elif scope.few_shot:
        got, fix = f"its shot file lists {n}", f"; list at least {need}"
    else:
        got, fix = f"its training split holds {n}", ""
    where = ", ".join(f"{p.dataset}/{p.category}" for p in parts)
    raise ConfigError(
        f"detector {det.display!r} ({det.name}) needs at least {need} training images per fit, "
        f"but {got} ({where}){fix}"
    )


def scope_jobs(
    entry: Entry, ds: DatasetEntry, root: str, categories: list[str], seed: int
) -> list[Job]:
    """The jobs of one detector entry, dataset and seed under its fit scope: which fit each
    uses."""
    cfg, det, cls, scope = entry.cfg, entry.det, entry.cls, entry.scope
    params = seeded_params(det, entry.params, seed)
    sizes = [given_size(getattr(ds, k) if getattr(det, k) is None else getattr(det, k))
             for k in ("image_size", "crop_size")]  # fmt: skip
    options = json.dumps(ds.options, sort_keys=True, default=str)
    batch_size = det.batch_size or cfg.batch_size

    def make_fit(parts, slug, label, stage="fit", parent=None, by_content=False) -> Fit:
        parts = tuple(parts)
        if stage == "fit":
            check_enough_images(det, cls, scope, parts)
        return Fit(det, params, seed, batch_size, *sizes, parts, parts_fingerprint(parts),
                   slug, label, stage, parent, by_content)  # fmt: skip

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
        if issubclass(cls, ReferenceStage):  # one first stage for every k, draw and entry label
            base = make_fit(source, scope.train_on.slug, scope.train_on.label, by_content=True)
        else:
            base = make_fit(source, scope.slug(None), scope.label())
        if not scope.few_shot and not issubclass(cls, ReferenceStage):
            return [job(c, base, None, None) for c in categories]
    jobs = []
    for draw in range(scope.draws) if scope.few_shot else [None]:
        refs = {c: references(entry, ds.name, root, c, draw, train_paths) for c in categories}
        parts = {c: Part(ds.name, root, c, options, refs[c]) for c in categories}
        ks = {len(r) for r in refs.values() if r is not None}
        k = ks.pop() if len(ks) == 1 else None
        if base is None and scope.scope == "unified":
            shared = make_fit(parts.values(), scope.slug(draw, k), scope.label(k))
            jobs += [job(c, shared, draw, refs[c]) for c in categories]
            continue
        for c in categories:
            kc = len(refs[c]) if refs[c] is not None else None
            stage = ("fit", None) if base is None else ("references", base)
            fit = make_fit([parts[c]], scope.slug(draw, kc), scope.label(kc), *stage)
            jobs.append(job(c, fit, draw, refs[c]))
    return jobs


def references(
    entry: Entry,
    dataset: str,
    root: str,
    category: str,
    draw: int | None,
    train_paths: Callable[[str], list[str]],
) -> tuple[str, ...] | None:
    """The reference images of ``category`` for few-shot draw ``draw`` (listed in the draw's
    shot file, or drawn); None without shots (the whole training split)."""
    scope, shot_lists = entry.scope, entry.shot_lists
    if shot_lists is not None:
        refs = shot_lists.references(draw, root, category, train_paths(category))
    elif scope.shots is not None:
        paths = train_paths(category)
        if scope.draws > 1 and scope.shots >= len(paths):
            raise ConfigError(
                f"{dataset}/{category}: shots = {scope.shots} takes all {len(paths)} training "
                f"images, so its {scope.draws} draws would be the same; lower shots or "
                "set shot_draws = 1"
            )
        refs = draw_references(paths, scope.shots, category, draw, f"{dataset}/{category}")
    else:
        return None
    if scope.shots is not None and len(refs) != scope.shots:
        raise ConfigError(
            f"shot file {scope.shot_files[draw]} lists {len(refs)} image(s) of {category}, "
            f"but shots = {scope.shots}"
        )
    return refs


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
        scope = resolve_scope(cfg, det)
        check_supported(det, cls, scope)
        shot_lists = ShotLists(scope.shot_files) if scope.shot_files else None
        entry = Entry(cfg, det, cls, resolved_params(det), scope, shot_lists)
        for ds in chosen_datasets(cfg, det, cls):
            root, categories = dataset_categories(cfg, ds)
            seen.update(categories)
            for seed in cfg.seeds:
                jobs += scope_jobs(entry, ds, root, categories, seed)
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
