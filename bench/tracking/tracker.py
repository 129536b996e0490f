"""The MLflow runs of a benchmark: :class:`Tracker` opens its parent run (one per ``bench
run``, or per sync), logs a child run per finished job and the leaderboard on the parent, and
hands fits their :class:`~bench.tracking.fit_run.FitRunLogger`."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from bench.config import BenchConfig
from bench.intervals import mean_intervals
from bench.progress import console
from bench.scopes import references_text
from bench.tracking.fit_run import FitRunLogger, find_fit_run, fit_params, supersede_unfinished
from bench.tracking.job_data import (
    _job_span_ms,
    curves_figure,
    flat_metrics,
    job_config,
    job_params,
    job_tags,
    per_defect_table,
)
from bench.tracking.process import git_state, process_gone, process_tags
from bench.tracking.uris import probe, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run

# MLflow metric names: alphanumerics, underscores, dashes, periods, spaces, colons and slashes
_METRIC_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


class Tracker:
    """The MLflow runs of one benchmark on one tracking server (a context manager: entering
    connects, leaving closes the parent run it opened). The first MLflow failure is one
    message, then tracking is off (:attr:`failed`); results stay on disk either way."""

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
        self.failed = False

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
            tracker._fail(err)
        tracker.experiment_id, tracker.parent_id = experiment_id, parent_id
        return tracker

    def _fail(self, err: Exception) -> None:
        if not self.failed:
            console.print(
                f"[yellow]MLflow tracking at {escape(self.uri)} failed "
                f"({type(err).__name__}: {escape(str(err))}); "
                "results are still written to the results folder.[/]"
            )
        self.failed = True

    def __enter__(self) -> Tracker:
        """Connects; with ``open_parent`` (``bench run``) marks the benchmark's parents left
        RUNNING by dead processes KILLED, then opens this run's parent."""
        try:
            import mlflow

            from bench.ui import describe_experiment

            probe(self.uri)
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = self.artifact_root.as_uri() if self.uri.startswith("sqlite:") else None
                exp_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            describe_experiment(client, exp_id, self.benchmark, self.config)
            self.client, self.experiment_id = client, exp_id
            if self.open_parent:
                self._close_dead_parents_safely()
                self._start_parent()
        except Exception as err:
            self._fail(err)
        return self

    def _start_parent(self) -> None:
        tags = {"adbench.kind": "benchmark", **git_state(), **process_tags()}
        if not self.open_parent:
            tags["adbench.origin"] = "sync"
        run = self.client.create_run(self.experiment_id, run_name=self.benchmark, tags=tags)
        self.parent_id, self.owns_parent = run.info.run_id, True
        if self.open_parent:  # a sync knows no benchmark configuration; its jobs hold theirs
            self.client.log_dict(self.parent_id, self.config, "config.json")

    def _close_dead_parents_safely(self) -> None:
        """Housekeeping that must never turn tracking off: a failure is one message."""
        try:
            self.close_dead_parents()
        except Exception as err:
            console.print(f"[yellow]MLflow: could not check for runs left RUNNING ({err})[/]")

    def close_dead_parents(self) -> list[str]:
        """Marks KILLED this benchmark's parent runs left RUNNING by a process that is gone
        (see :func:`process_gone`: only runs opened on this host); returns their ids."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string="tags.`adbench.kind` = 'benchmark' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        dead = [
            r.info.run_id
            for r in runs
            if r.info.run_name == self.benchmark and process_gone(r.data.tags)
        ]
        for run_id in dead:
            self.client.set_terminated(run_id, "KILLED")
        if dead:
            console.print(
                f"MLflow: marked {len(dead)} earlier run(s) of {escape(self.benchmark)} as "
                f"KILLED: left RUNNING by a process on this host that is gone ({', '.join(dead)})",
                soft_wrap=True,
            )
        return dead

    def adopt_parent(self, candidates: set[str]) -> str | None:
        """Makes the latest of ``candidates`` that is an active run of this experiment the
        parent of new job runs (its status is left as it is); None when there is none."""
        if self.parent_id is not None:
            return self.parent_id
        runs = []
        for run_id in candidates:
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
        if self.parent_id and self.owns_parent and not self.failed:
            try:
                self.client.set_terminated(
                    self.parent_id, "FINISHED" if exc_type is None else "KILLED"
                )
            except Exception as err:
                self._fail(err)

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
            if self.parent_id is None:
                self._start_parent()
            return self._create_job_run(record)
        except Exception as err:
            self._fail(err)
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

    def _create_job_run(self, record: dict[str, Any]) -> str:
        """Logs ``record`` as a new child run of the parent, spanning the job's own time."""
        from mlflow.entities import Metric, Param

        end_ms, start_ms = _job_span_ms(record)
        run = self.client.create_run(
            self.experiment_id,
            start_time=start_ms,
            run_name=record["run_name"],
            tags=job_tags(record, self.parent_id),
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
        self._log_job_artifacts(rid, record)
        self.client.set_terminated(rid, "FINISHED", end_time=end_ms)
        return rid

    def job_run(self, record: dict[str, Any]) -> Run | None:
        """The active run this server holds under ``record``'s run id for the same job
        configuration, or None (a deleted run counts as missing)."""
        run_id = record.get("mlflow_run_id")
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return None
        same = run.data.tags.get("config_hash") == record["config_hash"]
        whole = run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"
        return run if same and whole else None

    def _log_job_artifacts(self, rid: str, record: dict[str, Any]) -> None:
        """The per-defect-type table and the job's resolved configuration."""
        self.client.log_text(rid, per_defect_table(record).to_csv(index=False), "per_defect.csv")
        self.client.log_dict(rid, job_config(record), "config.json")
        if record.get("references"):
            header = f"references of {record['run_name']} (replay: --shot-file references.txt)"
            listed = record.get("fit_references") or record["references"]
            text = references_text(record["references_root"], listed, header)
            self.client.log_text(rid, text, "references.txt")
        if record.get("overlays") and Path(record["overlays"]).is_file():
            self.client.log_artifact(rid, record["overlays"], "overlays")
        if record.get("curves"):
            with tempfile.TemporaryDirectory() as tmp:
                figure = curves_figure(record, Path(tmp) / "curves.png")
                self.client.log_artifact(rid, str(figure))

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
            self._fail(err)
            return None
        return FitRunLogger(
            self.client, self.experiment_id, self.parent_id, fit.name, fit.hash, params, tags
        )

    def fit_run_of(self, record: dict[str, Any]) -> str | None:
        """The id of the training run of a job's fit (its nearest trained stage), if any."""
        for stage in (record.get("fit") or {}).get("stages", []):
            run = find_fit_run(self.client, self.experiment_id, stage["hash"])
            if run is not None:
                return run.info.run_id
        return None

    def log_summary(self, records: list[dict[str, Any]]) -> None:
        if self.failed or self.parent_id is None or not records:
            return
        try:
            from bench.report import leaderboard_figure, leaderboard_markdown, summary_frame

            # the benchmark folder (per-image files): output/<name>, as in from_config
            root = self.artifact_root.parent / self.benchmark
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
            self._fail(err)
