"""A training's live curve in MLflow: :class:`FitRunLogger` streams it to a fit run (a child
of the benchmark's parent run, tagged ``adbench.kind = "fit"``); :func:`find_fit_run` finds
a fit's finished run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.tracking.link import Link

if TYPE_CHECKING:
    from mlflow.entities import Run

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


def supersede_unfinished(client: Any, experiment_id: str, fit_hash: str) -> None:
    """Marks every unfinished run of ``fit_hash`` KILLED and superseded, then deletes it
    (MLflow's soft delete: restorable until ``mlflow gc``)."""
    stale = client.search_runs(
        [experiment_id], filter_string=_fit_filter(fit_hash), max_results=100
    )
    for run in stale:
        if run.info.status != "FINISHED":
            client.set_tag(run.info.run_id, "adbench.superseded", "true")
            client.set_terminated(run.info.run_id, "KILLED")
            client.delete_run(run.info.run_id)


def fit_params(fit: Any) -> dict[str, str]:
    """The params of a fit stage's run: the detector's (``detector.*``) and the training's."""
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
            "train_categories": ",".join(f"{p.dataset}/{p.category}" for p in fit.parts)[:500],
        }
    )
    return params


class FitRunLogger:
    """A :class:`bench.trainlog.StepLogger` that streams a training's curve to an MLflow run.

    The run (a child of ``parent_id`` when given, tagged ``adbench.kind = "fit"`` and
    ``fit_hash``) is opened on :meth:`start` or the first :meth:`log`. A run of the same
    ``fit_hash`` left unfinished (a training killed, now resumed from its checkpoint) is reused
    and set RUNNING again, so one fit has one curve; steps it already holds are not sent again.
    Metrics are buffered and sent every ``flush_seconds``, at ``_FIT_BATCH`` buffered, and on
    :meth:`flush`. It never raises: the first MLflow error is one message, then it stops
    logging and the training goes on. ``link`` is the run's :class:`~bench.tracking.link.Link`
    (one of its own when None): a failure here turns off every path of the run, and a failure
    elsewhere stops this logger. :meth:`finish` adds the curve PNG (``training_curve.png``) and
    marks the run FINISHED.
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
        link: Link | None = None,
    ) -> None:
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.run_name, self.fit_hash = run_name, fit_hash
        self.params, self.tags = dict(params or {}), dict(tags or {})
        self.flush_seconds = flush_seconds
        self.run_id: str | None = None
        self.link = link if link is not None else Link(str(getattr(client, "tracking_uri", "")))
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._logged_upto = -1  # steps <= this are in the run already (a resumed run)

    @property
    def failed(self) -> bool:
        """Whether tracking is off (here or on any path of the run)."""
        return self.link.down

    def _fail(self, err: Exception) -> None:
        doing = f"logging the training curve of {self.run_name}"
        self.link.fail(err, doing, "; training goes on untracked")
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
