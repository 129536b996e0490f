"""The one interface every detector implements (scikit-learn style, torch inside).

Constructor arguments are the detector's configuration, stored under the same names so that
:meth:`Detector.get_params` can report the resolved config. State learned by :meth:`fit` lives
in attributes whose names end with ``_`` (as in scikit-learn); that is what gets cached so an
evaluation can be re-run without fitting again.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.capabilities import ReferenceStage
from bench.types import Batch, Prediction


class UnreadableState(ValueError):
    """A fitted-state file that is truncated, corrupt or of another detector."""


#: the fit scopes of the plan (bench.plan): which training images a fit receives
FIT_SCOPES = ("per_category", "unified", "train_on", "shots")


class Detector:
    """Base class: ``fit`` on defect-free batches, ``predict`` one test batch at a time.

    What only one kind of method needs (a second fit stage on k-shot references, test-set
    dependent scores, anomaly-type discovery) is an opt-in mixin of :mod:`bench.capabilities`.
    """

    modality: ClassVar[str] = "image"
    #: how the loaders resize its RGB inputs (bench.datasets.common.RESAMPLINGS): the official
    #: code's own where it has one ("pil-bilinear" for torchvision's Resize on PIL images), else
    #: "tensor"; a config entry's ``resampling`` overrides it
    resampling: ClassVar[str] = "tensor"
    #: further inputs it scores, e.g. ("points",) for unorganised clouds (see bench.types)
    also_accepts: ClassVar[tuple[str, ...]] = ()
    registered_name: ClassVar[str] = ""
    #: whether the harness may run ``predict`` under autocast on a GPU
    inference_amp: ClassVar[bool] = True
    #: the fit scopes it supports (a subset of ``FIT_SCOPES``); the plan refuses the others
    fit_scopes: ClassVar[tuple[str, ...]] = ("per_category",)
    #: constructor arguments that only change scoring (blur, score mixing, test layers):
    #: left out of the fit's identity, so config entries differing only in them share fits
    test_params: ClassVar[tuple[str, ...]] = ()
    #: attributes built from the constructor arguments that ``fit`` does not change (frozen
    #: pretrained networks, in the constructor or on first use: None until then): moved by
    #: :meth:`to`, never saved (they are rebuilt on load)
    frozen: ClassVar[tuple[str, ...]] = ()
    #: state names older versions saved and that are now rebuilt: ignored by :meth:`load_state`
    dropped_state: ClassVar[tuple[str, ...]] = ()
    #: the fewest training images a fit is defined for (e.g. 2 for a variance); the plan
    #: refuses fits with fewer (``shots = 1``) before any job starts
    min_train_images: ClassVar[int] = 1

    device: torch.device = torch.device("cpu")
    #: folder for checkpoints and caches of this job; set by the harness, None when unused
    workdir: Path | None = None

    def fit(self, train: Iterable[Batch]) -> None:
        raise NotImplementedError

    def predict(self, batch: Batch) -> Prediction:
        raise NotImplementedError

    @classmethod
    def substitutes(cls, params: dict[str, Any]) -> list[str]:
        """What, under ``params`` (resolved constructor arguments), stands in for the paper's
        setting (e.g. an offline backbone for hub weights), one sentence each; recorded with
        every result and marked on its leaderboard rows. Empty: the paper's own setting."""
        return []

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Checks what the constructor's type hints cannot express (a layer below the encoder's
        depth, warmup <= iterations, a known backbone name, parameters that exclude each other)
        and raises ``bench.params.ParamError.bad(name, value, why)`` for the first that fails.
        ``params`` holds every constructor argument (defaults filled in, each already checked
        against its hint; not yet resolved). The plan calls it before any job starts and names
        the detector; it must stay offline and cheap (no weights loaded)."""

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` (every constructor argument) with the defaults that depend on other
        arguments filled in, so that records, MLflow and the fit's hash hold the values used."""
        return params

    @classmethod
    def accepted_modalities(cls, params: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The inputs it scores; a detector whose input depends on its configuration narrows
        them for ``params`` (its config or resolved arguments)."""
        return (cls.modality, *cls.also_accepts)

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The resolved configuration: every constructor argument with its value."""
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- device and state ------------------------------------------------------------------
    def fitted_state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def to(self, device: torch.device | str) -> Detector:
        """Moves the fitted state and the frozen parts to ``device``."""
        self.device = torch.device(device)
        frozen = {name: getattr(self, name) for name in self.frozen}
        for name, value in {**self.fitted_state(), **frozen}.items():
            if isinstance(value, (torch.Tensor, nn.Module)):
                setattr(self, name, value.to(self.device))
        return self

    def save_state(self, path: str | Path, stage: str = "fit") -> None:
        """Writes the fitted state of fit stage ``stage`` atomically (tmp file + rename)."""
        saved = self.stage_state(stage) if isinstance(self, ReferenceStage) else self.fitted_state()
        state = {}
        for name, value in saved.items():
            if isinstance(value, (torch.Tensor, nn.Module)):
                value = value.to("cpu")
            state[name] = value
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        torch.save(
            {"class": type(self).__qualname__, "params": self.get_params(), "state": state}, tmp
        )
        os.replace(tmp, path)
        self.to(self.device)

    def load_state(self, path: str | Path) -> None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise UnreadableState(
                f"fitted state {path} is unreadable (truncated or corrupt: {err})"
            ) from err
        if not isinstance(blob, dict) or blob.get("class") != type(self).__qualname__:
            held = blob.get("class") if isinstance(blob, dict) else type(blob).__name__
            raise UnreadableState(f"{path} holds state of {held}, not {type(self).__qualname__}")
        for name, value in blob["state"].items():
            if name not in self.dropped_state:
                setattr(self, name, value)
        self.to(self.device)
