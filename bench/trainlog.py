"""Live training curves: the :class:`StepLogger` that :class:`bench.training.TrainableDetector`
reports every optimiser step to, and the PNG of a finished training's curve.

A record of the curve is ``(step, loss, lr, images_per_second)``; records of checkpoints from
before lr and throughput were kept are ``(step, loss)`` and draw with those panels empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

#: one optimiser step: (step, loss, learning rate, images per second)
TrainRecord = tuple[int, float, float, float]


@runtime_checkable
class StepLogger(Protocol):
    """Receives a training's metrics while it runs (set as ``TrainableDetector.step_logger``)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of optimiser step ``step`` (0-based): ``train/loss``, ``train/lr``, ..."""

    def flush(self) -> None:
        """Sends what is buffered (called before each checkpoint and when the loop ends)."""

    def finish(self, train_log: Sequence[Sequence[float]]) -> None:
        """The training is done; ``train_log`` is its whole curve, one :data:`TrainRecord` a step."""


def full_record(record: Sequence[float]) -> TrainRecord:
    """``record`` as a 4-tuple: lr and images/s are NaN in a (step, loss) record."""
    lr = float(record[2]) if len(record) > 2 else math.nan
    ips = float(record[3]) if len(record) > 3 else math.nan
    return int(record[0]), float(record[1]), lr, ips


def curve_figure(train_log: Sequence[Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Loss (log scale when all positive), learning rate and images/s against the step, in
    three stacked panels, saved as a PNG at ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [full_record(r) for r in train_log]
    steps = [r[0] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    panels = (("loss", 1), ("learning rate", 2), ("images / s", 3))
    for ax, (label, i) in zip(axes, panels):
        values = [r[i] for r in records]
        ax.plot(steps, values, lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if i == 1 and values and all(v > 0 for v in values):
            ax.set_yscale("log")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
