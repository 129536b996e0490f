"""The MLflow runs of a benchmark: :class:`Tracker` opens its parent run (one per ``bench
run``, or per sync), logs a child run per finished job and the leaderboard on the parent, and
hands fits their :class:`~bench.tracking.fit_run.FitRunLogger`. Every call goes through one
:class:`~bench.tracking.link.Link`: after the first failure none is made for the rest of the
run. Statuses: :mod:`bench.tracking.statuses`."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from bench.config import BenchConfig
from bench.errors import DataError
from bench.intervals import mean_intervals
from bench.progress import console
from bench.run_lock import exclusive
from bench.tracking import ledger, statuses
from bench.tracking.fit_run import FitRunLogger, find_fit_run, fit_params, supersede_unfinished
from bench.tracking.job_data import (
    _job_span_ms,
    flat_metrics,
    job_params,
    job_tags,
    log_job_artifacts,
)
from bench.tracking.link import Link, short
from bench.tracking.process import git_state, process_tags
from bench.tracking.uris import (
    bound_http_waits,
    check_store,
    default_tracking_uri,
    probe,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

# MLflow metric names: alphanumerics, underscores, dashes, periods, spaces, colons and slashes
_METRIC_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


def store_setup_lock(uri: str) -> AbstractContextManager[None]:
    """For a SQLite store, an exclusive lock beside it (``mlflow.db.lock``) while its schema is
    created or migrated and the experiment looked up: two runs of different benchmarks sharing
    one output folder would otherwise race ("duplicate column name: step"). Servers order
    their own writes: nothing to hold."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    return exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"))


