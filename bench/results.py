"""The results folder is the source of truth: one JSON per finished job, written atomically."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from bench.errors import ConfigError
from bench.per_image import PerImage
from bench.per_image import save as save_per_image
from bench.plan import Fit, Job

#: appended to the leaderboard name of a row whose setting has offline substitutes
SUBSTITUTE_MARK = "†"
#: appended to the leaderboard name of a row whose image scores use the whole test set
TRANSDUCTIVE_MARK = "‡"


def row_name(record: dict[str, Any]) -> str:
    """The leaderboard name of a record's detector, with its marks."""
    marks = (SUBSTITUTE_MARK if record.get("substitutes") else "") + (
        TRANSDUCTIVE_MARK if record.get("transductive") else ""
    )
    return f"{record['detector']} {marks}" if marks else record["detector"]


def dataset_labels(records: list[dict[str, Any]]) -> list[str]:
    """Each record's dataset as the leaderboards name it: ``name [protocol, vX]`` where results
    of one dataset were scored under different protocols or metric versions (never averaged or
    compared in one column), else the name."""
    kinds: dict[str, set] = {}
    for r in records:
        kinds.setdefault(r["dataset"], set()).add((r["protocol"], r["metric_version"]))
    return [
        f"{r['dataset']} [{r['protocol']}, v{r['metric_version']}]"
        if len(kinds[r["dataset"]]) > 1
        else r["dataset"]
        for r in records
    ]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)  # never a half-written result


class ResultStore:
    def __init__(self, output: str | Path, name: str) -> None:
        self.root = Path(output) / name

    def job_path(self, job: Job) -> Path:
        return self.root / "jobs" / f"{job.slug}.json"

    def state_dir(self, job: Job) -> Path:
        """The job's own state (predictions kept after a failure), keyed by its fit."""
        return self.root / "state" / f"{job.slug}-{job.fit_hash}"

    def fit_dir(self, fit: Fit) -> Path:
        """A fit's checkpoints and fitted state, keyed by its config so every job that shares
        it (and every later run) reuses it; a per-category fit's is its job's state folder."""
        return self.root / "state" / f"{fit.name.replace('/', '__')}-{fit.hash}"

    def check_writable(self, *extra: Path) -> None:
        """Fails before any job starts when a folder the run writes to (this store's, and
        ``extra`` ones such as ``--export-maps``) cannot be written."""
        folders = [self.root / sub for sub in ("jobs", "state", "figures", "failed")]
        for folder in [*folders, *extra]:
            probe = folder / f".write-test-{time.time_ns()}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise ConfigError(
                    f"cannot write to {folder} ({err.strerror or err}); choose another folder "
                    "(--output, --export-maps) or fix its permissions"
                ) from err

    def load(self, job: Job) -> dict[str, Any] | None:
        """The finished record of ``job`` if one exists for the same config hash."""
        path = self.job_path(job)
        if not path.is_file():
            return None
        record = read_record(path)  # unreadable: the job counts as not finished
        if isinstance(record, str) or record.get("config_hash") != job.config_hash:
            return None
        return record

    def save(self, record: dict[str, Any]) -> Path:
        path = self.root / "jobs" / f"{record['run_name'].replace('/', '__')}.json"
        write_json(path, record)
        failure = self.failure_path(record["run_name"])
        failure.unlink(missing_ok=True)
        return path

    def finished(self, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """``records``, or the readable job files; a ConfigError (the user's: a wrong name or
        folder) when there are none."""
        records = self.records() if records is None else records
        if not records:
            raise ConfigError(f"no finished jobs under {self.root / 'jobs'}; run `bench run` first")
        return records

    def per_image_path(self, run_name: str) -> Path:
        return self.root / "per_image" / f"{run_name.replace('/', '__')}.npz"

    def save_per_image(self, job: Job, data: PerImage) -> str:
        """Writes a job's per-image file (:mod:`bench.per_image`); its path relative to the
        benchmark folder."""
        path = self.per_image_path(job.run_name)
        save_per_image(path, data)
        return path.relative_to(self.root).as_posix()

    def failure_path(self, run_name: str) -> Path:
        return self.root / "failed" / f"{run_name.replace('/', '__')}.txt"

    def save_failure(self, job: Job, err: BaseException) -> Path:
        path = self.failure_path(job.run_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
        return path

    def records(self) -> list[dict[str, Any]]:
        """Every finished job's record. A file that cannot be read as a JSON object (e.g.
        truncated by a full disk) is skipped with one warning naming it: its job counts as not
        finished, so the report and ``bench sync`` leave it out and ``bench run`` re-runs it."""
        folder = self.root / "jobs"
        if not folder.is_dir():
            return []
        records = []
        for path in sorted(folder.glob("*.json")):
            record = read_record(path)
            if isinstance(record, str):
                warn_unreadable(path, record)
            else:
                records.append(record)
        return records


def warn_unreadable(path: Path, reason: str) -> None:
    from rich.markup import escape

    from bench.progress import console

    console.print(
        f"[yellow]skipping unreadable result file {escape(str(path))} ({escape(reason)}); "
        "its job counts as not finished and `bench run` re-runs it[/]",
        soft_wrap=True,  # the path stays whole on one line
    )


def read_record(path: Path) -> dict[str, Any] | str:
    """The record in ``path``, or why it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{type(err).__name__}: {err}"
    return record if isinstance(record, dict) else "not a JSON object"
