"""Training loop for detectors that learn for many iterations (Dinomaly, DictAS, CASL, ...).

A subclass builds its modules, names its optimiser and scheduler, and returns the loss of one
step; :class:`TrainableDetector.fit` does the rest: optimiser steps over an endless stream of
batches, mixed precision on GPUs, gradient clipping, periodic checkpoints under ``workdir``, and
exact resume (model, optimiser, scheduler, scaler, RNG states and the position in the data).

Each step's loss, learning rate and throughput are kept in ``train_metrics_`` and, when the
runner sets a :class:`bench.trainlog.StepLogger` as ``step_logger``, reported to it while the
training runs (every ``log_every`` steps).

An optimiser may skip a step whose gradients hold a NaN or inf (Dinomaly2's does): it says so
with ``skips_nonfinite = True`` and counts the steps it left out in ``skipped_steps``. The loop
then lets a non-finite loss through to it (otherwise such a loss stops the training), keeps
the skipped steps in ``skipped_steps_``, names them on the console and reports their running
count as ``train/skipped_steps``.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.detector import Detector
from bench.progress import console, progress_bar
from bench.trainlog import StepLogger, TrainRecord, full_record
from bench.types import Batch

CHECKPOINT_NAME = "last.ckpt"


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """``amp`` is "auto" (bf16 where supported, else fp16, GPUs only), "bf16", "fp16" or "off"."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if amp in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")