class Tracker:
    """The MLflow runs of one benchmark on one tracking server (a context manager: entering
    connects, leaving closes the parent run it opened with the status of what happened). The
    first MLflow failure is one message, then tracking is off (:attr:`failed`) for every path;
    results stay on disk either way. A ``sqlite:`` store that is not a readable database is a
    :class:`~bench.errors.DataError` for ``bench sync`` and one warning for ``bench run``."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: Path,
        benchmark: str,
        config: dict,
        open_parent: bool = True,
    ) -> None:
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.benchmark, self.config = benchmark, config
        #: open the parent run on entering (``bench run``); else with the first new job run
        self.open_parent = open_parent
        self.client: Any = None
        self.parent_id: str | None = None
        self.owns_parent = False  # False for an adopted parent: its status is left alone
        #: the run names of the jobs that failed (:meth:`log_summary`): the parent is FAILED
        self.failed_jobs: list[str] = []
        self._active: dict[str, bool] = {}  # ledger parent run -> active on this store
        self.filed_under: list[str] = []  # the parent run of each job run logged
        resync = f"`bench sync --name {benchmark} --output {artifact_root.parent}"
        if uri != default_tracking_uri(artifact_root.parent):
            resync += f" --tracking-uri {uri}"
        self.link = Link(uri, resync + "`" if benchmark else "`bench sync`")
        bound_http_waits(uri)

    @property
    def failed(self) -> bool:
        """Whether tracking is off: a call to the store failed."""
        return self.link.down

    @property
    def root(self) -> Path:
        """The benchmark's results folder (output/<name>, as in :meth:`from_config`)."""
        return self.artifact_root.parent / self.benchmark

    @classmethod
    def from_config(cls, cfg: BenchConfig, open_parent: bool = True) -> Tracker:
        return cls(
            resolve_tracking_uri(cfg),
            cfg.experiment or f"adbench/{cfg.name}",
            Path(cfg.output).resolve() / "mlartifacts",
            cfg.name,
            cfg.to_dict(),
            open_parent,
        )

    @classmethod
    def attach(cls, uri: str, experiment_id: str, parent_id: str) -> Tracker:
        """A tracker for a worker process (bench.executors): it joins the parent run the
        driver opened, never opens or closes one, and logs jobs and fits under it."""
        tracker = cls(uri, "", Path(), "", {}, open_parent=False)
        try:
            import mlflow

            tracker.client = mlflow.MlflowClient(tracking_uri=uri)
        except Exception as err:
            tracker._fail(err, "connecting")
        tracker.experiment_id, tracker.parent_id = experiment_id, parent_id
        return tracker

    def _fail(self, err: Exception, doing: str) -> None:
        self.link.fail(err, doing)

    def __enter__(self) -> Tracker:
        """Connects; gives earlier parent runs of the benchmark that ended while the store was
        unreachable, or whose process died, their status (:mod:`bench.tracking.statuses`);
        with ``open_parent`` (``bench run``) opens this run's parent."""
        try:
            check_store(self.uri, self.artifact_root.parent, self.benchmark)
        except DataError as err:
            if not self.open_parent:
                raise
            console.print(f"[yellow]{escape(str(err))}; tracking is off for this run[/]")
            self.link.down = True
            return self
        try:
            import mlflow

            from bench.ui import describe_experiment

            probe(self.uri)
            with store_setup_lock(self.uri):  # two benchmarks must not create one schema at once
                client = mlflow.MlflowClient(tracking_uri=self.uri)
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    location = (
                        self.artifact_root.as_uri() if self.uri.startswith("sqlite:") else None
                    )
                    exp_id = client.create_experiment(self.experiment, artifact_location=location)
                else:
                    exp_id = exp.experiment_id
            describe_experiment(client, exp_id, self.benchmark, self.config)
            self.client, self.experiment_id = client, exp_id
            self._settle_earlier_runs()
            if self.open_parent:
                self._start_parent()
        except Exception as err:
            self._fail(err, f"connecting to {self.uri}")
        return self

    def _settle_earlier_runs(self) -> None:
        """Housekeeping that must never turn tracking off: a failure is one message."""
        by = "the next `bench run`" if self.open_parent else "`bench sync`"
        try:
            statuses.settle_pending(self.client, self.root, self.uri, by)
            statuses.close_dead(self.client, self.experiment_id, self.benchmark, self.root)
        except Exception as err:
            console.print(
                f"[yellow]MLflow: could not check for runs left RUNNING ({escape(short(err))})[/]"
            )

    def _start_parent(self) -> None:
        tags = {"adbench.kind": "benchmark", **git_state(), **process_tags()}
        if not self.open_parent:
            tags["adbench.origin"] = "sync"
        run = self.client.create_run(self.experiment_id, run_name=self.benchmark, tags=tags)
        self.parent_id, self.owns_parent = run.info.run_id, True
        ledger.opened(self.root, self.uri, self.experiment_id, self.parent_id)
        if self.open_parent:  # a sync knows no benchmark configuration; its jobs hold theirs
            self.client.log_dict(self.parent_id, self.config, "config.json")

    def adopt_parent(self, candidates: set[str]) -> str | None:
        """Makes the latest active run of this experiment among ``candidates`` and the parent
        runs the results folder's ledger records for this store the parent of new job runs
        (its status is left as it is); None when there is none."""
        if self.parent_id is not None or self.failed:
            return self.parent_id
        runs = []
        for run_id in candidates | {e["run_id"] for e in ledger.on_store(self.root, self.uri)}:
            try:
                runs.append(self.client.get_run(run_id))
            except Exception:
                continue
        runs = [
            r
            for r in runs
            if r.info.lifecycle_stage == "active" and r.info.experiment_id == self.experiment_id
        ]
        if runs:
            self.parent_id = max(runs, key=lambda r: r.info.start_time).info.run_id
        return self.parent_id

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes the parent this run opened with the status of what happened; when the store
        is unreachable, the results folder's ledger keeps it for ``bench sync`` or the next
        ``bench run``."""
        if not (self.parent_id and self.owns_parent):
            return
        status, note = statuses.outcome(exc_type, self.failed_jobs)
        if not self.failed:
            try:
                statuses.close(self.client, self.parent_id, status, note)
                statuses.close_fits(
                    self.client, self.experiment_id, self.parent_id, self.root, status
                )
            except Exception as err:
                self._fail(err, "closing the benchmark run")
        ledger.ended(self.root, self.parent_id, status, note, on_store=not self.failed)

    def log_job(self, record: dict[str, Any]) -> str | None:
        """The MLflow run of a finished job: created once; a finished run already logged for
        the same job and configuration (e.g. by an invocation killed before it saved the run
        id) is reused, so a job never has two runs, and one left unfinished by a process killed
        mid-upload is deleted and logged again."""
        if self.failed or self.client is None:
            return None
        try:
            finished = self._logged_run_id(record)
            if finished:
                return finished
            parent = self.ledger_parent(record)
            if self.failed:
                return None
            if parent is None and self.parent_id is None:
                self._start_parent()
            self.filed_under.append(parent or self.parent_id)
            return self._create_job_run(record, parent or self.parent_id)
        except Exception as err:
            self._fail(err, f"logging the job run {record['run_name']}")
            return None

    def _logged_run_id(self, record: dict[str, Any]) -> str | None:
        """The id of a finished run already logged for ``record``'s job and configuration;
        runs of it left unfinished (a process killed mid-upload) are deleted."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.config_hash = '{record['config_hash']}' "
            f"and tags.`adbench.kind` = 'job' and attributes.run_name = '{record['run_name']}'",
            max_results=10,
        )
        finished = [r for r in existing if r.info.status == "FINISHED"]
        if finished:
            return finished[0].info.run_id
        for half in existing:  # logged by a process killed mid-upload: replaced whole
            self.client.delete_run(half.info.run_id)
        return None

    def ledger_parent(self, record: dict[str, Any]) -> str | None:
        """The parent run that ``record``'s job finished under, from the results folder's
        ledger: a run of this store, still active there, whose span holds the job's end (a
        job that finished while the store was down is filed under its own run); None when
        there is none."""
        end_ms, _ = _job_span_ms(record)
        if end_ms is None or not self.benchmark:  # a worker's tracker has no results folder
            return None
        for entry in reversed(ledger.on_store(self.root, self.uri)):
            opened, ended = entry.get("opened", 0) * 1000, entry.get("ended")
            if end_ms + 1000 < opened or (ended is not None and end_ms > ended * 1000 + 1000):
                continue
            run_id = entry["run_id"]
            if run_id not in self._active:
                try:
                    run = self.client.get_run(run_id)
                    here = run.info.experiment_id == self.experiment_id
                    self._active[run_id] = here and run.info.lifecycle_stage == "active"
                except Exception as err:
                    if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                        self._fail(err, f"looking up the parent run {run_id}")
                    self._active[run_id] = False
            return run_id if self._active[run_id] else None
        return None

    def _create_job_run(self, record: dict[str, Any], parent_id: str | None) -> str:
        """Logs ``record`` as a new child run of ``parent_id``, spanning the job's own time."""
        from mlflow.entities import Metric, Param

        end_ms, start_ms = _job_span_ms(record)
        run = self.client.create_run(
            self.experiment_id,
            start_time=start_ms,
            run_name=record["run_name"],
            tags=job_tags(record, parent_id),
        )
        rid = run.info.run_id
        params = job_params(record)
        fit_run = self.fit_run_of(record)
        if fit_run is not None:
            self.client.set_tag(rid, "adbench.fit_run_id", fit_run)
        now = int(time.time() * 1000)
        self.client.log_batch(
            rid,
            metrics=[Metric(k, v, now, 0) for k, v in flat_metrics(record).items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        log_job_artifacts(self.client, rid, record)
        self.client.set_terminated(rid, "FINISHED", end_time=end_ms)
        return rid

    def job_run(self, record: dict[str, Any]) -> Run | None:
        """The active run this server holds under ``record``'s run id for the same job
        configuration, or None (a deleted run counts as missing)."""
        run_id = record.get("mlflow_run_id")
        if not run_id or self.failed:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                self._fail(err, f"looking up the run of {record['run_name']}")
            return None
        same = run.data.tags.get("config_hash") == record["config_hash"]
        whole = run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"
        return run if same and whole else None

    def fit_logger(self, fit: Any, resuming: bool = True) -> FitRunLogger | None:
        """The live training-curve logger of a fit stage (a child run of the benchmark run,
        tagged ``adbench.kind = "fit"``); None when tracking is off or failed. A training that
        starts from scratch (``resuming`` False) never continues the curve of an earlier,
        unfinished one (a worker killed before the first checkpoint, a checkpoint removed by
        ``--force``): that run is marked KILLED and superseded, then deleted (MLflow's soft
        delete: restorable until ``mlflow gc``), so the fit keeps one run, the new one."""
        if self.failed or self.client is None:
            return None
        try:
            if self.parent_id is None:
                self._start_parent()
            if not resuming:
                supersede_unfinished(self.client, self.experiment_id, fit.hash)
            params = fit_params(fit)
            tags = {"fit_name": fit.name, **git_state()}
        except Exception as err:
            self._fail(err, f"opening the training run of {fit.name}")
            return None
        return FitRunLogger(
            self.client,
            self.experiment_id,
            self.parent_id,
            fit.name,
            fit.hash,
            params,
            tags,
            link=self.link,
        )

    def fit_run_of(self, record: dict[str, Any]) -> str | None:
        """The id of the training run of a job's fit (its nearest trained stage), if any."""
        for stage in (record.get("fit") or {}).get("stages", []):
            run = find_fit_run(self.client, self.experiment_id, stage["hash"])
            if run is not None:
                return run.info.run_id
        return None

    def log_summary(self, records: list[dict[str, Any]], failed: Sequence[str] = ()) -> None:
        """The leaderboard of ``records`` on the parent run; ``failed`` (the run names of the
        jobs that failed) makes the parent FAILED when it closes."""
        self.failed_jobs = list(failed)
        if self.failed or self.parent_id is None or not records:
            return
        try:
            from bench.report import leaderboard_figure, leaderboard_markdown, summary_frame

            # the benchmark folder (per-image files): output/<name>, as in from_config
            root = self.root
            summary = summary_frame(records).join(mean_intervals(records, root))
            for (detector, fit, dataset), row in summary.iterrows():
                row_name = detector if fit == "per-category" else f"{detector}.{fit}"
                for metric, value in row.items():
                    if value == value:
                        key = _METRIC_NAME_UNSAFE.sub("", f"{row_name}.{dataset}.{metric}")
                        self.client.log_metric(self.parent_id, key, float(value))
            self.client.log_text(
                self.parent_id, leaderboard_markdown(records, root), "leaderboard.md"
            )
            with tempfile.TemporaryDirectory() as tmp:
                figure = leaderboard_figure(records, Path(tmp) / "leaderboard.png", root)
                self.client.log_artifact(self.parent_id, str(figure))
            from bench.report_html import log_html_report

            log_html_report(self.client, self.parent_id, root, records)
        except Exception as err:
            self._fail(err, "logging the leaderboard")
