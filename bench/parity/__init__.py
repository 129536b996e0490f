"""Parity with the official code behind ``make parity``: each method's module builds our model
and the official one (from a checkout whose path the user gives) with shared random weights,
runs both on the same inputs and reports every quantity's difference. Never imported by the
library; nothing of the official code is copied here, it is imported from the given path."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

#: float32 rounding: the bar every quantity of a faithful port must stay under (relative)
FLOAT32_TOLERANCE = 1e-5


@dataclass
class Check:
    """One compared quantity: the largest absolute difference and the same relative to the
    official values' largest magnitude; ``explained`` names a known, intended difference."""

    quantity: str
    max_abs: float
    max_rel: float
    tolerance: float = FLOAT32_TOLERANCE
    explained: str = ""

    @property
    def status(self) -> str:
        if self.max_rel <= self.tolerance:
            return "pass"
        return "explained" if self.explained else "FAIL"


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return np.concatenate([_array(t).ravel() for t in x])
    return np.asarray(x, dtype=np.float64)


def compare(
    quantity: str, ours, official, tolerance: float = FLOAT32_TOLERANCE, explained: str = ""
) -> Check:
    """The difference between two tensors (or lists of tensors, or numbers) of one shape."""
    a, b = _array(ours), _array(official)
    if a.shape != b.shape:
        raise ValueError(f"{quantity}: ours has shape {a.shape}, the official {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{quantity}: a non-finite value (ours or official)")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return Check(quantity, diff, diff / scale if scale > 0 else diff, tolerance, explained)


@dataclass
class Report:
    """One method's table and what it was measured against."""

    method: str
    official: str  # repository and commit (or package and version)
    setting: str  # model size, dtype, inputs
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Check:
        check = compare(*args, **kwargs)
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def markdown(self, command: str) -> str:
        lines = [
            f"# Parity: {self.method}",
            "",
            f"- Official code: {self.official}",
            f"- Setting: {self.setting}",
            f"- Command: `{command}`",
            f"- Measured {datetime.date.today()} on {platform.machine()} CPU, torch "
            f"{torch.__version__}, python {platform.python_version()}",
            "- max rel = max |ours - official| / max |official|; pass when it is within the "
            "tolerance, 'explained' when a named, intended difference exceeds it",
            "",
            "| quantity | max abs | max rel | tolerance | status |",
            "|---|---:|---:|---:|---|",
        ]
        for c in self.checks:
            lines.append(
                f"| {c.quantity} | {c.max_abs:.2e} | {c.max_rel:.2e} | {c.tolerance:.0e} "
                f"| {c.status} |"
            )
        explained = [c for c in self.checks if c.status == "explained"]
        if explained or self.notes:
            lines.append("")
        lines += [f"- {c.quantity}: {c.explained}" for c in explained]
        lines += [f"- {n}" for n in self.notes]
        verdict = "every quantity passes or is explained" if self.passed else "FAILED"
        return "\n".join([*lines, "", f"Verdict: {verdict}.", ""])

    def save(self, output: str | Path, command: str) -> Path:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        name = self.method.replace(" ", "-")
        rows = [dict(asdict(c), status=c.status) for c in self.checks]
        record = dict(method=self.method, official=self.official, setting=self.setting,
                      checks=rows, notes=self.notes, passed=self.passed)  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps(record, indent=2))
        path = out / f"{name}.md"
        path.write_text(self.markdown(command))
        return path


def checkout_version(path: str | Path) -> str:
    """``<path> at <commit>`` for a git checkout, else the path alone."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(path)
    return f"{path} at commit {commit}"


@contextlib.contextmanager
def official_modules(path: str | Path, names: Sequence[str]) -> Iterator[None]:
    """Makes a checkout importable for the block: its folder first on ``sys.path``, and the
    top-level module names it shares with other checkouts (``models``, ``utils``) forgotten
    before and after, so two official repositories never see each other's modules."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise SystemExit(f"official checkout not found: {root}")

    def forget() -> None:
        for key in list(sys.modules):
            if key.split(".")[0] in names:
                del sys.modules[key]

    forget()
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(root))
        forget()


def share_weights(src: torch.nn.Module, dst: torch.nn.Module, mapping=None) -> None:
    """Copies ``src``'s parameters and buffers into ``dst`` by name (``mapping`` renames a src
    key to dst's); every dst entry must be filled, with the same shape."""
    state = src.state_dict()
    if mapping is not None:
        state = {mapping(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k is not None}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    if missing:
        raise KeyError(f"not filled from the other model: {missing[:8]}")
    del unexpected  # the other model may hold more (e.g. unused heads)


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
