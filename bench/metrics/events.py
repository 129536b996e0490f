"""Event ids of pixel scores against the sorted distinct scores of the defective pixels.

Every pixel curve (ROC, precision-recall, PRO) changes its slope only at the scores of defective
pixels: between two consecutive distinct positive scores only defect-free pixels are passed, so
TP and PRO stay constant and the trapezoids there are rectangles whatever the order of those
pixels. The curves are therefore exact given, for each distinct positive score u_k, the
positives at u_k and the defect-free pixels equal to u_k or strictly between u_k and the next.
Event ids (ascending): 2k+1 = "equal to u_k", 2k = "strictly between u_(k-1) and u_k", and
2K = "above every positive". Only the positives are sorted (:class:`Positives`, 8 bytes each);
every pixel is counted into its event chunk by chunk, in buffers each counting thread reuses,
and the curves are swept a block of events at a time (:mod:`bench.metrics.sweep`): beyond the
stored maps, memory is those 8 bytes per defective pixel, 4 (int32) per group and event (two
events per distinct defective score), and fixed work buffers.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

_LOCAL_STEPS = 2  # positives compared directly per ambiguous pixel before a binary search
_BINS_PER_POSITIVE = 4
_MAX_BINS = 1 << 22  # a larger table costs more in cache misses than it saves
_RESOLVE_BLOCK = 1 << 17  # pixels resolved at a time on the CPU


class Scratch:
    """Work buffers of one counting thread, reused from chunk to chunk (of at most ``capacity``
    pixels): arrays allocated afresh for every chunk, of varying sizes, leave the allocator
    holding hundreds of MB per thread."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        """The first ``n`` elements of buffer ``name`` (allocated for ``capacity`` elements, or
        more when too small)."""
        buf = self.buffers.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self.buffers[name] = np.empty(max(n, self.capacity), dtype=dtype)
        return buf[:n]


def _bin_of(
    x: torch.Tensor, offset: float, scale: float, nbins: int, scratch: Scratch | None = None
) -> torch.Tensor:
    """Monotone (non-decreasing) integer bin index in [0, nbins + 2] of float32 scores: a
    multiply, an add, clamping and truncation of non-negatives each preserve order under IEEE
    rounding. The same arithmetic bins the positives and every other pixel (NumPy on the CPU,
    where its element-wise kernels are several times faster than torch's, into ``scratch``)."""
    if x.device.type == "cpu":
        s, n = scratch or Scratch(), x.numel()
        y = np.multiply(x.numpy(), np.float32(scale), out=s.get("y", n, np.float32))
        y += np.float32(offset)
        np.clip(y, 0, nbins + 2, out=y)
        index = s.get("bins", n, np.int64)  # NumPy's index type: np.take copies no index
        np.copyto(index, y, casting="unsafe")  # truncation, as astype
        return torch.from_numpy(index)
    y = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
    y += torch.tensor(offset, dtype=x.dtype, device=x.device)
    return y.clamp_(0, nbins + 2).to(torch.int32)


def _binning(u: torch.Tensor):
    """A linear binning of the positives' range (a few bins per distinct positive score) and,
    per bin, the event of any score falling in it (>= 0), or ``-1 - k`` where the bin holds
    positive scores, u_k being the first of them."""
    k = u.numel()
    if k < 64 or 2 * k + 1 >= 2**31:  # binned events are int32
        return None
    lo, hi = float(u[0]), float(u[-1])
    nbins = int(min(_MAX_BINS, _BINS_PER_POSITIVE * k))
    scale = nbins / (hi - lo) if hi > lo else 1.0
    if not scale < 1e37:  # the range is too narrow for float32 bins: binary search only
        return None
    scale = float(np.float32(scale))
    offset = float(np.float32(1.5 - lo * scale))  # u_0 near 1.5: scores far below it in bin 0
    per_bin = np.zeros(nbins + 3, dtype=np.int32)
    for at in range(0, k, _RESOLVE_BLOCK):  # u is sorted: so are its bins
        index = _bin_of(u[at : at + _RESOLVE_BLOCK], offset, scale, nbins).cpu().numpy()
        starts = np.flatnonzero(np.append(True, index[1:] != index[:-1]))
        per_bin[index[starts]] += np.diff(np.append(starts, index.size)).astype(np.int32)
    first = np.cumsum(per_bin, dtype=np.int32)
    first -= per_bin  # number of u_k in lower bins
    table = -1 - first
    np.multiply(first, 2, out=first)
    np.copyto(table, first, where=per_bin == 0)
    inf = torch.full((_LOCAL_STEPS + 1,), math.inf, dtype=u.dtype, device=u.device)
    return offset, scale, nbins, torch.from_numpy(table).to(u.device), torch.cat([u, inf])


def _exact_events(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """2 * (number of u_k below x) + (x equals some u_k), by binary search."""
    k = u.numel()
    below = torch.searchsorted(u, x)
    equal = u[below.clamp(max=k - 1)] == x
    return 2 * below + equal


def _events(
    x: torch.Tensor, u: torch.Tensor, bins: tuple | None, scratch: Scratch | None = None
) -> torch.Tensor:
    """Event id of each float32 score in ``x`` against the sorted distinct positive scores
    ``u``: 2k+1 if equal to u_k, else 2 * (number of u_k below it). On the CPU the result and
    the work arrays are ``scratch``'s buffers (overwritten by its next use)."""
    if u.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    if bins is None:
        return _exact_events(x, u)
    offset, scale, nbins, table, u_padded = bins
    if x.device.type == "cpu":  # NumPy only: single-threaded, no waits on torch's thread pool
        s = scratch or Scratch()
        events = s.get("events", x.numel(), np.int32)
        np.take(table.numpy(), _bin_of(x, offset, scale, nbins, s).numpy(), out=events)
        _resolve_numpy(x.numpy(), events, u, u_padded)
        return torch.from_numpy(events)
    events = table.index_select(0, _bin_of(x, offset, scale, nbins))
    _resolve_torch(x, events, u, u_padded)
    return events


# A score in a bin holding u_k, u_k+1, ... lies below every positive of the higher bins, so
# comparing it with the next few positives counts it exactly unless the bin holds more of them
# (then a binary search does). Both versions overwrite the negative (ambiguous) events in place.
def _resolve_torch(x, events, u, u_padded) -> None:
    ambiguous = torch.nonzero(events < 0).reshape(-1)
    if ambiguous.numel() == 0:
        return
    xa = x.index_select(0, ambiguous)
    first = -1 - events.index_select(0, ambiguous).long()
    exact = 2 * first
    for j in range(_LOCAL_STEPS):
        uj = u_padded.index_select(0, first + j)
        exact += (xa >= uj).long() + (xa > uj).long()
    crowded = torch.nonzero(xa >= u_padded.index_select(0, first + _LOCAL_STEPS)).reshape(-1)
    if crowded.numel():
        exact.index_copy_(0, crowded, _exact_events(xa.index_select(0, crowded), u))
    events.index_copy_(0, ambiguous, exact.to(events.dtype))


def _resolve_numpy(x: np.ndarray, events: np.ndarray, u, u_padded) -> None:
    # block by block: every temporary stays small, and the allocator reuses it
    for at in range(0, x.size, _RESOLVE_BLOCK):
        _resolve_block(x[at : at + _RESOLVE_BLOCK], events[at : at + _RESOLVE_BLOCK], u, u_padded)


def _resolve_block(x: np.ndarray, events: np.ndarray, u, u_padded) -> None:
    ambiguous = np.flatnonzero(events < 0)
    if ambiguous.size == 0:
        return
    xa = x[ambiguous]
    first = -1 - events[ambiguous].astype(np.int64)
    exact = 2 * first
    padded = u_padded.numpy()
    for j in range(_LOCAL_STEPS):
        uj = padded[first + j]
        exact += xa >= uj
        exact += xa > uj
    crowded = np.flatnonzero(xa >= padded[first + _LOCAL_STEPS])
    if crowded.size:
        exact[crowded] = _exact_events(torch.from_numpy(xa[crowded]), u).numpy()
    events[ambiguous] = exact


def _order_keys(x: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 scores in the scores' order (-0.0 keyed as 0.0)."""
    bits = (x.astype(np.float32, copy=False) + np.float32(0)).view(np.uint32)  # -0.0 -> +0.0
    return np.where(bits >> 31 != 0, ~bits, bits | np.uint32(1 << 31))


def _from_keys(keys: np.ndarray) -> np.ndarray:
    """The float32 scores of :func:`_order_keys`."""
    bits = ~keys
    np.bitwise_and(keys, np.uint32(0x7FFFFFFF), out=bits, where=keys >> 31 != 0)
    return bits.view(np.float32)


class Positives:
    """The defective pixels sorted by score, each with a payload (its region or group) below
    2^32: packed as uint64 (score key << 32 | payload), one in-place sort orders both, 8 bytes
    per pixel. ``u``: the distinct scores, ascending (float32, host)."""

    def __init__(self, parts, total: int) -> None:
        """``parts``: (float32 scores, payloads) per image, ``total`` pixels in all."""
        self.keys = np.empty(total, dtype=np.uint64)
        at = 0
        for scores, payload in parts:
            part = self.keys[at : at + scores.size]
            np.left_shift(_order_keys(scores), 32, out=part, dtype=np.uint64)
            part |= payload.astype(np.uint32)
            at += scores.size
        if at != total:
            raise ValueError(f"{at} defective pixels where the masks hold {total}")
        self.keys.sort()
        high = self.keys.view(np.uint32)[1 if sys.byteorder == "little" else 0 :: 2]
        first = np.ones(total, dtype=bool)
        np.not_equal(high[1:], high[:-1], out=first[1:])
        self.u = torch.from_numpy(_from_keys(high[first]))

    def block(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        """(the index among ``u[k0:k1]``, the payload) of every positive scoring in it."""
        part = self.keys[self._start(k0) : self._start(k1)]
        high = (part >> 32).astype(np.uint32)
        k = np.zeros(part.size, dtype=np.int64)
        np.cumsum(high[1:] != high[:-1], out=k[1:])
        return k, (part & 0xFFFFFFFF).astype(np.int64)

    def _start(self, k: int) -> int:
        """Position of the first positive scoring ``u[k]`` or more."""
        if k >= self.u.numel():
            return self.keys.size
        key = np.uint64(_order_keys(self.u.numpy()[k : k + 1])[0])
        return int(np.searchsorted(self.keys, key << 32))


#: distinct positive scores per block when events are swept (two events each)
BLOCK = 1 << 18


def event_blocks(n_distinct: int):
    """(k0, k1, a, b) from the highest scores down: events a..b-1 (ascending ids, ``a`` even)
    are those of the distinct positive scores k0..k1-1 (``BLOCK`` of them), the first block
    also holding event 2K (above every positive)."""
    size = BLOCK
    top = b = 2 * n_distinct + 1
    while b > 0:
        a = max(0, b - (1 if b == top else 0) - 2 * size)
        yield a // 2, b // 2, a, b
        b = a
