"""Detector parameters checked against the constructor's type hints before any job starts.

A detector states each parameter's type in its ``__init__`` signature, and a range where one
applies with ``typing.Annotated``::

    def __init__(self, sigma: Annotated[float, Range(ge=0)] = 4.0,
                 score: Literal["max", "topk"] = "max", ks: tuple[int, ...] = (16, 32)): ...

:func:`check_params` reads those hints (``int``, ``float``, ``bool``, ``str``, ``None``,
``Literal``, unions, ``tuple``/``list`` of a type, ``Annotated`` ranges and :class:`Length`)
and names the detector, parameter, value and what is expected for the first value that does not
fit. What a hint cannot express (a layer below the encoder's depth, warmup <= iterations, a
known backbone name) a detector checks in ``Detector.validate_params``, raising
:meth:`ParamError.bad`; the plan runs both before any job starts.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from bench.errors import ConfigError

__all__ = [
    "Annotated",
    "Length",
    "Literal",
    "NonEmpty",
    "ParamError",
    "Range",
    "check_params",
    "describe",
]


class ParamError(ConfigError):
    """A detector parameter does not fit its declared type or range."""

    @classmethod
    def bad(cls, name: str, value: Any, why: str) -> ParamError:
        """``parameter NAME = VALUE WHY``; the plan prefixes the detector's name."""
        return cls(f"parameter {name} = {value!r} {why}")


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of each number of a sequence): ``ge``/``gt`` below, ``le``/``lt``
    above; None means unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return not (
            (self.ge is not None and not x >= self.ge)
            or (self.gt is not None and not x > self.gt)
            or (self.le is not None and not x <= self.le)
            or (self.lt is not None and not x < self.lt)
        )

    def __str__(self) -> str:
        low = (
            f">= {self.ge:g}"
            if self.ge is not None
            else f"> {self.gt:g}"
            if self.gt is not None
            else ""
        )
        high = (
            f"<= {self.le:g}"
            if self.le is not None
            else f"< {self.lt:g}"
            if self.lt is not None
            else ""
        )
        return " and ".join(p for p in (low, high) if p)


@dataclass(frozen=True)
class Length:
    """How many items a list parameter holds: at least ``min``, at most ``max`` (None: any)."""

    min: int = 0
    max: int | None = None

    def holds(self, n: int) -> bool:
        return n >= self.min and (self.max is None or n <= self.max)

    def __str__(self) -> str:
        if self.max is None:
            return {0: "", 1: "non-empty"}.get(self.min, f"of at least {self.min}")
        if self.min == self.max:
            return f"of exactly {self.min}"
        return f"of {self.min} to {self.max}"


#: a list parameter that must hold at least one item
NonEmpty = Length(min=1)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from TOML or the command line) fits the type hint ``hint``."""
    if hint is Any:
        return True
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        ranges = [a for a in hint.__metadata__ if isinstance(a, Range)]
        if not conforms(value, args[0]):
            return False
        lengths = [a for a in hint.__metadata__ if isinstance(a, Length)]
        if isinstance(value, (list, tuple)) and not all(n.holds(len(value)) for n in lengths):
            return False
        numbers = value if isinstance(value, (list, tuple)) else [value]
        return all(r.holds(x) for r in ranges for x in numbers if isinstance(x, (int, float)))
    if _is_union(origin):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (isinstance(value, float) and math.isnan(value))
        )
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(map(conforms, value, args))
        return all(conforms(v, args[0]) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not know: left to the detector


def describe(hint: Any) -> str:
    """The expected value in words, e.g. ``a number >= 0`` or ``one of 'max', 'topk'``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        length = next((a for a in hint.__metadata__ if isinstance(a, Length)), None)
        if length is not None:
            return _describe_list(args[0], str(length))
        ranges = " and ".join(str(a) for a in hint.__metadata__ if isinstance(a, Range))
        return f"{describe(args[0])} {ranges}".strip()
    if _is_union(origin):
        kinds = [describe(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" (or unset)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is None or hint is type(None):
        return "unset"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (tuple, list):
        return _describe_list(hint)
    return getattr(hint, "__name__", str(hint))


def _describe_list(hint: Any, length: str = "") -> str:
    """``a list of integers, each >= 0``; with ``length`` e.g. ``a non-empty list of ...`` or
    ``a list of exactly 2 numbers``."""
    args = get_args(hint)
    if not args:
        return (
            f"a list {length} items"
            if length.startswith("of ")
            else f"a {length} list".replace("  ", " ")
        )
    inner, bounds = args[0], ""
    if get_origin(inner) is Annotated:
        bounds = ", each " + " and ".join(
            str(a) for a in inner.__metadata__ if isinstance(a, Range)
        )
        inner = get_args(inner)[0]
    plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    items = plural.get(inner, describe(inner))
    if length.startswith("of "):
        return f"a list {length} {items}{bounds}"
    return f"a {length + ' ' if length else ''}list of {items}{bounds}"


def param_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of ``cls.__init__`` (with ``Annotated`` metadata kept)."""
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:  # an unresolvable hint in a plugin: nothing to check against
        return {}


def check_params(cls: type, params: dict[str, Any], where: str) -> None:
    """Raises :class:`ParamError` for the first of ``params`` that does not fit its hint."""
    hints = param_hints(cls)
    for name, value in params.items():
        hint = hints.get(name)
        if hint is not None and not conforms(value, hint):
            raise ParamError(
                f"{where}: parameter {name} = {value!r} is not valid; expected {describe(hint)}"
            )
