"""MLflow mirror of the results: a parent run per ``bench run``, a child run per job.

A parent records the host and pid of its process (tags ``adbench.host``, ``adbench.pid``,
``adbench.pid_started``), so that the next ``bench run`` of the benchmark can mark a parent
left RUNNING by a killed process as KILLED.

The default store is ``sqlite:///<output>/mlflow.db`` with artifacts under
``<output>/mlartifacts``; ``MLFLOW_TRACKING_URI`` (or ``tracking_uri`` in the config) points at a
server instead. A tracking failure never loses results: they are on disk already, and the user
gets one message.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from bench.config import BenchConfig
from bench.progress import console
from bench.scopes import references_text

if TYPE_CHECKING:
    from mlflow.entities import Run


def default_tracking_uri(output: str | Path) -> str:
    return f"sqlite:///{(Path(output) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: BenchConfig) -> str:
    return (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.output)
    )


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fails fast (instead of MLflow's minutes of retries) when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"tracking server {uri} is unreachable ({err})") from err


def sync(store, tracker: Tracker, records: list[dict] | None = None) -> tuple[int, int]:
    """Uploads every finished job of ``store`` (or of ``records``) that has no run on
    ``tracker``'s server yet (tracking was down, or another server was used); returns
    (uploaded, already there).

    The uploaded runs go under one parent: the benchmark's own parent run when this server
    still holds it (the parent of the jobs it already has, the latest if several), else one new
    parent run for this sync. That parent is opened with the first upload, so a sync with
    nothing to upload creates no run; the leaderboard of every job is logged on it."""
    records = store.records() if records is None else records
    missing, parents = [], set()
    for record in records:
        run = tracker.job_run(record)
        if run is None:
            missing.append(record)
        else:
            parents.add(run.data.tags.get("mlflow.parentRunId"))
    if missing:
        tracker.adopt_parent(parents - {None})
    uploaded = 0
    for record in missing:
        new_id = tracker.log_job(record)
        if new_id is None:
            break
        record["mlflow_run_id"] = new_id
        store.save(record)
        uploaded += 1
    if uploaded:
        tracker.log_summary(records)
    return uploaded, len(records) - len(missing)


def _machine() -> str:
    """This boot of this machine and this process's pid namespace (Linux), so that pids are
    only compared where they name the same processes: containers sharing a host name, or a
    reboot, never make a live run look dead. Empty where unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field
    22): unlike a wall-clock start time, a clock step does not move it. Empty where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Where this process runs: host, machine (boot and pid namespace), pid and the pid's
    start (pids are reused)."""
    import psutil

    me = psutil.Process()
    return {
        "adbench.host": socket.gethostname(),
        "adbench.machine": _machine(),
        "adbench.pid": str(me.pid),
        "adbench.pid_started": f"{me.create_time():.3f}",
        "adbench.pid_ticks": _start_ticks(me.pid),
    }


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` is known to be gone: it ran
    in this boot of this machine, in this pid namespace, and its pid is not alive, is a
    zombie, or now belongs to a process started later. Runs from elsewhere, or without the
    tags, are never called gone."""
    import psutil

    machine = _machine()
    if tags.get("adbench.host") != socket.gethostname() or not machine:
        return False
    if tags.get("adbench.machine") != machine:
        return False
    try:
        pid = int(tags["adbench.pid"])
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        ticks = tags.get("adbench.pid_ticks", "")
        if ticks and _start_ticks(pid):
            return _start_ticks(pid) != ticks
        started = float(tags.get("adbench.pid_started", "nan"))
        return abs(proc.create_time() - started) > 1.0  # NaN: never a mismatch
    except psutil.NoSuchProcess:
        return True
    except (KeyError, ValueError, psutil.Error):
        return False


@functools.cache
def git_state() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except Exception:
        return {"git_commit": "unknown", "git_dirty": "unknown"}


#: what identifies a job's setting, logged as params and in its config.json
JOB_FIELDS = (
    "detector_name",
    "dataset",
    "category",
    "seed",
    "image_size",
    "crop_size",
    "batch_size",
    "protocol",
)


