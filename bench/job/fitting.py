"""Brings a detector to the state of a fit: the fitted-state cache, its stages and its log.

Every fit stage's state is saved in its state folder (``fitted.pt``), with when and from what it
was computed (``fit.json``); the results folder's ``fits.jsonl`` logs each computation, by any
process of any machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench.capabilities import ReferenceStage
from bench.detector import Detector, UnreadableState
from bench.job.data import open_fit_data
from bench.plan import Fit
from bench.progress import console
from bench.registry import create_detector
from bench.results import ResultStore, WriteError, read_record, write_json, writing
from bench.system import device_description, synchronize, track_peak_memory
from bench.training import CHECKPOINT_NAME, TrainableDetector

FITTED_STATE = "fitted.pt"


#: when and from what a fit was computed (its seconds are reported by every job sharing it)
FIT_INFO = "fit.json"


#: one line per fit stage computed, by any process of any machine: what was fitted, where, when
FIT_LOG = "fits.jsonl"


@dataclass
class FitResult:
    cached: bool
    seconds: float
    peak: Any
    #: the stages computed by this job (a cached or shared fit computes none)
    computed: list[str] = field(default_factory=list)
    #: seconds the fit took when it was computed (by this job or an earlier one)
    fitted_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    shared: bool = False
    #: optimiser steps the training left out (non-finite gradients); None: not trained here
    skipped_steps: int | None = None


def clear_fitted_state(workdir: Path) -> None:
    """Removes a fit's state and checkpoint, so that it is fitted from scratch (``--force``)."""
    for name in (FITTED_STATE, CHECKPOINT_NAME, FIT_INFO):
        (workdir / name).unlink(missing_ok=True)


def load_fitted(detector: Detector, workdir: Path) -> bool:
    """Loads a fit's cached state; False when there is none or it is unreadable (named)."""
    state_file = workdir / FITTED_STATE
    if not state_file.is_file():
        return False
    try:
        detector.load_state(state_file)
        return True
    except UnreadableState as err:  # a cache: named, then fitted again
        console.print(f"[yellow]  {escape(str(err))}; fitting again[/]", soft_wrap=True)
        state_file.unlink(missing_ok=True)
        return False


def fit_or_load(
    detector: Detector,
    fit: Fit,
    store: ResultStore,
    device: torch.device,
    num_workers: int = 0,
    logger_for: Any = None,
) -> FitResult:
    """Brings ``detector`` to the state of ``fit``: loads the cached state of the fit, or of the
    nearest stage before it, and computes the stages after that, saving each stage's state.
    ``logger_for(fit, resuming)`` gives a trained stage's step logger (live training curves;
    ``resuming``: a checkpoint exists, so the training continues an earlier one)."""
    chain = fit_chain(fit)
    result = FitResult(cached=False, seconds=0.0, peak=None)
    with track_peak_memory(device) as peak:
        start = time.perf_counter()
        todo = cached_stages(detector, chain, store)
        for stage in reversed(todo):
            workdir = store.fit_dir(stage)
            detector.workdir = workdir
            trainable = isinstance(detector, TrainableDetector) and stage.stage == "fit"
            sets, loader = open_fit_data(stage, trainable, device, num_workers)
            result.warnings += [w for ds in sets for w in getattr(ds, "warnings", [])]
            if trainable and logger_for is not None:
                resuming = (workdir / CHECKPOINT_NAME).is_file()
                detector.step_logger = logger_for(stage, resuming)
            t0 = time.perf_counter()
            try:
                (detector.fit if stage.stage == "fit" else detector.fit_references)(loader)
            finally:
                loader.close()
                if trainable:
                    detector.step_logger = None
            synchronize(device)
            seconds = time.perf_counter() - t0
            save_fit(detector, stage, store, seconds, device)
            result.computed.append(stage.stage)
        result.seconds = time.perf_counter() - start
    detector.workdir = store.fit_dir(fit)
    result.cached, result.peak = not todo, peak
    result.fitted_seconds = fitted_seconds(store, fit)
    return result


