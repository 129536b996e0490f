"""Detector registry: ``@register_detector`` for built-ins, an entry-point group for plugins.

Third-party packages expose detectors under the ``adbench.detectors`` entry-point group; the
entry point may name a :class:`~bench.detector.Detector` subclass (registered under the entry
point's name) or a module whose import registers detectors with the decorator.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from bench.detector import Detector
from bench.errors import ConfigError
from bench.types import MODALITIES

ENTRY_POINT_GROUP = "adbench.detectors"

D = TypeVar("D", bound=type[Detector])


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    cls: type[Detector]
    source: str  # "builtin" or "plugin:<distribution>"

    @property
    def modality(self) -> str:
        return self.cls.modality

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.cls.accepted_modalities()

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""


class UnknownDetectorError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


_REGISTRY: dict[str, DetectorInfo] = {}
_loaded = False


def register_detector(name: str, *, source: str = "builtin") -> Callable[[D], D]:
    """Class decorator that registers a detector under ``name``."""

    def wrap(cls: D) -> D:
        _add(name, cls, source)
        return cls

    return wrap


def _add(name: str, cls: type, source: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Detector)):
        raise TypeError(f"detector {name!r} must be a subclass of bench.Detector, got {cls!r}")
    for modality in cls.accepted_modalities():
        if modality not in MODALITIES:
            raise ValueError(
                f"detector {name!r} has unknown modality {modality!r}; known: {MODALITIES}"
            )
    known = _REGISTRY.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(
            f"detector name {name!r} is taken by {known.cls.__module__}.{known.cls.__qualname__} "
            f"({known.source}); cannot register {cls.__module__}.{cls.__qualname__}"
        )
    cls.registered_name = name
    _REGISTRY[name] = DetectorInfo(name, cls, source)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("bench.adapters")  # built-ins register on import
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not take the harness down
            raise RuntimeError(
                f"plugin detector {ep.name!r} from distribution {dist!r} failed to load "
                f"({ep.value}): {err}"
            ) from err
        if inspect.isclass(obj):
            _add(ep.name, obj, f"plugin:{dist}")


def list_detectors() -> list[DetectorInfo]:
    """All registered detectors (built-in and plugins), sorted by name."""
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_detector_class(name: str) -> type[Detector]:
    _load_all()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownDetectorError(
            f"unknown detector {name!r}.{hint} Known detectors: {', '.join(known)}"
        )
    return _REGISTRY[name].cls


def create_detector(name: str, **params: Any) -> Detector:
    """Instantiates a registered detector with its paper defaults overridden by ``params``."""
    return get_detector_class(name)(**params)
