"""Command line: ``bench list``, ``bench run``, ``bench report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.config import (
    BenchConfig,
    DatasetEntry,
    DetectorEntry,
    load_config,
    validate,
)
from bench.datasets.common import RESAMPLINGS
from bench.errors import USER_ERRORS, ConfigError, DataError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return seeds


def _value(text: str) -> Any:
    """A CLI value as TOML would read it (numbers, booleans, lists), else a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench", description="Benchmark anomaly detectors on MVTec AD / MVTec 3D-AD."
    )
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="registered detectors and datasets")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    run = sub.add_parser("run", help="run a benchmark (resumes: finished jobs are skipped)")
    run.add_argument(
        "--config", "-c", help="TOML file or built-in config name (default: 'default')"
    )
    run.add_argument("--name", help="benchmark name: results/<name>/")
    run.add_argument(
        "--detectors", type=_csv, help="comma-separated detector names (replaces the config's)"
    )
    run.add_argument(
        "--datasets", type=_csv, help="comma-separated dataset names (replaces the config's)"
    )
    run.add_argument(
        "--categories",
        type=_csv,
        help="comma-separated categories, kept in whichever datasets have them",
    )
    run.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="[DATASET=]PATH",
        help="dataset root folder (repeatable; DATASET= may be left out with one dataset)",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="DETECTOR.KEY=VALUE",
        help="override a detector parameter (repeatable)",
    )
    run.add_argument("--seeds", type=_seeds, help="comma-separated integer seeds, e.g. 0,1,2")
    fit = run.add_argument_group(
        "fit scope", "which training images each fit receives (for every detector)"
    )
    fit.add_argument(
        "--scope",
        choices=["per_category", "unified"],
        help="per_category (default): a fit per category; unified: one fit over every category",
    )
    fit.add_argument(
        "--train-on",
        metavar="DATASET[:CATEGORY,...]",
        help="fit on another dataset's training split (its root: --root DATASET=PATH)",
    )
    fit.add_argument("--shots", type=int, help="k normal training images per category")
    fit.add_argument("--shot-draws", type=int, help="seeded draws of the k shots (default 1)")
    fit.add_argument(
        "--shot-file",
        action="append",
        metavar="FILE",
        help="reference images listed in FILE (paths relative to the dataset root), one file "
        "per draw (repeatable)",
    )
    fit.add_argument(
        "--train-log-every",
        type=int,
        metavar="N",
        help="trained detectors log loss, lr and images/s to MLflow every N steps (default 1)",
    )
    ex = run.add_argument_group("executor", "where the jobs run (default: this process)")
    ex.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="local (default): one job at a time here; ray: each job a Ray task on a cluster",
    )
    ex.add_argument(
        "--address",
        dest="ray_address",
        metavar="ADDRESS",
        help="the Ray cluster to join (HOST:PORT, ray://HOST:10001, or auto: the one started on "
        "this machine); default: a new local Ray instance using every CPU and GPU here",
    )
    ex.add_argument(
        "--gpus-per-job",
        type=float,
        help="GPUs a Ray job requests (0.25: four jobs share a GPU; default 1 on a cluster "
        "with GPUs, else 0)",
    )
    ex.add_argument("--cpus-per-job", type=float, help="CPUs a Ray job requests (default 1)")
    ex.add_argument(
        "--max-retries",
        type=int,
        help="retries of a Ray job whose worker or node was lost (default 3); a job failing "
        "by itself is recorded as failed, never retried",
    )
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--num-workers", type=int)
    run.add_argument(
        "--image-size",
        type=_value,
        help="model input size for every dataset and detector (int, [h,w] or native)",
    )
    run.add_argument(
        "--crop-size",
        type=_value,
        help="centre crop after resizing, for every dataset and detector (int, [h,w] or none); "
        "only the crop is scored",
    )
    run.add_argument(
        "--resampling",
        choices=RESAMPLINGS,
        help="how every detector's images are resized (default: each detector's official one)",
    )
    run.add_argument("--protocol", choices=["official", "fast"])
    run.add_argument("--output", help="results folder (default: results)")
    run.add_argument(
        "--export-maps",
        metavar="DIR",
        help="write every anomaly map to DIR/<detector>/<dataset>/seedN/<category>/test/<defect>/<id>.tiff",
    )
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite store)",
    )
    run.add_argument("--experiment", help="MLflow experiment name (default: adbench/<name>)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--force", action="store_true", help="re-run jobs that already have results")

    ev = sub.add_parser("evaluate", help="score anomaly maps stored in the official layout")
    ev.add_argument(
        "--maps", required=True, help="folder: <maps>/<category>/test/<defect>/<id>.tiff"
    )
    ev.add_argument("--data", required=True, help="MVTec AD or MVTec 3D-AD root (ground truth)")
    ev.add_argument(
        "--categories", type=_csv, help="comma-separated (default: every category with maps)"
    )
    ev.add_argument(
        "--scores",
        action="append",
        default=[],
        help="CSV with category,defect,id,score (repeatable)",
    )
    ev.add_argument("--protocol", choices=["official", "fast"], default="official")
    ev.add_argument("--pro-limit", type=float, default=0.3, help="AU-PRO integration limit (FPR)")
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--output", help="metrics file stem (default: <maps>/metrics -> .json and .csv)"
    )

    syn = sub.add_parser(
        "sync", help="upload finished jobs that are missing on the MLflow server (after an outage)"
    )
    syn.add_argument("--name", default="default", help="benchmark name: results/<name>/")
    syn.add_argument("--output", default="results")
    syn.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite store)",
    )
    syn.add_argument("--experiment", help="MLflow experiment name (default: adbench/<name>)")

    rep = sub.add_parser("report", help="leaderboard (Markdown, CSV) from the results folder")
    rep.add_argument("--name", default="default")
    rep.add_argument("--output", default="results")

    lnk = sub.add_parser(
        "links", help="MLflow UI links (model-training view) of the latest benchmark run"
    )
    lnk.add_argument("--name", help="benchmark name (default: the latest of every benchmark)")
    lnk.add_argument("--output", default="results", help="results folder holding mlflow.db")
    lnk.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite store)",
    )
    lnk.add_argument("--base-url", default="http://127.0.0.1:5000", help="where the UI is served")
    return p


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
    for attr in (
        "name",
        "seeds",
        "device",
        "batch_size",
        "num_workers",
        "protocol",
        "output",
        "tracking_uri",
        "experiment",
        "export_maps",
        "executor",
        "ray_address",
        "gpus_per_job",
        "cpus_per_job",
        "max_retries",
    ):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    validate(cfg, "command line")
    return cfg