def scope_params(record: dict[str, Any]) -> dict[str, str]:
    """The fit scope of a job as MLflow params (records from before fit scopes: per-category)."""
    scope = record.get("scope") or {}
    out = {"fit": record.get("fit_label", "per-category")}
    if scope.get("train_on"):
        out["train_on"] = scope["train_on"]["dataset"]
    if record.get("draw") is not None:
        out["draw"] = str(record["draw"])
        out["shots"] = str(scope.get("shots"))
    return out


def curves_figure(record: dict[str, Any], path: Path) -> Path:
    """ROC and PRO curves of a job (subset "all") as a PNG, the AU-PRO limit marked; the point
    ROC alone for unorganised clouds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, m = record["curves"], record["metrics"]["all"]
    level = "point" if "point_auroc" in m else "pixel"
    fig, axes = plt.subplots(1, 2 if "pro" in c else 1, figsize=(9, 4), squeeze=False)
    roc = axes[0, 0]
    roc.plot(c["fpr"], c["tpr"])
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate")
    roc.set_title(f"{level} ROC (AUROC {m[level + '_auroc']:.4f})")
    if "pro" in c:
        pro = axes[0, 1]
        pro.plot(c["fpr"], c["pro"])
        pro.axvline(0.3, ls="--", c="grey")
        pro.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 1))
        pro.set_title(f"PRO (AU-PRO@0.3 {m['au_pro']:.4f})")
    fig.suptitle(record["run_name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _job_span_ms(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """(end, start) of the job itself in epoch milliseconds, so MLflow shows its real duration
    rather than the moment it was logged (None when the record lacks the times)."""
    import datetime as dt

    try:
        end = dt.datetime.fromisoformat(record["finished"]).timestamp()
        t = record["timings"]
        spent = t["fit_seconds"] + t["predict_seconds"] + t["eval_seconds"]
    except (KeyError, TypeError, ValueError):
        return None, None
    return int(end * 1000), int((end - spent) * 1000)


def per_defect_table(record: dict[str, Any]):
    """One row per defect-type subset ("all" first) with every metric of the job."""
    import pandas as pd

    rows = [{"subset": name, **values} for name, values in record["metrics"].items()]
    rows.sort(key=lambda r: (r["subset"] != "all", r["subset"]))
    return pd.DataFrame(rows)


# MLflow metric names: alphanumerics, underscores, dashes, periods, spaces, colons and slashes
_METRIC_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


def flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for group, values in record["metrics"].items():
        prefix = "" if group == "all" else f"defect.{group}."
        for k, v in values.items():
            if v == v:  # MLflow rejects NaN in some stores; undefined values are left out
                out[prefix + k] = float(v)
    for k in ("nmi", "ari", "f1", "n_types"):
        value = (record.get("discovery") or {}).get(k)
        if value is not None:
            out[f"type_{k}"] = float(value)
    for k, v in {**record["timings"], **record["memory"]}.items():
        if v is not None:
            out[k] = float(v)
    if record.get("skipped_steps") is not None:  # a trained detector's skipped optimiser steps
        out["train_skipped_steps"] = float(record["skipped_steps"])
    return out


class Tracker:
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
            if self.parent_id is None:
                self._start_parent()
            tags = {
                "mlflow.parentRunId": self.parent_id,
                "adbench.kind": "job",
                "config_hash": record["config_hash"],
                "fit_hash": record.get("fit_hash", ""),
                "fit": record.get("fit_label", "per-category"),
                "data_fingerprint": record.get("data_fingerprint", "unknown"),
                "protocol": record["protocol"],
                "metric_version": record["metric_version"],
                "device": record["device"],
                **(
                    {"adbench.substitutes": "; ".join(record["substitutes"])}
                    if record.get("substitutes")
                    else {}
                ),
                **(
                    {"adbench.transductive": record["transductive"]}
                    if record.get("transductive")
                    else {}
                ),
                **git_state(),
                **{f"version.{k}": str(v) for k, v in record["versions"].items()},
            }
            end_ms, start_ms = _job_span_ms(record)
            run = self.client.create_run(
                self.experiment_id, start_time=start_ms, run_name=record["run_name"], tags=tags
            )
            rid = run.info.run_id
            params = {f"detector.{k}": str(v)[:500] for k, v in record["params"].items()}
            params.update({k: str(record[k]) for k in ("detector", *JOB_FIELDS)})
            params["resampling"] = record.get("resampling", "tensor")  # none before the choice
            params.update(scope_params(record))
            fit_run = self.fit_run_of(record)
            if fit_run is not None:
                self.client.set_tag(rid, "adbench.fit_run_id", fit_run)
            import time

            from mlflow.entities import Metric, Param

            now = int(time.time() * 1000)
            self.client.log_batch(
                rid,
                metrics=[Metric(k, v, now, 0) for k, v in flat_metrics(record).items()],
                params=[Param(k, v) for k, v in params.items()],
            )
            self._log_job_artifacts(rid, record)
            self.client.set_terminated(rid, "FINISHED", end_time=end_ms)
            return rid
        except Exception as err:
            self._fail(err)
            return None

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
        keys = (*JOB_FIELDS, "params", "root", "metric_version", "config_hash")
        resolved = {k: record[k] for k in keys}
        resolved["resampling"] = record.get("resampling", "tensor")
        for key in ("fit_label", "scope", "fit", "draw", "references", "references_root"):
            if key in record:
                resolved[key] = record[key]
        self.client.log_dict(rid, resolved, "config.json")
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
                stale = self.client.search_runs(
                    [self.experiment_id], filter_string=_fit_filter(fit.hash), max_results=100
                )
                for run in stale:
                    if run.info.status != "FINISHED":
                        self.client.set_tag(run.info.run_id, "adbench.superseded", "true")
                        self.client.set_terminated(run.info.run_id, "KILLED")
                        self.client.delete_run(run.info.run_id)
            params = {f"detector.{k}": str(v)[:500] for k, v in fit.params.items()}
            params.update(
                {
                    "detector": fit.detector.display,
                    "detector_name": fit.detector.name,
                    "fit": fit.label,
                    "stage": fit.stage,
                    "seed": str(fit.seed),
                    "batch_size": str(fit.batch_size),
                    "image_size": str(fit.image_size),
                    "resampling": fit.resampling,
                    "train_categories": ",".join(f"{p.dataset}/{p.category}" for p in fit.parts)[
                        :500
                    ],
                }
            )
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

            summary = summary_frame(records)
            for (detector, fit, dataset), row in summary.iterrows():
                row_name = detector if fit == "per-category" else f"{detector}.{fit}"
                for metric, value in row.items():
                    if value == value:
                        key = _METRIC_NAME_UNSAFE.sub("", f"{row_name}.{dataset}.{metric}")
                        self.client.log_metric(self.parent_id, key, float(value))
            self.client.log_text(self.parent_id, leaderboard_markdown(records), "leaderboard.md")
            with tempfile.TemporaryDirectory() as tmp:
                figure = leaderboard_figure(records, Path(tmp) / "leaderboard.png")
                self.client.log_artifact(self.parent_id, str(figure))
        except Exception as err:
            self._fail(err)


#: MLflow's largest batch is 1000 metrics; a fit run sends at most this many at once
_FIT_BATCH = 500


def _fit_filter(fit_hash: str) -> str:
    return f"tags.fit_hash = '{fit_hash}' and tags.`adbench.kind` = 'fit'"


def find_fit_run(client: Any, experiment_id: str, fit_hash: str) -> Run | None:
    """The latest FINISHED training run (``adbench.kind = "fit"``) of ``fit_hash``, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=_fit_filter(fit_hash) + " and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


