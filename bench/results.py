"""The results folder is the source of truth: one JSON per finished job, written atomically and
read back against the record schema; files that cannot be written are named."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.errors import ConfigError, DataError
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


class WriteError(DataError, OSError):
    """A file of the results (or another output) that cannot be written: a full disk, a folder
    made read-only. One line naming the file, never a traceback; an ``OSError`` all the same."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(f"could not write {path}: {err.strerror or err}")
        self.errno, self.strerror, self.filename = err.errno, err.strerror or str(err), str(path)

    def __str__(self) -> str:
        return str(self.args[0])


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns an ``OSError`` raised while writing ``path`` into a :class:`WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err) from err


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` to ``path`` atomically; a :class:`WriteError` naming ``path`` if it
    cannot."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            os.replace(tmp, path)  # never a half-written result
    except WriteError:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_elsewhere(prefix: str, suffix: str, text: str) -> Path | None:
    """Writes ``text`` to a new file in the temp folder (what could not be written where it
    belongs); None when that fails too."""
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(text)
        return Path(name)
    except OSError:
        return None


class ResultStore:
    def __init__(self, output: str | Path, name: str) -> None:
        self.root = Path(output) / name
        #: folders this process could not write to, with why (for a run's closing summary)
        self.unwritable: dict[str, str] = {}

    def note_unwritable(self, err: OSError) -> None:
        """Remembers the folder of a file that could not be written: its folder in the store
        (``jobs``, ``state``, ...), or elsewhere its parent."""
        path = Path(err.filename)
        inside = path.is_relative_to(self.root) and path != self.root
        folder = self.root / path.relative_to(self.root).parts[0] if inside else path.parent
        self.unwritable.setdefault(str(folder), err.strerror or str(err))

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
        record = read_record(path)  # unreadable or not a record: the job counts as not finished
        if isinstance(record, str):
            warn_skipped(path, record, unreadable=True)
            return None
        if record.get("config_hash") != job.config_hash:
            return None  # another configuration's: computed again for this one
        problem = check_record(record, FULL_RECORD)
        if problem is not None:
            warn_skipped(path, problem)
            return None
        return record

    def save(self, record: dict[str, Any]) -> Path:
        path = self.root / "jobs" / f"{record['run_name'].replace('/', '__')}.json"
        write_json(path, record)
        with suppress(OSError):  # a failure file of an earlier attempt, if the folder allows
            self.failure_path(record["run_name"]).unlink(missing_ok=True)
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
        with writing(path):
            save_per_image(path, data)
        return path.relative_to(self.root).as_posix()

    def failure_path(self, run_name: str) -> Path:
        return self.root / "failed" / f"{run_name.replace('/', '__')}.txt"

    def save_failure(self, job: Job, err: BaseException) -> Path | None:
        """Writes the traceback of a failed job to its failure file; where that cannot be
        written (named on the console), to a file in the temp folder. Returns the file written,
        None if neither could be (the traceback is then printed). Never raises."""
        path, text = self.failure_path(job.run_name), "".join(traceback.format_exception(err))
        try:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            return path
        except WriteError as unwritable:
            self.note_unwritable(unwritable)
            elsewhere = write_elsewhere("bench-failure-", ".txt", text)
            say_unwritable(unwritable, "the traceback", elsewhere, text)
            return elsewhere

    def records(self, schema: Schema | None = None) -> list[dict[str, Any]]:
        """Every finished job's record. A file that cannot be read as a JSON object (e.g.
        truncated by a full disk) or does not match ``schema`` (default :data:`REPORT_RECORD`;
        :data:`FULL_RECORD` for MLflow) is skipped with one warning naming it and its first
        problem: its job counts as not finished, so the report and ``bench sync`` leave it out
        and ``bench run`` re-runs it."""
        folder = self.root / "jobs"
        if not folder.is_dir():
            return []
        records = []
        for path in sorted(folder.glob("*.json")):
            record = read_record(path)
            if isinstance(record, str):
                warn_skipped(path, record, unreadable=True)
                continue
            problem = check_record(record, schema or REPORT_RECORD)
            if problem is None:
                records.append(record)
            else:
                warn_skipped(path, problem)
        return records


def say_unwritable(err: WriteError, what: str, elsewhere: Path | None, text: str) -> None:
    """One line: ``what`` could not be written where it belongs (``err``) and is in
    ``elsewhere`` instead, or follows (``text``) when that could not be written either."""
    from rich.markup import escape

    from bench.progress import console

    where = f"is in {escape(str(elsewhere))} instead" if elsewhere else "follows"
    console.print(f"[red]  {escape(str(err))}; {what} {where}[/]", soft_wrap=True)
    if elsewhere is None:
        console.print(escape(text), soft_wrap=True, highlight=False)