SCOPE_FLAGS = ("scope", "train_on", "shots", "shot_draws", "shot_files")


def apply_scope_flags(cfg: BenchConfig, args: argparse.Namespace) -> None:
    """Fit-scope flags set the benchmark's scope and override every detector's own."""
    values = {
        "scope": args.scope,
        "train_on": args.train_on,
        "shots": args.shots,
        "shot_draws": args.shot_draws,
        "shot_files": args.shot_file,
    }
    given = {k: v for k, v in values.items() if v is not None}
    if args.train_log_every is not None:
        cfg.train_log_every = args.train_log_every
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
    from bench.scopes import parse_train_on

    sources = [cfg.train_on, *(d.train_on for d in cfg.detectors)]
    parsed = [parse_train_on(s, "config") for s in sources if s is not None]
    return {p.dataset for p in parsed}


def set_train_on_roots(cfg: BenchConfig, roots: dict[str, str]) -> None:
    """``--root DATASET=PATH`` for a train_on dataset: its root in every train_on setting."""
    from bench.scopes import parse_train_on

    def with_root(value: Any) -> Any:
        src = parse_train_on(value, "config")
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


def cmd_list(args: argparse.Namespace) -> int:
    from bench.datasets import list_datasets
    from bench.registry import list_detectors

    infos, datasets = list_detectors(), list_datasets()
    if args.json:
        detectors = [
            {
                "name": i.name,
                "modality": i.modality,
                "modalities": list(i.modalities),
                "scopes": list(i.cls.scopes),
                "source": i.source,
                "summary": i.summary,
            }
            for i in infos
        ]
        sets = [
            {
                "name": d.name,
                "modalities": list(d.modalities),
                "feeds": list(d.feeds),
                "default_root": d.spec.root_text,
                "root_env": d.spec.root_env,
                "loader": f"{d.spec.loader.__module__}.{d.spec.loader.__qualname__}",
                "source": d.source,
            }
            for d in datasets
        ]
        print(json.dumps({"detectors": detectors, "datasets": sets}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title="Registered detectors")
    for col in ("name", "modality", "scopes", "source", "summary"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.name, ", ".join(i.modalities), ", ".join(i.cls.scopes), i.source, i.summary)
    console.print(table)
    table = Table(title="Registered datasets")
    for col in ("name", "modalities (also feeds)", "default root", "root env", "source"):
        table.add_column(col)
    for d in datasets:
        extra = [m for m in d.feeds if m not in d.modalities]
        fed = ", ".join(d.modalities) + (f" (+ {', '.join(extra)})" if extra else "")
        table.add_row(d.name, fed, d.spec.root_text, d.spec.root_env or "", d.source)
    console.print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.progress import console
    from bench.report import print_leaderboard, write_report
    from bench.runner import run_benchmark

    cfg = config_from_args(args)
    records, failed = run_benchmark(cfg, force=args.force, track=not args.no_tracking)
    if records:
        print_leaderboard(records)
        paths = write_report(cfg.output, cfg.name)
        console.print(f"leaderboard: {paths['markdown']}  ({paths['csv']})")
    if failed:
        console.print(f"[red]{len(failed)} job(s) failed:[/] {', '.join(failed)}")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import print_leaderboard, write_report
    from bench.results import ResultStore

    records = ResultStore(args.output, args.name).records()  # read once: one warning a file
    paths = write_report(args.output, args.name, records)
    print_leaderboard(records)
    print(f"leaderboard: {paths['markdown']}  ({paths['csv']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.rescore import evaluate_maps, records_table
    from bench.results import write_json
    from bench.system import resolve_device

    device = str(resolve_device(args.device))
    records = evaluate_maps(
        args.maps, args.data, args.categories, args.scores, args.protocol, args.pro_limit, device
    )
    table = records_table(records)
    stem = Path(args.output) if args.output else Path(args.maps) / "metrics"
    write_json(stem.with_suffix(".json"), records)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    console = Console(width=None if sys.stdout.isatty() else 160)
    out = Table(
        title=f"{args.maps}: protocol {records[0]['protocol']}, metric version {records[0]['metric_version']}"
    )
    cols = ["category", "defect", "image_auroc", "pixel_auroc", "au_pro", "pixel_ap", "image_ap"]
    if "point_auroc" in table:  # unorganised clouds: object- and point-level metrics
        cols = ["category", "defect", "image_auroc", "point_auroc", "point_ap", "image_ap"]
    for col in cols:
        out.add_column(col, no_wrap=True)
    for row in table.itertuples(index=False):
        out.add_row(
            *(
                getattr(row, c) if isinstance(getattr(row, c), str) else f"{getattr(row, c):.4f}"
                for c in cols
            )
        )
    console.print(out)
    for rec in records:
        for warning in rec["warnings"]:
            console.print(f"[yellow]{warning}[/]")
    console.print(f"metrics: {stem.with_suffix('.json')}  ({stem.with_suffix('.csv')})")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from bench.progress import console
    from bench.results import ResultStore
    from bench.tracking import Tracker, sync

    store = ResultStore(args.output, args.name)
    records = store.records()  # read once: one warning a file
    if not records:
        raise DataError(f"no finished jobs under {store.root / 'jobs'}; nothing to sync")
    cfg = BenchConfig(
        name=args.name,
        output=args.output,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
    )
    with Tracker.from_config(cfg, open_parent=False) as tracker:
        if tracker.failed:
            return 1
        uploaded, present = sync(store, tracker, records)
    if tracker.failed:
        return 1
    where = ""
    if uploaded:
        kind = "a new parent run" if tracker.owns_parent else "the benchmark's parent run"
        where = f" (under {kind}, {tracker.parent_id})"
    console.print(
        f"synced {args.name}: {uploaded} job(s) uploaded, {present} already there{where}",
        soft_wrap=True,
    )
    return 0


def cmd_links(args: argparse.Namespace) -> int:
    import os

    from bench.tracking import default_tracking_uri
    from bench.ui import benchmark_links

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        db = Path(args.output) / "mlflow.db"
        if not db.is_file():
            print(f"no MLflow store at {db} yet: run `make bench` (or `bench run`) first")
            return 1
        uri = default_tracking_uri(args.output)
    links = benchmark_links(uri, args.base_url, args.name)
    if not links:
        which = f"adbench/{args.name}" if args.name else "any adbench/* experiment"
        print(f"no benchmark run with job runs in {which} at {uri}: run `make bench` first")
        return 1
    for label, url in links:
        print(f"{label}\n  {url}")
    return 0


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "sync": cmd_sync,
    "links": cmd_links,
}


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user's mistake (:data:`bench.errors.USER_ERRORS`) is one line and
    exit code 2; anything else is a bug: its traceback is printed and kept in a log file."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        hint = "; re-run the same command to resume" if args.command == "run" else ""
        print(f"bench: interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        log = crash_log(err)
        print(
            f"bench: internal error (a bug, not a mistake in your setup; the traceback is above "
            f"and in {log})",
            file=sys.stderr,
        )
        raise


def crash_log(err: BaseException) -> Path:
    """Writes the full traceback of an unexpected error to a file in the temp folder."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="bench-crash-", suffix=".txt")
    with open(fd, "w", encoding="utf-8") as log:
        log.write("".join(traceback.format_exception(err)))
    return Path(path)
