"""The command line's arguments. ``bench run``'s flags for the config's own fields come from
the config schema (:func:`bench.config.flag`), not from a copy of it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from bench.config import FLAG_GROUPS, BenchConfig
from bench.datasets.common import RESAMPLINGS
from bench.metrics import PROTOCOLS
from bench.value_checks import expected_choice


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


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def choice(choices: tuple[str, ...]) -> dict[str, Any]:
    """argparse options of a flag taking one of ``choices`` (a message with the nearest one
    for any other value)."""

    def parse(text: str) -> str:
        if text not in choices:
            expected = expected_choice(text, choices)
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {expected}")
        return text

    return {"type": parse, "metavar": "{" + ",".join(choices) + "}"}


class Parser(argparse.ArgumentParser):
    """Reports a mistake on the command line in one line (not the long usage first)."""

    def error(self, message: str):
        if message.endswith("expected one argument"):  # argparse reads "-1e30" as a flag
            message += " (a value starting with '-' is written --FLAG=VALUE)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: how :func:`bench.config.flag` fields' text values are parsed
PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _int,
    "float": _float,
    "seeds": _seeds,
    "names": _csv,
    "value": _value,
}


TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite store)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bench", description="Benchmark anomaly detectors on MVTec AD / MVTec 3D-AD.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="registered detectors and datasets")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_parser(sub)
    add_evaluate_parser(sub)
    add_store_parsers(sub)
    add_download_parser(sub)
    return p


def add_run_parser(sub) -> None:
    """``bench run``: the config's own fields as flags (bench.config.flag), and the flags that
    choose or change its entries."""
    run = sub.add_parser("run", help="run a benchmark (resumes: finished jobs are skipped)")
    run.add_argument(
        "--config", "-c", help="TOML file or built-in config name (default: 'default')"
    )
    run.add_argument(
        "--detectors", type=_csv, help="comma-separated detector names (replaces the config's)"
    )
    run.add_argument(
        "--datasets", type=_csv, help="comma-separated dataset names (replaces the config's)"
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
        **choice(RESAMPLINGS),
        help="how every detector's images are resized (default: each detector's official one)",
    )
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--force", action="store_true", help="re-run jobs that already have results")
    groups = {name: run.add_argument_group(name, text) for name, text in FLAG_GROUPS.items()}
    for f in config_flags():
        cli = dict(f.metadata["cli"])
        target = groups[cli.pop("group")] if cli.get("group") else run
        cli.pop("group", None)
        name = cli.pop("flag", "--" + f.name.replace("_", "-"))
        if "type" in cli:
            cli["type"] = PARSERS[cli["type"]]
        if "choices" in cli:  # a message with the nearest choice
            cli.update(choice(tuple(cli.pop("choices"))))
        target.add_argument(name, dest=f.name, **cli)


def config_flags() -> list[dataclasses.Field]:
    """The fields of :class:`BenchConfig` that are ``bench run`` flags."""
    return [f for f in dataclasses.fields(BenchConfig) if "cli" in f.metadata]


def add_evaluate_parser(sub) -> None:
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
    ev.add_argument("--protocol", default="official", **choice(PROTOCOLS))
    ev.add_argument(
        "--pro-limit", type=_float, default=0.3, help="AU-PRO integration limit (FPR, in (0, 1])"
    )
    ev.add_argument(
        "--bootstrap",
        type=_int,
        default=1000,
        metavar="B",
        help="bootstrap resamples of the 95%% intervals (default 1000, seed 0 as bench run; 0: none)",
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--output", help="metrics file stem (default: <maps>/metrics -> .json and .csv)"
    )


def add_store_parsers(sub) -> None:
    """``bench sync``, ``bench report`` and ``bench links``: they read a results folder."""
    syn = sub.add_parser(
        "sync", help="upload finished jobs that are missing on the MLflow server (after an outage)"
    )
    syn.add_argument("--name", default="default", help="benchmark name: results/<name>/")
    syn.add_argument("--output", default="results")
    syn.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    syn.add_argument("--experiment", help="MLflow experiment name (default: adbench/<name>)")

    rep = sub.add_parser("report", help="leaderboard (Markdown, CSV) from the results folder")
    rep.add_argument("--name", default="default")
    rep.add_argument("--output", default="results")
    rep.add_argument(
        "--html",
        action="store_true",
        help="also write report.html: one self-contained page (intervals, plots, images)",
    )

    cmp_ = sub.add_parser(
        "compare",
        help="paired differences between detectors scored on the same test images, with "
        "intervals and Holm-adjusted p-values",
    )
    cmp_.add_argument("results", help="a benchmark folder (results/<name>, holding jobs/)")
    cmp_.add_argument("--metric", default="image_auroc", help="metric (default image_auroc)")
    cmp_.add_argument(
        "--baseline", help="compare every detector with this one (default: every pair)"
    )
    cmp_.add_argument("--dataset", help="only this dataset (as the leaderboard names it)")
    cmp_.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")

    lnk = sub.add_parser(
        "links", help="MLflow UI links (model-training view) of the latest benchmark run"
    )
    lnk.add_argument("--name", help="benchmark name (default: the latest of every benchmark)")
    lnk.add_argument("--output", default="results", help="results folder holding mlflow.db")
    lnk.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    lnk.add_argument("--base-url", default="http://127.0.0.1:5000", help="where the UI is served")


def add_download_parser(sub) -> None:
    """``bench download``: fetch, verify and unpack a dataset into its loader's root."""
    dl = sub.add_parser(
        "download",
        help="fetch, verify and unpack a dataset (resumable; no name: list what it can fetch)",
    )
    dl.add_argument("name", nargs="?", help="dataset name (bench download lists them)")
    dl.add_argument(
        "--root", help="where the data goes (default: the dataset's root, e.g. data/mvtec_ad)"
    )
    dl.add_argument(
        "--accept-license",
        action="store_true",
        help="accept the dataset's licence (shown before the first download)",
    )
    dl.add_argument(
        "--archive",
        help="unpack and check an archive fetched by hand instead of downloading it",
    )
    dl.add_argument("--keep-archive", action="store_true", help="keep the archive beside the root")
    dl.add_argument(
        "--url", help="fetch from this mirror instead (the published checksum still applies)"
    )
    dl.add_argument(
        "--sha256", help="the SHA-256 to verify instead of the published one (with --url)"
    )
