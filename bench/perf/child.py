"""Runs a reference implementation (anomalib, installed only in .venv-perf) in a child process."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable


def run_reference(target: Callable, args: tuple, budget: float) -> dict:
    """``target(*args, queue)`` in a spawned process, stopped after ``budget`` seconds.

    Returns what ``target`` put on the queue, ``{"status": "timeout", "elapsed": s}``, or a
    status saying anomalib is missing or the child failed."""
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return {"status": "anomalib not installed (make perf installs it into .venv-perf)"}
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it on import, in the child too
    ctx = mp.get_context("spawn")  # fork after torch has run threads can deadlock
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    start = time.perf_counter()
    proc.start()
    proc.join(budget)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"status": "timeout", "elapsed": time.perf_counter() - start}
    return queue.get() if not queue.empty() else {"status": f"failed (exit {proc.exitcode})"}
