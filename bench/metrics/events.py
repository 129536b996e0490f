"""Event ids of pixel scores against the sorted distinct scores of the defective pixels.

Every pixel curve (ROC, precision-recall, PRO) changes its slope only at the scores of defective
pixels: between two consecutive distinct positive scores only defect-free pixels are passed, so
TP and PRO stay constant and the trapezoids there are rectangles whatever the order of those
pixels. The curves are therefore exact given, for each distinct positive score u_k, the
positives at u_k and the defect-free pixels equal to u_k or strictly between u_k and the next.
Event ids (ascending): 2k+1 = "equal to u_k", 2k = "strictly between u_(k-1) and u_k", and
2K = "above every positive". Only the positives are sorted; defect-free pixels are counted into
events chunk by chunk, so memory stays O(positives + chunk) beyond the stored maps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_LOCAL_STEPS = 2  # positives compared directly per ambiguous pixel before a binary search
_BINS_PER_POSITIVE = 4
_MAX_BINS = 1 << 22  # a larger table costs more in cache misses than it saves


def _bin_of(x: torch.Tensor, offset: float, scale: float, nbins: int) -> torch.Tensor:
    """Monotone (non-decreasing) int32 bin index in [0, nbins + 2] of float32 scores: a
    multiply, an add, clamping and truncation of non-negatives each preserve order under IEEE
    rounding. The same arithmetic bins the positives and every other pixel (NumPy on the CPU,
    where its element-wise kernels are several times faster than torch's)."""
    if x.device.type == "cpu":
        y = x.numpy() * np.float32(scale)
        y += np.float32(offset)
        np.clip(y, 0, nbins + 2, out=y)
        return torch.from_numpy(y.astype(np.int32))
    y = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
    y += torch.tensor(offset, dtype=x.dtype, device=x.device)
    return y.clamp_(0, nbins + 2).to(torch.int32)


def _binning(u: torch.Tensor):
    """A linear binning of the positives' range (a few bins per distinct positive score) and,
    per bin, the event of any score falling in it (>= 0), or ``-1 - k`` where the bin holds
    positive scores, u_k being the first of them."""
    k = u.numel()
    if k < 64:
        return None
    lo, hi = float(u[0]), float(u[-1])
    nbins = int(min(_MAX_BINS, _BINS_PER_POSITIVE * k))
    scale = nbins / (hi - lo) if hi > lo else 1.0
    if not scale < 1e37:  # the range is too narrow for float32 bins: binary search only
        return None
    scale = float(np.float32(scale))
    offset = float(np.float32(1.5 - lo * scale))  # u_0 near 1.5: scores far below it in bin 0
    per_bin = torch.bincount(_bin_of(u, offset, scale, nbins), minlength=nbins + 3)
    first = per_bin.cumsum(0) - per_bin  # number of u_k in lower bins
    table = torch.where(per_bin == 0, 2 * first, -1 - first).to(torch.int32)
    inf = torch.full((_LOCAL_STEPS + 1,), math.inf, dtype=u.dtype, device=u.device)
    return offset, scale, nbins, table, torch.cat([u, inf])


def _exact_events(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """2 * (number of u_k below x) + (x equals some u_k), by binary search."""
    k = u.numel()
    below = torch.searchsorted(u, x)
    equal = u[below.clamp(max=k - 1)] == x
    return 2 * below + equal


def _events(x: torch.Tensor, u: torch.Tensor, bins: tuple | None) -> torch.Tensor:
    """Event id of each float32 score in ``x`` against the sorted distinct positive scores
    ``u``: 2k+1 if equal to u_k, else 2 * (number of u_k below it)."""
    if u.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    if bins is None:
        return _exact_events(x, u)
    offset, scale, nbins, table, u_padded = bins
    events = table.index_select(0, _bin_of(x, offset, scale, nbins))
    if x.device.type == "cpu":
        _resolve_numpy(x.numpy(), events.numpy(), u, u_padded)
    else:
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
    ambiguous = np.flatnonzero(events < 0)
    if ambiguous.size == 0:
        return
    xa = x[ambiguous]
    first = -1 - events[ambiguous].astype(np.int64)
    exact = 2 * first
    for j in range(_LOCAL_STEPS):
        uj = u_padded.index_select(0, torch.from_numpy(first + j)).numpy()
        exact += xa >= uj
        exact += xa > uj
    beyond = u_padded.index_select(0, torch.from_numpy(first + _LOCAL_STEPS)).numpy()
    crowded = np.flatnonzero(xa >= beyond)
    if crowded.size:
        exact[crowded] = _exact_events(torch.from_numpy(xa[crowded]), u).numpy()
    events[ambiguous] = exact
