"""What each ``bench`` command does."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.cli.run_config import config_from_args
from bench.config import BenchConfig
from bench.errors import ConfigError, DataError
from bench.value_checks import cli_text, resamples


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
                "scopes": list(i.cls.fit_scopes),
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
    for col in ("name", "modality", "fit scopes", "source", "summary"):
        table.add_column(col)
    for i in infos:
        table.add_row(
            i.name, ", ".join(i.modalities), ", ".join(i.cls.fit_scopes), i.source, i.summary
        )
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
    from bench.benchmark import run_benchmark
    from bench.progress import console
    from bench.report import print_leaderboard, write_report

    cfg = config_from_args(args)
    records, failed = run_benchmark(cfg, force=args.force, track=not args.no_tracking)
    if records:
        paths = write_report(cfg.output, cfg.name)
        print_leaderboard(records, root=Path(cfg.output) / cfg.name)
        console.print(f"leaderboard: {paths['markdown']}  ({paths['csv']})")
    if failed:
        console.print(f"[red]{len(failed)} job(s) failed:[/] {', '.join(failed)}")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import print_leaderboard, write_report
    from bench.results import ResultStore

    store = ResultStore(args.output, args.name)
    records = store.records()  # read once: one warning a file
    paths = write_report(args.output, args.name, records)
    print_leaderboard(records, root=store.root)
    print(f"leaderboard: {paths['markdown']}  ({paths['csv']})")
    if args.html:
        from bench.report_html import write_html_report

        print(f"html report: {write_html_report(args.output, args.name, records)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import compare_table, print_comparison

    folder = Path(args.results)
    if not (folder / "jobs").is_dir():
        raise ConfigError(
            f"{folder} holds no jobs/ folder: give a benchmark folder such as results/default"
        )
    table = compare_table(folder, args.metric, args.baseline, args.dataset, args.level)
    csv = folder / f"compare-{args.metric}.csv"
    table.to_csv(csv, index=False)
    print_comparison(table, args.metric, args.level)
    print(f"written to {csv}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.rescore import evaluate_maps, records_table
    from bench.results import write_json
    from bench.system import resolve_device

    check_evaluate_flags(args)
    device = str(resolve_device(args.device))
    records = evaluate_maps(
        args.maps,
        args.data,
        args.categories,
        args.scores,
        args.protocol,
        args.pro_limit,
        device,
        args.bootstrap,
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
    # the official headline metrics of MVTec LOCO AD and MVTec AD 2
    cols += [c for c in ("au_spro_05", "au_pro_05", "seg_f1") if c in table]
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


def check_evaluate_flags(args: argparse.Namespace) -> None:
    """``bench evaluate``'s numbers, before any file is read."""
    limit = args.pro_limit
    for flag, value, expected in (
        ("--bootstrap", args.bootstrap, resamples(args.bootstrap)),
        ("--pro-limit", limit, None if 0 < limit <= 1 else "a false-positive rate in (0, 1]"),
    ):
        if expected is not None:
            raise ConfigError(f"{flag} {cli_text(value)} is not valid; expected {expected}")


def cmd_sync(args: argparse.Namespace) -> int:
    from bench.run_lock import refuse_if_running

    with refuse_if_running(Path(args.output) / args.name, "bench sync"):  # not beside a run
        return sync_folder(args)


def sync_folder(args: argparse.Namespace) -> int:
    from bench.progress import console
    from bench.results import FULL_RECORD, ResultStore
    from bench.tracking import Tracker, sync

    store = ResultStore(args.output, args.name)
    records = store.records(FULL_RECORD)  # read once: one warning a file; MLflow needs all
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

    from bench.tracking import check_store, default_tracking_uri
    from bench.ui import benchmark_links

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        db = Path(args.output) / "mlflow.db"
        if not db.is_file():
            print(f"no MLflow store at {db} yet: run `make bench` (or `bench run`) first")
            return 1
        uri = default_tracking_uri(args.output)
    check_store(uri, args.output, args.name)  # a damaged store: named, with its recovery
    links = benchmark_links(uri, args.base_url, args.name)
    if not links:
        which = f"adbench/{args.name}" if args.name else "any adbench/* experiment"
        print(f"no benchmark run with job runs in {which} at {uri}: run `make bench` first")
        return 1
    for label, url in links:
        print(f"{label}\n  {url}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import dataclasses

    from bench.datasets.download import download
    from bench.datasets.sources import SOURCES, get_source

    if args.name is None:
        return _list_sources(SOURCES.values())
    source = get_source(args.name)
    if args.sha256 and not (args.url or args.archive):
        raise ConfigError("--sha256 replaces the published sum only with --url or --archive")
    if args.url or args.sha256:
        override = {"url": args.url or source.url, "sha256": args.sha256 or source.sha256}
        if args.sha256:
            override["checksum_source"] = "--sha256"
        try:
            source = dataclasses.replace(source, **override)
        except ValueError as err:
            raise ConfigError(f"--sha256: {err}") from None

    def confirm(prompt: str) -> bool:
        try:
            return input(prompt).strip().lower() in ("y", "yes")
        except EOFError:  # no answer (Ctrl-D, or input ran out): no
            print(file=sys.stderr)
            return False

    done = download(
        source,
        args.root,
        accept=args.accept_license,
        confirm=confirm if sys.stdin.isatty() else None,
        archive=args.archive,
        keep_archive=args.keep_archive,
    )
    print(done.root)
    return 0


def _list_sources(sources) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bench download NAME [--root DIR] [--accept-license]")
    for col in ("name", "dataset", "licence", "how", "from"):
        table.add_column(col)
    for s in sources:
        check = "SHA-256" if s.sha256 else "MD5" if s.md5 else "no published sum"
        how = f"direct, {check}" if s.url else "by hand (instructions)"
        table.add_row(s.name, s.title, s.licence, how, s.homepage)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0