@dataclass
class _Loop:
    """What one :meth:`TrainableDetector.fit` trains with."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast's, None: full precision
    skips: bool  # the optimiser leaves out steps with non-finite gradients
    logger: StepLogger | None
    every: int  # report to the logger every this many steps


class TrainableDetector(Detector):
    """Base class for detectors trained by gradient descent.

    Subclasses set ``self.iterations``, ``self.amp``, ``self.grad_clip`` and
    ``self.checkpoint_every`` in ``__init__`` (they are part of the configuration) and implement
    :meth:`build`, :meth:`configure_optimizers` and :meth:`training_step`.

    After :meth:`fit`, ``train_log_`` holds ``(step, loss)`` per step and ``train_metrics_``
    ``(step, loss, lr, images_per_second)`` (lr and images/s NaN for steps restored from a
    checkpoint written before they were kept).
    """

    iterations: int = 1000
    amp: str = "auto"
    grad_clip: float | None = None
    checkpoint_every: int = 500
    #: set by the runner (neither configuration nor fitted state): where step metrics go
    step_logger: StepLogger | None = None
    #: report to ``step_logger`` every this many steps (and always the last step)
    log_every: int = 1

    # -- to implement ------------------------------------------------------------------------
    def build(self, example: Batch) -> None:
        """Creates the modules (as ``*_`` attributes) given one training batch."""
        raise NotImplementedError

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """Returns (optimizer, scheduler or None); the scheduler is stepped once per iteration."""
        raise NotImplementedError

    def training_step(self, batch: Batch, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_training(self, train: Iterable[Batch]) -> None:
        """Optional hook: statistics over the training set once the weights are final."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Optional hook after each optimiser step (and scheduler step), before the checkpoint
        of that step is written: e.g. end-of-epoch validation and model selection."""

    def training_state(self) -> dict[str, Any]:
        """What ``after_step`` keeps between steps, saved with each checkpoint (exact resume)."""
        return {}

    def restore_training_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`training_state` from a checkpoint (after modules and optimiser)."""

    # -- the loop ------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.fitted_state().items() if isinstance(v, nn.Module)}

    def fit(self, train: Iterable[Batch]) -> None:
        loop, start = self._start_training(train)
        for module in self.modules().values():
            module.train()
        stream = _batches_from(train, start)
        with progress_bar(f"train {self.registered_name}", total=self.iterations) as bar:
            bar.advance(start)
            for step in range(start, self.iterations):
                tic = time.perf_counter()
                batch = next(stream).to(self.device, non_blocking=True)
                value, lr = self._optimiser_step(loop, batch, step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                images_per_second = len(batch) / max(time.perf_counter() - tic, 1e-9)
                self.train_log_.append((step, value))
                self.train_metrics_.append((step, value, lr, images_per_second))
                self.after_step(step, loop.optimizer)
                bar.advance(1)
                self._report_step(loop, step, value, lr, images_per_second)
        self._end_training(train, loop.logger)

    def _start_training(self, train: Iterable[Batch]) -> tuple[_Loop, int]:
        """Builds the modules, optimiser, scheduler and scaler and resumes from the checkpoint
        when there is one; returns them and the step to start at."""
        example = next(iter(_epoch(train, 0)))
        self.build(example.to(self.device))
        self.to(self.device)
        optimizer, scheduler = self.configure_optimizers()
        dtype = amp_dtype(self.device, self.amp)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
        start = self._resume(optimizer, scheduler, scaler)
        if start:
            console.print(
                f"  {self.registered_name}: resuming training at step {start} of "
                f"{self.iterations} from {self.checkpoint_path}",
                soft_wrap=True,
            )
        self.train_log_: list[tuple[int, float]] = getattr(self, "train_log_", [])
        metrics: list[TrainRecord] = getattr(self, "train_metrics_", [])
        if len(metrics) != len(self.train_log_):  # restored from a checkpoint of before
            metrics = [full_record(r) for r in self.train_log_]
        self.train_metrics_ = metrics
        self.skipped_steps_: list[int] = getattr(self, "skipped_steps_", [])
        skips = bool(getattr(optimizer, "skips_nonfinite", False))
        every = max(1, int(self.log_every))
        loop = _Loop(optimizer, scheduler, scaler, dtype, skips, self.step_logger, every)
        return loop, start

    def _optimiser_step(self, loop: _Loop, batch: Batch, step: int) -> tuple[float, float]:
        """One optimiser step (and scheduler step) on ``batch``; its (loss, learning rate).
        A step the optimiser leaves out for non-finite gradients is kept in ``skipped_steps_``."""
        optimizer, scaler = loop.optimizer, loop.scaler
        ctx = torch.autocast("cuda", dtype=loop.dtype) if loop.dtype is not None else nullcontext()
        with ctx:
            loss = self.training_step(batch, step)
        if not loop.skips and not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.registered_name}: loss is {loss.item()} at step {step}"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.grad_clip:
            scaler.unscale_(optimizer)
            params = [p for m in self.modules().values() for p in m.parameters()]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        skipped_before = getattr(optimizer, "skipped_steps", 0)
        scaler.step(optimizer)
        scaler.update()
        if getattr(optimizer, "skipped_steps", 0) > skipped_before:
            self._skipped(step)
        lr = float(optimizer.param_groups[0]["lr"])  # the lr this step used
        if loop.scheduler is not None:
            loop.scheduler.step()
        return float(loss.detach()), lr

    def _report_step(
        self, loop: _Loop, step: int, value: float, lr: float, images_per_second: float
    ) -> None:
        """Sends a finished step's metrics to the step logger and writes the checkpoint, each
        when due (and always after the last step)."""
        logger, done = loop.logger, step + 1
        if logger is not None and (done % loop.every == 0 or done == self.iterations):
            logged = {
                "train/loss": value,
                "train/lr": lr,
                "train/images_per_second": images_per_second,
            }
            if loop.skips:
                logged["train/skipped_steps"] = len(self.skipped_steps_)
            logger.log(step, logged)
        if self.workdir is not None and (
            done % self.checkpoint_every == 0 or done == self.iterations
        ):
            if logger is not None:
                logger.flush()
            self._save_checkpoint(done, loop.optimizer, loop.scheduler, loop.scaler)

    def _end_training(self, train: Iterable[Batch], logger: StepLogger | None) -> None:
        """After the last step: eval mode, the :meth:`after_training` hook, the curve's end."""
        if logger is not None:
            logger.flush()
        for module in self.modules().values():
            module.eval()
        with torch.no_grad():
            self.after_training(train)
        if logger is not None:
            logger.finish(self.train_metrics_)

    def _skipped(self, step: int) -> None:
        """Keeps a step the optimiser left out (non-finite gradients); the first few named."""
        self.skipped_steps_.append(step)
        shown = 10
        if len(self.skipped_steps_) <= shown:
            more = (
                " (further ones are counted, not named)"
                if len(self.skipped_steps_) == shown
                else ""
            )
            console.print(
                f"[yellow]  {self.registered_name}: optimiser step {step} skipped, a gradient "
                f"holds NaN or inf{more}[/]",
                soft_wrap=True,
            )

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.workdir is None else Path(self.workdir) / CHECKPOINT_NAME

    def _save_checkpoint(self, step: int, optimizer, scheduler, scaler) -> None:
        path = self.checkpoint_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "step": step,
            "params": self.get_params(),
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "train_log": self.train_log_,
            "train_metrics": self.train_metrics_,
            "skipped_steps": self.skipped_steps_,
            "rng": _rng_state(),
            "training_state": self.training_state(),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint

    def _resume(self, optimizer, scheduler, scaler) -> int:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return 0
        try:
            blob = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a cache: named, then training starts afresh
            from rich.markup import escape

            from bench.progress import console

            console.print(
                f"[yellow]  training checkpoint {escape(str(path))} is unreadable (truncated or "
                f"corrupt: {escape(str(err))}); training from scratch[/]",
                soft_wrap=True,
            )
            return 0
        if blob["params"] != self.get_params():
            return 0  # a checkpoint of another configuration: start afresh
        for name, module in self.modules().items():
            module.load_state_dict(blob["modules"][name])
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        self.train_log_ = [(int(r[0]), float(r[1])) for r in blob["train_log"]]
        self.train_metrics_ = [full_record(r) for r in blob.get("train_metrics", blob["train_log"])]
        self.skipped_steps_ = [int(s) for s in blob.get("skipped_steps", [])]
        _set_rng_state(blob["rng"])
        self.restore_training_state(blob.get("training_state", {}))
        return int(blob["step"])


def _epoch(train: Iterable[Batch], epoch: int) -> Iterable[Batch]:
    set_epoch = getattr(train, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    return train


def _batches_from(train: Iterable[Batch], start: int) -> Iterator[Batch]:
    """Endless stream of batches over epochs, positioned at global step ``start``."""
    per_epoch = len(train) if hasattr(train, "__len__") else None  # type: ignore[arg-type]
    epoch, skip = divmod(start, per_epoch) if per_epoch else (0, start)
    while True:
        it = iter(_epoch(train, epoch))
        if skip:
            it = itertools.islice(it, skip, None)
            skip = 0
        empty = True
        for batch in it:
            empty = False
            yield batch
        if empty and per_epoch is None:
            raise ValueError("the training data yielded no batch")
        epoch += 1


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