class FitRunLogger:
    """A :class:`bench.trainlog.StepLogger` that streams a training's curve to an MLflow run.

    The run (a child of ``parent_id`` when given, tagged ``adbench.kind = "fit"`` and
    ``fit_hash``) is opened on :meth:`start` or the first :meth:`log`. A run of the same
    ``fit_hash`` left unfinished (a training killed, now resumed from its checkpoint) is reused
    and set RUNNING again, so one fit has one curve; steps it already holds are not sent again.
    Metrics are buffered and sent every ``flush_seconds``, at ``_FIT_BATCH`` buffered, and on
    :meth:`flush`. It never raises: the first MLflow error is one message, then it stops
    logging and the training goes on. :meth:`finish` adds the curve PNG
    (``training_curve.png``) and marks the run FINISHED.
    """

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        parent_id: str | None,
        run_name: str,
        fit_hash: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        flush_seconds: float = 2.0,
    ) -> None:
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.run_name, self.fit_hash = run_name, fit_hash
        self.params, self.tags = dict(params or {}), dict(tags or {})
        self.flush_seconds = flush_seconds
        self.run_id: str | None = None
        self.failed = False
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._logged_upto = -1  # steps <= this are in the run already (a resumed run)

    def _fail(self, err: Exception) -> None:
        if not self.failed:
            console.print(
                f"[yellow]MLflow: logging the training curve of {escape(self.run_name)} failed "
                f"({type(err).__name__}: {escape(str(err))}); training goes on untracked.[/]",
                soft_wrap=True,
            )
        self.failed = True
        self._buffer.clear()

    def start(self) -> str | None:
        """Opens (or reuses) the run; its id, None once tracking failed."""
        if self.run_id is None and not self.failed:
            try:
                self._open()
            except Exception as err:
                self._fail(err)
        return None if self.failed else self.run_id

    def _open(self) -> None:
        from mlflow.entities import Param, RunTag

        tags = {**self.tags, "adbench.kind": "fit", "fit_hash": self.fit_hash}
        if self.parent_id is not None:
            tags["mlflow.parentRunId"] = self.parent_id
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=_fit_filter(self.fit_hash),
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
        unfinished = [
            r
            for r in runs
            if r.info.status != "FINISHED" and r.data.tags.get("adbench.superseded") != "true"
        ]
        if unfinished:
            rid = unfinished[0].info.run_id
            self.client.update_run(rid, status="RUNNING")
            self.client.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            history = self.client.get_metric_history(rid, "train/loss")
            self._logged_upto = max((m.step for m in history), default=-1)
        else:
            rid = self.client.create_run(
                self.experiment_id, run_name=self.run_name, tags=tags
            ).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in self.params.items()]
            if params:
                self.client.log_batch(rid, params=params)
        self.run_id = rid
        self._last_flush = time.monotonic()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Buffers the metrics of ``step``; sends the buffer when it is due."""
        if self.failed or (self.run_id is None and self.start() is None):
            return
        if step <= self._logged_upto:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value == value:  # NaN is left out
                self._buffer.append(Metric(key, float(value), now, step))
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if due or len(self._buffer) >= _FIT_BATCH:
            self.flush()

    def flush(self) -> None:
        """Sends the buffered metrics now."""
        if self.failed or self.run_id is None:
            return
        try:
            while self._buffer:
                self.client.log_batch(self.run_id, metrics=self._buffer[:_FIT_BATCH])
                del self._buffer[:_FIT_BATCH]
        except Exception as err:
            self._fail(err)
        self._last_flush = time.monotonic()

    def finish(self, train_log: Sequence[Sequence[float]]) -> None:
        """Sends the rest, logs the curve PNG and marks the run FINISHED. A fit that had
        nothing to train (resumed from its final checkpoint) whose run is FINISHED already
        leaves that run as it is."""
        if self.failed:
            return
        try:
            if self.run_id is None:
                done = find_fit_run(self.client, self.experiment_id, self.fit_hash)
                if done is not None:
                    self.run_id = done.info.run_id
                    return
                if self.start() is None:
                    return
            self.flush()
            if self.failed:
                return
            from bench.trainlog import curve_figure

            with tempfile.TemporaryDirectory() as tmp:
                figure = curve_figure(train_log, Path(tmp) / "training_curve.png", self.run_name)
                self.client.log_artifact(self.run_id, str(figure))
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as err:
            self._fail(err)