def warn_skipped(path: Path, reason: str, unreadable: bool = False) -> None:
    """One line naming a result file that is left out, and why."""
    from rich.markup import escape

    from bench.progress import console

    what = (
        f"unreadable result file {path} ({reason})"
        if unreadable
        else f"result file {path}: {reason}"
    )
    console.print(
        f"[yellow]skipping {escape(what)}; its job counts as not finished and `bench run` "
        "re-runs it[/]",
        soft_wrap=True,  # the path stays whole on one line
    )


def read_record(path: Path) -> dict[str, Any] | str:
    """The record in ``path``, or why it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{type(err).__name__}: {err}"
    return record if isinstance(record, dict) else "not a JSON object"


# -- the record schema: what the readers of job records rely on ----------------------------------
#: (field path, kind, required); ``*`` stands for every key of an object, a kind ending in "?"
#: may also be null. A field that is not required is checked where a record has it.
Schema = tuple[tuple[str, str, bool], ...]

#: what the leaderboards, the HTML report, ``bench compare`` and the intervals read
REPORT_RECORD: Schema = (
    ("detector", "string", True),
    ("dataset", "string", True),
    ("category", "string", True),
    ("seed", "integer", True),
    ("protocol", "string", True),
    ("metric_version", "string", True),
    ("metrics", "object", True),
    ("metrics.all", "object", True),
    ("metrics.*", "object", True),
    ("metrics.*.*", "number?", True),
    ("timings", "object", True),
    ("timings.fit_seconds", "number?", True),
    ("timings.predict_images_per_second", "number?", True),
    ("timings.*", "number?", False),
    ("run_name", "string", False),
    ("config_hash", "string", False),
    ("fit_hash", "string", False),
    ("fit_label", "string", False),
    ("draw", "integer?", False),
    ("scope", "object?", False),
    ("ci", "object?", False),
    ("ci.metrics", "object?", False),
    ("ci.metrics.*", "interval", False),
    ("per_image", "string?", False),
    ("root", "string?", False),
    ("substitutes", "notes?", False),
    ("transductive", "notes?", False),
    ("curves", "object?", False),
    ("memory", "object?", False),
    ("memory.*", "number?", False),
)

#: a whole record, as ``bench run`` writes it: what resuming a run and MLflow tracking read
FULL_RECORD: Schema = (
    ("run_name", "string", True),
    ("config_hash", "string", True),
    *REPORT_RECORD,
    ("detector_name", "string", True),
    ("params", "object", True),
    ("root", "string?", True),
    ("image_size", "any?", True),
    ("crop_size", "any?", True),
    ("batch_size", "integer?", True),
    ("device", "string", True),
    ("versions", "object", True),
    ("memory", "object", True),
    ("finished", "string", True),
    ("warnings", "list", True),
    ("discovery", "object?", False),
)


def _number(value: Any) -> bool:
    """A JSON number the metrics can hold: NaN (undefined) included, infinities not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value)


def _notes(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (_number, "a number"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "notes": (_notes, "a string or a list of strings"),
    "interval": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(x is None or _number(x) for x in v),
        "[low, high]",
    ),
    "any": (lambda v: True, "anything"),
}
_MISSING = object()


def _fields(obj: Any, parts: list[str], where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of each field that ``parts`` names in ``obj`` (``_MISSING`` for a
    named field an object lacks; nothing below a parent that is absent or not an object)."""
    if not parts:
        yield where, obj
        return
    if not isinstance(obj, dict):
        return
    head, rest = parts[0], parts[1:]
    for key in list(obj) if head == "*" else [head]:
        path = f"{where}.{key}" if where else str(key)
        if key in obj:
            yield from _fields(obj[key], rest, path)
        elif not rest:
            yield path, _MISSING


def check_record(record: dict[str, Any], schema: Schema = REPORT_RECORD) -> str | None:
    """The first way ``record`` departs from ``schema`` ("field 'seed' is '0', expected an
    integer"), or None when it matches."""
    for path, kind, required in schema:
        nullable = kind.endswith("?")
        test, expected = KINDS[kind.rstrip("?")]
        for where, value in _fields(record, path.split(".")):
            if value is _MISSING:
                if required:
                    return f"field '{where}' is missing"
            elif not ((value is None and nullable) or (value is not None and test(value))):
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                return f"field '{where}' is {shown}, expected {expected}"
    return None
