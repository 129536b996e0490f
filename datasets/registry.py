"""Dataset registry: ``@register_dataset`` for built-ins, an entry-point group for plugins.

Third-party packages expose datasets under the ``adbench.datasets`` entry-point group; the
entry point may name a :class:`DatasetSpec` (registered under the entry point's name), a loader
class that carries the spec's attributes (see :func:`spec_from_loader`; registered under the
entry point's name), or a module whose import registers loaders with :func:`register_dataset`.
Plugins are loaded on the first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from bench.errors import ConfigError
from bench.types import MODALITIES

from .common import DatasetLayoutError

ENTRY_POINT_GROUP = "adbench.datasets"
#: how a dataset's test split can be scored (:attr:`DatasetSpec.metrics`)
METRIC_FAMILIES = ("mvtec", "loco", "mvtec_ad2")

L = TypeVar("L", bound=type)
RootLike = str | Path | Callable[[], Path]


@dataclass(frozen=True)
class DefaultRoot:
    """A default dataset root: ``$env`` when that variable is set (and not empty), else
    ``fallback``."""

    fallback: str
    env: str | None = None

    def __call__(self) -> Path:
        return Path((os.environ.get(self.env) if self.env else None) or self.fallback)

    def __str__(self) -> str:
        return str(self())


def env_root(var: str, fallback: str) -> DefaultRoot:
    """The root ``$var`` names, else ``fallback``."""
    return DefaultRoot(fallback, var)


def _no_broken(root: str | Path) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: type
    list_categories: Callable[[str | Path], list[str]]
    default_root: Callable[[], Path]
    modalities: tuple[str, ...]  # detectors it serves unless a detector names its datasets
    feeds: tuple[str, ...]  # every modality its samples can provide
    #: category folders that cannot be loaded, with what each lacks
    broken_categories: Callable[[str | Path], dict[str, str]] = _no_broken
    #: the environment variable that sets the default root (taken from ``default_root.env``)
    root_env: str | None = None
    source: str = "builtin"  # or "plugin:<distribution>"
    #: how its test split is scored: "mvtec" (image, pixel and AU-PRO metrics), "loco" (MVTec
    #: LOCO's AU-sPRO per anomaly kind) or "mvtec_ad2" (AU-PRO to FPR 0.05, SegF1 at a threshold
    #: from the validation images); unorganised clouds are scored per point whatever this says
    metrics: str = "mvtec"
    #: the name ``bench download`` fetches this dataset by (None: none; built-ins need none)
    download: str | None = None

    def __post_init__(self) -> None:
        if self.root_env is None:
            object.__setattr__(self, "root_env", getattr(self.default_root, "env", None))

    def root(self, root: str | Path | None = None) -> Path:
        return Path(root) if root else self.default_root()

    @property
    def root_text(self) -> str:
        """The default root as ``bench list`` shows it, without generating or probing data."""
        if hasattr(self.default_root, "env"):  # DefaultRoot, builtin.GeneratedRoot
            return str(self.default_root)
        fn = self.default_root
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}()"

    def categories(
        self, root: str | Path | None = None, named: list[str] | None = None
    ) -> list[str]:
        """The loadable categories. A category folder that cannot be loaded is an error
        naming what it lacks: every such folder when categories are discovered (``named``
        None), else those of ``named``."""
        root = self.root(root)
        try:
            found = self.list_categories(root)
        except DatasetLayoutError as err:
            if self.download is None or root.exists():
                raise
            fetch = f"bench download {self.download} --root {shlex.quote(str(root))}"
            raise DatasetLayoutError(f"{err}\nfetch it with: {fetch}") from None
        broken = self.broken_categories(root)
        bad = {c: why for c, why in broken.items() if named is None or c in named}
        if bad:
            raise DatasetLayoutError(
                f"{self.name}: categor(ies) {sorted(bad)} cannot be loaded: "
                + "; ".join(bad.values())
                + ". Complete or remove the folder, or pass --categories to run the others"
            )
        return found

    def open(self, category: str, split: str, root: str | Path | None = None, **options):
        return self.loader(self.root(root), category, split, **options)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    spec: DatasetSpec
    source: str  # "builtin" or "plugin:<distribution>"

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modalities

    @property
    def feeds(self) -> tuple[str, ...]:
        return self.spec.feeds


class UnknownDatasetError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


_REGISTRY: dict[str, DatasetSpec] = {}
_loaded = False
_loading = False
#: "plugin:<distribution>" while an entry point loads: the source of what its import registers
_plugin_source: str | None = None


def _as_root(default_root: RootLike, env: str | None = None) -> Callable[[], Path]:
    if isinstance(default_root, (str, Path)):
        return DefaultRoot(str(default_root), env)
    if not callable(default_root):
        raise TypeError(f"default_root must be a path or a callable, got {default_root!r}")
    return default_root


def register_dataset(
    name: str,
    *,
    categories: Callable[[str | Path], list[str]],
    default_root: RootLike,
    modalities: tuple[str, ...],
    feeds: tuple[str, ...] | None = None,
    broken_categories: Callable[[str | Path], dict[str, str]] | None = None,
    root_env: str | None = None,
    source: str | None = None,
    metrics: str = "mvtec",
    download: str | None = None,
) -> Callable[[L], L]:
    """Class decorator that registers a loader class under ``name`` (stackable: one loader may
    serve several names). ``loader(root, category, split, **options)`` opens one split.

    ``default_root``: a path, :func:`env_root` (``$VAR`` else a path) or any callable returning
    a path; ``feeds`` defaults to ``modalities``; ``source`` defaults to "builtin", or to the
    plugin's distribution while its entry point loads. ``metrics``: how the test split is
    scored (:attr:`DatasetSpec.metrics`); ``download``: its ``bench download`` name.
    """

    def wrap(loader: L) -> L:
        add_dataset(
            DatasetSpec(
                name,
                loader,
                categories,
                _as_root(default_root, root_env),
                tuple(modalities),
                tuple(feeds if feeds is not None else modalities),
                broken_categories or _no_broken,
                root_env,
                metrics=metrics,
                download=download,
            ),
            source=source,
        )
        return loader

    return wrap


def _owner(spec: DatasetSpec) -> str:
    return f"{spec.loader.__module__}.{spec.loader.__qualname__} ({spec.source})"


def add_dataset(spec: DatasetSpec, source: str | None = None) -> DatasetSpec:
    """Registers ``spec`` under ``spec.name`` and returns it (with its source). The name may be
    registered again only by the same loader from the same source."""
    spec = replace(spec, source=source or _plugin_source or spec.source)
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"dataset name must be a non-empty string, got {spec.name!r}")
    if not inspect.isclass(spec.loader):
        raise TypeError(f"dataset {spec.name!r}: the loader must be a class, got {spec.loader!r}")
    for what in ("list_categories", "default_root", "broken_categories"):
        if not callable(getattr(spec, what)):
            raise TypeError(f"dataset {spec.name!r}: {what} must be callable")
    if not spec.modalities:
        raise ValueError(f"dataset {spec.name!r} serves no modality")
    for modality in (*spec.modalities, *spec.feeds):
        if modality not in MODALITIES:
            raise ValueError(
                f"dataset {spec.name!r} has unknown modality {modality!r}; known: {MODALITIES}"
            )
    if spec.metrics not in METRIC_FAMILIES:
        raise ValueError(
            f"dataset {spec.name!r} has unknown metrics {spec.metrics!r}; known: {METRIC_FAMILIES}"
        )
    if not set(spec.modalities) <= set(spec.feeds):
        raise ValueError(
            f"dataset {spec.name!r} serves {spec.modalities} but feeds only {spec.feeds}"
        )
    known = _REGISTRY.get(spec.name)
    if known is not None and (known.loader is not spec.loader or known.source != spec.source):
        raise ValueError(
            f"dataset name {spec.name!r} is taken by {_owner(known)}; "
            f"cannot register {_owner(spec)}"
        )
    _REGISTRY[spec.name] = spec
    return spec


def spec_from_loader(name: str, loader: type) -> DatasetSpec:
    """A spec from a loader class's attributes: ``list_categories(root)`` and ``default_root``
    (a path or a callable) are required; ``modalities`` (default ``(loader.modality,)``),
    ``feeds``, ``broken_categories(root)`` and ``root_env`` are optional. Declare the
    functions as ``staticmethod``."""
    missing = [a for a in ("list_categories", "default_root") if not hasattr(loader, a)]
    modalities = getattr(loader, "modalities", None)
    if modalities is None and isinstance(getattr(loader, "modality", None), str):
        modalities = (loader.modality,)
    if modalities is None:
        missing.append("modalities (or modality)")
    if missing:
        raise TypeError(
            f"loader class {loader.__module__}.{loader.__qualname__} lacks {', '.join(missing)}"
        )
    env = getattr(loader, "root_env", None)
    return DatasetSpec(
        name,
        loader,
        loader.list_categories,
        _as_root(loader.default_root, env),
        tuple(modalities),
        tuple(getattr(loader, "feeds", None) or modalities),
        getattr(loader, "broken_categories", None) or _no_broken,
        env,
    )


def _register_entry_point(name: str, obj: Any) -> None:
    if isinstance(obj, DatasetSpec):
        add_dataset(replace(obj, name=name))
    elif inspect.ismodule(obj):
        pass  # its import registered its loaders with @register_dataset
    elif inspect.isclass(obj):
        if hasattr(obj, "list_categories"):
            add_dataset(spec_from_loader(name, obj))
        elif not any(s.loader is obj for s in _REGISTRY.values()):
            raise TypeError(
                f"loader class {obj.__module__}.{obj.__qualname__} neither carries "
                "list_categories/default_root/modalities nor registered with @register_dataset"
            )
    else:
        raise TypeError(f"expected a DatasetSpec, a loader class or a module, got {obj!r}")


def _load_all() -> None:
    """Built-ins register on import of ``bench.datasets``; plugins once, on the first lookup
    (a broken plugin is an error at every lookup until it is fixed or removed)."""
    global _loaded, _loading, _plugin_source
    if _loaded or _loading:
        return
    _loading = True
    try:
        importlib.import_module("bench.datasets")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            _plugin_source = f"plugin:{dist}"
            try:
                _register_entry_point(ep.name, ep.load())
            except Exception as err:  # name the plugin, not just the failing line
                raise RuntimeError(
                    f"plugin dataset {ep.name!r} from distribution {dist!r} failed to load "
                    f"({ep.value}): {err}"
                ) from err
            finally:
                _plugin_source = None
        _loaded = True
    finally:
        _loading = False


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets (built-in and plugins), sorted by name."""
    _load_all()
    return [DatasetInfo(n, _REGISTRY[n], _REGISTRY[n].source) for n in sorted(_REGISTRY)]


def get_dataset(name: str) -> DatasetSpec:
    _load_all()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownDatasetError(
            f"unknown dataset {name!r}{hint}; known datasets: {', '.join(known)}"
        )
    return _REGISTRY[name]


class _Datasets(Mapping[str, DatasetSpec]):
    """Read-only name -> spec view of the registry (plugins load on first access)."""

    def __getitem__(self, name: str) -> DatasetSpec:
        return get_dataset(name)

    def __iter__(self) -> Iterator[str]:
        _load_all()
        return iter(sorted(_REGISTRY))

    def __len__(self) -> int:
        _load_all()
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        _load_all()
        return name in _REGISTRY

    def __repr__(self) -> str:
        return f"DATASETS({', '.join(self)})"


DATASETS: Mapping[str, DatasetSpec] = _Datasets()
