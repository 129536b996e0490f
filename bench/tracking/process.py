"""Which process, on which machine, a run belongs to (so a run left RUNNING by a dead process
can be told from a live one), and the git state every run is tagged with."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from pathlib import Path


def _machine() -> str:
    """This boot of this machine and this process's pid namespace (Linux), so that pids are
    only compared where they name the same processes: containers sharing a host name, or a
    reboot, never make a live run look dead. Empty where unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field
    22): unlike a wall-clock start time, a clock step does not move it. Empty where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Where this process runs: host, machine (boot and pid namespace), pid and the pid's
    start (pids are reused)."""
    import psutil

    me = psutil.Process()
    return {
        "adbench.host": socket.gethostname(),
        "adbench.machine": _machine(),
        "adbench.pid": str(me.pid),
        "adbench.pid_started": f"{me.create_time():.3f}",
        "adbench.pid_ticks": _start_ticks(me.pid),
    }


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` is known to be gone: it ran
    in this boot of this machine, in this pid namespace, and its pid is not alive, is a
    zombie, or now belongs to a process started later. Runs from elsewhere, or without the
    tags, are never called gone."""
    import psutil

    machine = _machine()
    if tags.get("adbench.host") != socket.gethostname() or not machine:
        return False
    if tags.get("adbench.machine") != machine:
        return False
    try:
        pid = int(tags["adbench.pid"])
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        ticks = tags.get("adbench.pid_ticks", "")
        if ticks and _start_ticks(pid):
            return _start_ticks(pid) != ticks
        started = float(tags.get("adbench.pid_started", "nan"))
        return abs(proc.create_time() - started) > 1.0  # NaN: never a mismatch
    except psutil.NoSuchProcess:
        return True
    except (KeyError, ValueError, psutil.Error):
        return False


@functools.cache
def git_state() -> dict[str, str]:
    """The checkout's commit and whether it has uncommitted changes ("unknown" outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except Exception:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
