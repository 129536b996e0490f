"""Nearest-neighbour distances to a memory bank in bounded memory."""

from __future__ import annotations

import torch


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, max_pairs: int = 1 << 24, squared: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Euclidean distance, or its square with ``squared``, and index) of each query's nearest
    bank entry.

    The nearest entry is found with ``|q|^2 - 2 q.b + |b|^2`` (one matrix product), computed for
    blocks of queries and bank entries so that at most ``max_pairs`` distances exist at a time,
    whatever the bank's size; the running minimum is kept per query. Its distance is then
    recomputed as ``|q - b|^2``, free of the expansion's cancellation (which costs float32 up to
    1e-4 of the score where features are long and distances short).
    """
    bank_sq = (bank * bank).sum(1)
    rows = max(1, min(queries.shape[0], max_pairs // max(1, *bank.shape)))
    cols = max(1, max_pairs // rows)
    best = torch.empty(queries.shape[0], device=queries.device)
    where = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for r in range(0, queries.shape[0], rows):
        q = queries[r : r + rows]
        run_best = run_where = None
        for c in range(0, bank.shape[0], cols):
            # |q|^2 is the same along a row: it cannot change the row's minimum
            d = torch.addmm(bank_sq[c : c + cols], q, bank[c : c + cols].T, alpha=-2)
            value, idx = d.min(1)
            if run_best is None:
                run_best, run_where = value, idx + c
            else:
                better = value < run_best
                run_best = torch.where(better, value, run_best)
                run_where = torch.where(better, idx + c, run_where)
        exact = (q - bank[run_where]).pow_(2).sum(1)
        best[r : r + rows] = exact if squared else exact.sqrt_()
        where[r : r + rows] = run_where
    return best, where