def save_fit(
    detector: Detector, stage: Fit, store: ResultStore, seconds: float, device: torch.device
) -> None:
    """Saves a computed fit stage (state, info, log line). Where its folder cannot be written
    (made read-only, a full disk), says so: the jobs go on with the fit in memory, and it is
    computed again by the next run."""
    workdir = store.fit_dir(stage)
    try:
        with writing(workdir / FITTED_STATE):
            detector.save_state(workdir / FITTED_STATE, stage.stage)
        write_json(workdir / FIT_INFO, {"seconds": seconds,
                                        "fit": stage.config(), "name": stage.name})  # fmt: skip
        with writing(store.root / FIT_LOG):
            log_fit(store, stage, seconds, device)
    except WriteError as err:
        detector.to(device)  # saving moves the state to the CPU first
        store.note_unwritable(err)
        console.print(
            f"[yellow]  could not save the fitted state: {escape(str(err))}; the jobs go on "
            "with the fit in memory (the next run computes it again)[/]",
            soft_wrap=True,
        )


def log_fit(store: ResultStore, stage: Fit, seconds: float, device: torch.device) -> None:
    """Appends the computation of ``stage`` to the store's fit log (:data:`FIT_LOG`): one
    ``write`` of one line in append mode, which local filesystems keep whole between
    processes (NFS does not promise it: :func:`fit_log` skips a garbled line)."""
    line = json.dumps(
        {
            "name": stage.name,
            "hash": stage.hash,
            "stage": stage.stage,
            "seconds": round(seconds, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": device_description(device),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        sort_keys=True,
    )
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / FIT_LOG, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def fit_log(store: ResultStore) -> list[dict[str, Any]]:
    """Every fit computation the store's log holds, oldest first."""
    path = store.root / FIT_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def cached_stages(detector: Detector, chain: list[Fit], store: ResultStore) -> list[Fit]:
    """Loads the cached state ``chain`` (the job's own fit first) can start from and returns
    the stages still to compute, the job's own last. Self-contained stage states: the nearest
    cached stage is enough. Incremental ones (``ReferenceStage.incremental``: a later stage
    saves only what it adds): each stage is loaded on top of its parent, from the first."""
    if not (isinstance(detector, ReferenceStage) and detector.incremental):
        todo = []
        for stage in chain:
            if load_fitted(detector, store.fit_dir(stage)):
                break
            todo.append(stage)
        return todo
    first_stages = list(reversed(chain))
    for i, stage in enumerate(first_stages):
        if not load_fitted(detector, store.fit_dir(stage)):
            return list(reversed(first_stages[i:]))
    return []


def fitted_seconds(store: ResultStore, fit: Fit) -> float | None:
    """Seconds all stages of ``fit`` took when they were computed (None if unrecorded)."""
    total = 0.0
    stage: Fit | None = fit
    while stage is not None:
        info = read_record(store.fit_dir(stage) / FIT_INFO)
        if isinstance(info, str):
            return None
        total += float(info.get("seconds", 0.0))
        stage = stage.parent
    return total


def fit_chain(fit: Fit) -> list[Fit]:
    """A fit and the stages it starts from."""
    chain = [fit]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    return chain


class LiveFit:
    """The detector of the last fit, kept in memory for the next job that shares the fit (the
    jobs of a unified or train_on fit run one after the other)."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.detector: Detector | None = None

    def take(self, fit: Fit, params: dict[str, Any]) -> Detector | None:
        """The kept detector when it holds ``fit`` and was built with ``params`` (entries that
        differ only in test parameters share a fit, not a detector)."""
        if self.key != (fit.name, fit.hash) or self.detector.get_params() != params:
            return None
        return self.detector

    def keep(self, fit: Fit, detector: Detector) -> None:
        self.key, self.detector = (fit.name, fit.hash), detector

    def drop(self) -> None:
        self.key = self.detector = None


def build_detector(fit: Fit, device: torch.device, log_every: int = 1) -> Detector:
    """A new detector of ``fit``'s entry and parameters, on ``device``."""
    detector = create_detector(fit.detector.name, **fit.params)
    detector.to(device)
    if isinstance(detector, TrainableDetector):
        detector.log_every = log_every
    return detector
