"""Value checks of the config's fields and the command line's flags (bench.config, bench.cli):
each check returns None for a good value, else what was expected; :class:`Naming` turns that
into one line naming the flag (``--gpus-per-job inf``) or the file and key
(``c.toml: gpus_per_job = inf``)."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.errors import ConfigError

#: None: the value is fine; else a phrase saying what was expected ("an integer >= 1")
Check = Callable[[Any], "str | None"]

#: the most GPUs one machine holds (a job runs on one machine): more per job is a typo
MAX_GPUS_PER_JOB = 16
#: the most CPUs one machine holds
MAX_CPUS_PER_JOB = 1024
#: Ray retries a lost worker's job this often at most; more only hides a broken cluster
MAX_RETRIES = 100
#: bootstrap resamples: 0 (no intervals), else enough for a 95% interval and bounded memory
MIN_RESAMPLES, MAX_RESAMPLES = 50, 100_000
#: Ray's finest fraction of a resource
RESOURCE_UNIT = 0.0001


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (no bool, nan or inf)."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def integer(lo: int, hi: int | None = None) -> Check:
    """An integer from ``lo`` to ``hi`` (inclusive; no upper bound without ``hi``)."""
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def check(value: Any) -> str | None:
        ok = is_int(value) and value >= lo and (hi is None or value <= hi)
        return None if ok else expected

    return check


def optional(check: Check) -> Check:
    """``check``, or None (the default: left out)."""
    return lambda value: None if value is None else check(value)


def one_of(choices: Iterable[str]) -> Check:
    """One of ``choices``, with the nearest as a suggestion."""
    choices = tuple(choices)
    return lambda value: None if value in choices else expected_choice(value, choices)


def expected_choice(value: Any, choices: tuple[str, ...]) -> str:
    """What was expected: "one of a, b (did you mean 'b'?)"."""
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"one of {', '.join(choices)}{hint}"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty name"


def seeds(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(integer(0, 2**32 - 1)(s) is None for s in value)
    return None if ok else "one or more integer seeds from 0 to 2^32 - 1 (numpy's range)"


def resamples(value: Any) -> str | None:
    ok = is_int(value) and (value == 0 or MIN_RESAMPLES <= value <= MAX_RESAMPLES)
    return None if ok else (
        f"0 (no intervals) or from {MIN_RESAMPLES} to {MAX_RESAMPLES} resamples for a 95% "
        "interval"
    )  # fmt: skip


def paths(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(isinstance(p, str) and p for p in value)
    return None if ok else "one or more file paths"


def gpus(value: Any) -> str | None:
    """GPUs per Ray job: 0, a fraction (jobs share a GPU), or whole GPUs on one machine."""
    fraction = is_number(value) and (value == 0 or RESOURCE_UNIT <= value <= 1)
    whole = is_int(value) or (is_number(value) and float(value).is_integer())
    if fraction or (whole and 1 <= value <= MAX_GPUS_PER_JOB):
        return None
    return (
        f"0, a fraction from {RESOURCE_UNIT} to 1 (jobs share a GPU) or a whole number of GPUs "
        f"up to {MAX_GPUS_PER_JOB}"
    )


def cpus(value: Any) -> str | None:
    ok = is_number(value) and (value == 0 or RESOURCE_UNIT <= value <= MAX_CPUS_PER_JOB)
    return None if ok else f"a number of CPUs from {RESOURCE_UNIT} to {MAX_CPUS_PER_JOB}"


def address(value: Any) -> str | None:
    """A Ray address: auto, local, HOST[:PORT] or ray://HOST[:PORT] (the format only)."""
    expected = "a Ray address: auto, HOST:PORT or ray://HOST:PORT (port 1 to 65535)"
    if not isinstance(value, str) or not value.strip():
        return expected
    if value in ("auto", "local"):
        return None
    parts = urlsplit("//" + value.removeprefix("ray://"))
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        return expected
    ok = parts.hostname and parts.path in ("", "/") and port != 0 and not parts.query
    return None if ok else expected


def cli_text(value: Any) -> str:
    """A value as typed on the command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(cli_text, value))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # "-1" as typed, not "-1.0"
    return repr(value) if isinstance(value, str) else str(value)


def toml_text(value: Any) -> str:
    """A value as written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_text, value)) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class Naming:
    """Names a setting where the user wrote it: ``flags`` maps field names to their flags
    (the command line), otherwise the key in ``where`` (a file, "file: detector 'x'")."""

    where: str
    flags: dict[str, str] | None = None

    def __call__(self, key: str, value: Any) -> str:
        if self.flags is not None and key in self.flags:
            return f"{self.flags[key]} {cli_text(value)}"
        return f"{self.where}: {key} = {toml_text(value)}"

    def check(self, obj: Any, checks: dict[str, Check]) -> None:
        """Raises a ConfigError naming the first field of ``obj`` a check refuses."""
        for key, check in checks.items():
            value = getattr(obj, key)
            expected = check(value)
            if expected is not None:
                raise ConfigError(f"{self(key, value)} is not valid; expected {expected}")
