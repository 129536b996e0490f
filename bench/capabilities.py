"""Opt-in capabilities: what one kind of method needs beyond ``fit`` / ``predict``.

A detector takes a capability by also subclassing its mixin; the harness finds it with
``isinstance`` (never by looking for attributes). Each mixin documents its whole contract.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from bench.types import Batch

__all__ = ["ReferenceStage", "TransductiveScores", "TypeDiscovery"]


class ReferenceStage:
    """A detector fitted in two stages (e.g. DictAS).

    Stage 1, ``fit``, learns on the training source (another dataset, the config's
    ``train_on``); the plan makes it one fit shared by every job. Stage 2,
    :meth:`fit_references`, gives it one evaluated category's k-shot reference images, on top
    of stage 1's state (computed or loaded from cache). The harness saves each stage's state in
    its own folder: :meth:`stage_state` says what a stage writes. With ``incremental = True`` a
    references stage writes only what it adds (e.g. its reference images, not the stage-1
    networks again), and the harness loads every stage's state on top of its parent's.
    """

    #: whether a references stage's saved state holds only what that stage adds
    incremental: ClassVar[bool] = False

    def fit_references(self, references: Iterable[Batch]) -> None:
        """Stage 2: the k-shot references (defect-free training images) of one category."""
        raise NotImplementedError

    def stage_state(self, stage: str) -> dict[str, Any]:
        """What the state file of ``stage`` ("fit" or "references") holds; by default the
        whole fitted state."""
        return self.fitted_state()  # type: ignore[attr-defined]


class TransductiveScores:
    """A detector whose image scores may depend on the whole test set of a category (e.g.
    DictAS's scores normalised over the category's test images).

    The harness calls :meth:`start_test` before the first ``predict`` of a job and
    :meth:`test_scores` after the last; scores it returns replace the per-image ones.
    :meth:`transductive` names, for given parameters, how the scores depend on the test set;
    it is recorded with every result and marks its leaderboard rows.
    """

    def start_test(self) -> None:
        """Called before the first ``predict`` of a job's test set."""

    def test_scores(self) -> torch.Tensor | None:
        """Image scores [N] in prediction order that replace the per-image ones; None keeps
        the per-image scores."""
        return None

    @classmethod
    def transductive(cls, params: dict[str, Any]) -> str | None:
        """How, under ``params``, image scores depend on the whole test set, in one sentence;
        None: each image is scored on its own."""
        return None


class TypeDiscovery:
    """A detector that can describe anomalous regions, so that the harness clusters a
    category's defective test images into anomaly types after scoring (AnomalyNCD's setting;
    ``bench.discovery``, scored by NMI, ARI and F1 against the defect folders).

    ``discover_types`` switches it on for a detector instance (usually a constructor
    parameter); ``n_types`` is the number of clusters (None: as many as defect folders, 0:
    estimated).
    """

    discover_types: bool = True
    n_types: int | None = None

    def describe_regions(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One embedding [N, D] per image [N, 3, H, W] for its anomalous region [N, H, W]."""
        raise NotImplementedError
