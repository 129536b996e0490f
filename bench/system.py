"""Device choice, seeding, and peak-memory measurement."""

from __future__ import annotations

import os
import platform
import random
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from bench.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" picks CUDA when available, else CPU; "cuda" without a GPU, or a name torch does not
    know, is a ConfigError naming what is expected."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N (or mps), got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {device!r} was asked for, but torch {torch.__version__} sees no CUDA GPU; "
                "use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: torch sees {count} CUDA GPU(s) (cuda:0..)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for, but torch sees no Apple GPU")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@dataclass
class PeakMemory:
    host_bytes: int = 0
    gpu_bytes: int = 0


@contextmanager
def track_peak_memory(device: torch.device, interval: float = 0.05):
    """Peak resident memory of this process (sampled) and peak CUDA allocation in the block."""
    peak = PeakMemory()
    proc = psutil.Process()
    stop = threading.Event()

    def sample() -> None:
        while True:
            peak.host_bytes = max(peak.host_bytes, proc.memory_info().rss)
            if stop.wait(interval):
                return

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.host_bytes = max(peak.host_bytes, proc.memory_info().rss)
        if device.type == "cuda":
            peak.gpu_bytes = torch.cuda.max_memory_allocated(device)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
