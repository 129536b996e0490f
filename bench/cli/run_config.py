"""``bench run``'s config: the config file (or built-in) with the command line's flags applied."""

from __future__ import annotations

import argparse
from typing import Any

from bench.cli.parser import _value, config_flags
from bench.config import FLAGS, BenchConfig, DatasetEntry, DetectorEntry, load_config, validate
from bench.errors import ConfigError
from bench.scopes import parse_train_on
from bench.value_checks import Naming

#: settings named by their flags (those from the config file were checked as it was read)
COMMAND_LINE = Naming("command line", FLAGS)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = load_config(args.config or "default")
    if args.detectors:
        by_name = {d.display: d for d in cfg.detectors}
        cfg.detectors = [by_name.get(n, DetectorEntry(name=n)) for n in args.detectors]
    if args.datasets:
        by_name = {d.name: d for d in cfg.datasets}
        cfg.datasets = [by_name.get(n, DatasetEntry(name=n)) for n in args.datasets]
        for det in cfg.detectors:  # an explicit dataset choice overrides per-detector lists
            det.datasets = None
    apply_scope_flags(cfg, args)
    train_on_roots: dict[str, str] = {}
    for text in args.root:
        name, sep, path = text.partition("=")
        if not sep:
            if len(cfg.datasets) != 1:
                raise ConfigError(
                    f"--root {text}: name the dataset (DATASET=PATH) when {len(cfg.datasets)} are configured"
                )
            name, path = cfg.datasets[0].name, text
        match = [d for d in cfg.datasets if d.name == name]
        if match:
            match[0].root = path
        if name in train_on_datasets(cfg, args):
            train_on_roots[name] = path
        elif not match:
            raise ConfigError(
                f"--root {text}: dataset {name!r} is neither configured "
                f"({[d.name for d in cfg.datasets]}) nor a train_on dataset"
            )
    for text in args.param:
        key, sep, value = text.partition("=")
        det_name, dot, field = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--param {text}: expected DETECTOR.KEY=VALUE")
        match = [d for d in cfg.detectors if d.display == det_name]
        if not match:
            raise ConfigError(f"--param {text}: detector {det_name!r} is not configured")
        match[0].params = {**match[0].params, field: _value(value)}
    if train_on_roots:
        set_train_on_roots(cfg, train_on_roots)
    if args.categories:
        cfg.categories = args.categories
    for flag in ("image_size", "crop_size"):  # the command line wins over every entry
        value = getattr(args, flag)
        if value is not None:
            for entry in (*cfg.datasets, *cfg.detectors):
                setattr(entry, flag, value)
    if args.resampling is not None:
        for det in cfg.detectors:
            det.resampling = args.resampling
    for f in config_flags():
        value = getattr(args, f.name)
        if value is not None and f.name not in SCOPE_FLAGS:  # the scope group: above
            setattr(cfg, f.name, value)
    validate(cfg, "command line", cli=True)
    return cfg


SCOPE_FLAGS = ("scope", "train_on", "shots", "shot_draws", "shot_files")


def apply_scope_flags(cfg: BenchConfig, args: argparse.Namespace) -> None:
    """Fit-scope flags set the benchmark's scope and override every detector's own."""
    values = {key: getattr(args, key) for key in SCOPE_FLAGS}
    given = {k: v for k, v in values.items() if v is not None}
    source = {k: given[k] for k in ("scope", "train_on") if k in given}
    shots = {k: given[k] for k in ("shots", "shot_draws", "shot_files") if k in given}
    defaults = BenchConfig()
    for group, given_group in (
        (("scope", "train_on"), source),
        (("shots", "shot_draws", "shot_files"), shots),
    ):
        if not given_group:
            continue
        for key in group:  # flags of a group replace the config's whole group
            setattr(cfg, key, given_group.get(key, getattr(defaults, key)))
            for det in cfg.detectors:
                setattr(det, key, None)


def train_on_datasets(cfg: BenchConfig, args: argparse.Namespace) -> set[str]:
    sources = [cfg.train_on, *(d.train_on for d in cfg.detectors)]
    parsed = [parse_train_on(s, COMMAND_LINE) for s in sources if s is not None]
    return {p.dataset for p in parsed}


def set_train_on_roots(cfg: BenchConfig, roots: dict[str, str]) -> None:
    """``--root DATASET=PATH`` for a train_on dataset: its root in every train_on setting."""

    def with_root(value: Any) -> Any:
        src = parse_train_on(value, COMMAND_LINE)
        if src is None or src.dataset not in roots:
            return value
        table = {"dataset": src.dataset, "root": roots[src.dataset]}
        if src.categories:
            table["categories"] = list(src.categories)
        if src.options:
            table["options"] = dict(src.options)
        return table

    cfg.train_on = with_root(cfg.train_on)
    for det in cfg.detectors:
        det.train_on = with_root(det.train_on)
