"""The driver's view of a distributed run: jobs done, running and failed, and what each worker
runs on which device. A live table on a terminal; elsewhere one line per job started."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from bench.progress import _enabled, console
from bench.results import read_record


class ClusterView:
    """Counts of the run's jobs and its running tasks, read from the ``running/`` markers the
    tasks write (worker, device, start); :meth:`finished` counts each result."""

    def __init__(self, total: int, skipped: int, running_dir: Path) -> None:
        self.total, self.skipped, self.running_dir = total, skipped, running_dir
        self.done = self.failed = 0
        self.running: list[dict[str, Any]] = []
        self.jobs_by_worker: Counter[str] = Counter()
        self._announced: set[tuple[str, int]] = set()
        self._live: Live | None = None

    def __enter__(self) -> ClusterView:
        if _enabled():
            self._live = Live(self.render(), console=console, refresh_per_second=2, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def read_running(self) -> list[dict[str, Any]]:
        """The markers of the jobs running now (an unreadable one, being written, is skipped)."""
        if not self.running_dir.is_dir():
            return []
        markers = [read_record(p) for p in sorted(self.running_dir.glob("*.json"))]
        return [m for m in markers if isinstance(m, dict) and "run_name" in m]

    def refresh(self) -> None:
        self.running = self.read_running()
        if self._live is not None:
            self._live.update(self.render())
            return
        for marker in self.running:  # no terminal: one line per job (attempt) started
            key = (marker["run_name"], marker.get("pid", 0))
            if key not in self._announced:
                self._announced.add(key)
                console.print(
                    f"{escape(marker['run_name'])}: running on {worker_name(marker)} "
                    f"({escape(str(marker.get('device', '?')))})",
                    soft_wrap=True,
                )

    def finished(self, run_name: str, out: dict[str, Any]) -> None:
        if "record" in out:
            self.done += 1
        else:
            self.failed += 1
        if out.get("worker"):
            self.jobs_by_worker[worker_name(out["worker"])] += 1
        self.running = [m for m in self.running if m["run_name"] != run_name]
        if self._live is not None:
            self._live.update(self.render())

    @property
    def running_jobs(self) -> list[dict[str, Any]]:
        """The running jobs (the table also shows running shared fits)."""
        return [m for m in self.running if m.get("kind") != "fit"]

    @property
    def queued(self) -> int:
        left = self.total - self.skipped - self.done - self.failed
        return max(left - len(self.running_jobs), 0)

    def render(self) -> Table:
        table = Table(
            title=f"{self.done + self.skipped}/{self.total} done ({self.skipped} before), "
            f"{len(self.running_jobs)} running, {self.failed} failed, {self.queued} queued",
            title_justify="left",
        )
        for column in ("worker", "device", "job", "running for", "jobs done"):
            table.add_column(column)
        now = time.time()
        for marker in self.running:
            name = worker_name(marker)
            seconds = now - float(marker.get("started", now))
            table.add_row(name, str(marker.get("device", "?")), marker["run_name"],
                          f"{seconds:.0f} s", str(self.jobs_by_worker[name]))  # fmt: skip
        return table


def worker_name(worker: dict[str, Any]) -> str:
    """A GPU worker by its host and GPU (each GPU task gets a new process), a CPU one by its
    host and process."""
    if worker.get("gpus"):
        return f"{worker.get('host', '?')} GPU {','.join(worker['gpus'])}"
    return f"{worker.get('host', '?')}:{worker.get('pid', '?')}"
