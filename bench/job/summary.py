"""The console lines of a job: a finished job's metrics, a failed job's error, and the summary
of the files a run could not write."""

from __future__ import annotations

import errno
from typing import Any

from rich.markup import escape

from bench.job.run import short_error
from bench.metrics import headline
from bench.plan import Job
from bench.progress import console
from bench.results import ResultStore, WriteError

#: the errors of a file that cannot be written: its folder, not the file, is the problem
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def summary_line(record: dict[str, Any]) -> str:
    """One line of headline metrics for the console: image ones, then pixel or point ones."""
    m, t = record["metrics"]["all"], record["timings"]
    fit = "shared fit" if record.get("fit_shared") else f"{t['fit_seconds']:.1f}s fit"
    return f"{headline(m)}  ({fit}, {t['predict_images_per_second']:.1f} samples/s)"


def report_job(record: dict[str, Any]) -> None:
    """The console lines of a finished job: warnings, headline metrics, discovery."""
    for warning in record["warnings"]:
        console.print(f"[yellow]  {warning}[/]")
    console.print(summary_line(record))
    found = record.get("discovery") or {}
    if "nmi" in found:
        console.print(
            f"  anomaly types: NMI {found['nmi']:.3f}  ARI {found['ari']:.3f}  "
            f"F1 {found['f1']:.3f}  ({found['n_images']} defective images, "
            f"{found['n_types']} clusters)"
        )


def write_error(err: BaseException | None) -> OSError | None:
    """The write failure behind ``err`` (itself, its cause or its context): a
    :class:`~bench.results.WriteError`, or an ``OSError`` of a file that cannot be written."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, WriteError) or (
            isinstance(err, OSError) and err.errno in WRITE_ERRNOS and err.filename
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


class Failures:
    """The failed jobs of a run: each named on the console as it fails, its traceback saved;
    at the end, the folders that could not be written (a folder made read-only, a full disk)."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.unsaved = 0

    def add(self, job: Job, err: Exception) -> str:
        """One failed job: its error on the console (naming the file that could not be
        written, if that is why) and its traceback in its failure file (or said where); its
        run name."""
        unwritable = write_error(err)
        if unwritable is not None:
            self.unsaved += 1
            self.store.note_unwritable(unwritable)
        path = self.store.save_failure(job, err)
        where = f"traceback in {escape(str(path))}" if path else "traceback above"
        console.print(f"[red]  failed: {escape(short_error(err))}[/] ({where})", soft_wrap=True)
        return job.run_name

    def finish(self) -> None:
        """Says which folders could not be written, if any."""
        if self.store.unwritable:
            folders = ", ".join(f"{f} ({why})" for f, why in sorted(self.store.unwritable.items()))
            lost = f"{self.unsaved} job(s) could not be saved: " if self.unsaved else ""
            shown = " Their metrics are shown above." if self.unsaved else ""
            console.print(
                f"[red]{lost}could not write to {escape(folders)}.[/]{shown} Fix the folders' "
                "permissions (or free space) and run the same command again: the jobs saved "
                "are kept, the others run again.",
                soft_wrap=True,
            )
