"""Greedy k-center coreset (PatchCore's subsampling), exact and fast on a CPU.

Greedy k-center picks, at every step, the point farthest from everything picked so far. The
plain algorithm touches every point at every step (``N x k`` distance evaluations: about half an
hour for a 214,000-patch bank on two CPU cores). :func:`greedy_coreset` makes the same choices
while skipping most of that work: points are grouped into small blocks (k-means clusters cut to
at most ``block`` points) with a centre and a radius, and a new pick c can only bring a point x of
block b closer if ``|c - centre_b| - radius_b < max_{x in b} d(x)`` (triangle inequality); the
other blocks are left as they are. Every distance that is computed is an exact Euclidean
distance, so the picks are those of the plain algorithm (up to exact ties).

PatchCore's own sampler (the official ``ApproximateGreedyCoresetSampler``, used for the paper's
results) projects the features with a bias-free ``torch.nn.Linear`` (:func:`coreset_projection`)
and does not start from a picked point: every point starts at its mean distance to 10 random
points (:func:`start_distances`), so the first pick is the point farthest from them on average and
those start points stay as virtual centres; ``greedy_coreset(..., initial=...)`` does the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A block is skipped only when its lower bound exceeds its largest current distance by this
# relative margin, so rounding in the bound can never skip a block the plain algorithm updates.
_MARGIN = 1e-4
# After _PROBE picks, blocks give way to the plain loop when more than _DENSE of them were
# touched per pick: updating most blocks costs more than one pass over every point.
_PROBE, _DENSE = 64, 0.25


def random_projection(features: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """Gaussian random projection to ``dim`` dimensions (Johnson-Lindenstrauss), as PatchCore
    computes coreset distances; ``None`` or a ``dim`` >= the feature size keeps the features."""
    if dim is None or dim >= features.shape[1]:
        return features.float()
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=gen) / math.sqrt(dim)
    return features.float() @ matrix.to(features.device)


def coreset_projection(features: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """PatchCore's coreset projection to ``dim`` dimensions: a bias-free linear map with
    ``torch.nn.Linear``'s default initialisation, U(-1/sqrt(D), 1/sqrt(D)) (the same numbers as
    ``nn.Linear(D, dim, bias=False)`` built right after ``torch.manual_seed(seed)``). As the
    official sampler, only ``dim`` equal to the feature size (or None) keeps the features."""
    d = features.shape[1]
    if dim is None or dim == d:
        return features.float()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(dim, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=gen)
    return F.linear(features.float(), weight.to(features.device))


def start_distances(points: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Each point's mean Euclidean distance to the ``starts`` points: PatchCore's initial
    coreset distances (the start points are virtual centres, not picks)."""
    return torch.cat([torch.cdist(part, points[starts]).mean(1) for part in points.split(65536)])


def _first(n: int, start: int, initial: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """(first pick, initial distances [n]): ``start`` and +inf, or ``initial``'s farthest point."""
    if initial is None:
        return start, torch.full((n,), math.inf)
    if initial.shape != (n,):
        raise ValueError(f"initial distances must have shape ({n},), got {tuple(initial.shape)}")
    return int(initial.argmax()), initial.float()


def greedy_coreset_plain(
    points: torch.Tensor, n: int, start: int = 0, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """The textbook greedy k-center: ``n`` indices, the first being ``start``, or with
    ``initial`` distances the point where they are largest (reference)."""
    idx, min_dist = _first(points.shape[0], start, initial)
    return _plain_picks(points, n, idx, min_dist.to(points.device).clone())


def _plain_picks(points: torch.Tensor, n: int, idx: int, min_dist: torch.Tensor) -> torch.Tensor:
    """``n`` greedy picks from ``idx`` on, every point's distance so far in ``min_dist``."""
    picks = torch.empty(n, dtype=torch.long)
    for i in range(n):
        picks[i] = idx
        dist = (points - points[idx]).pow_(2).sum(1).sqrt_()
        torch.minimum(min_dist, dist, out=min_dist)
        idx = int(min_dist.argmax())
    return picks


def _kmeans(points: torch.Tensor, k: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster index of each point after a few Lloyd iterations (any partition stays exact)."""
    centres = points[torch.randperm(points.shape[0], generator=gen)[:k].to(points.device)]
    sq = (points * points).sum(1, keepdim=True)
    for _ in range(iterations):
        assign = torch.cat(
            [
                (sq[s : s + 65536] - 2 * part @ centres.T + (centres * centres).sum(1)).argmin(1)
                for s, part in zip(range(0, len(points), 65536), points.split(65536))
            ]
        )
        counts = torch.bincount(assign, minlength=k).clamp_min(1).to(points.dtype)
        centres = torch.zeros_like(centres).index_add_(0, assign, points) / counts[:, None]
    return assign


class _Blocks:
    """Points regrouped as [blocks, block, dim] with padding; padded slots have distance -inf."""

    def __init__(self, points: torch.Tensor, block: int, seed: int) -> None:
        n, dim = points.shape
        gen = torch.Generator().manual_seed(seed)
        k = max(1, n // (4 * block))
        assign = _kmeans(points, k, iterations=4, gen=gen)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=k)
        per_cluster = (counts + block - 1) // block
        cluster_start = torch.cumsum(counts, 0) - counts
        sorted_assign = assign[order]
        rank = torch.arange(n, device=points.device) - cluster_start[sorted_assign]
        block_id = (torch.cumsum(per_cluster, 0) - per_cluster)[sorted_assign] + rank // block
        n_blocks = int(per_cluster.sum())
        self.index = torch.full((n_blocks, block), -1, dtype=torch.long, device=points.device)
        self.index[block_id, rank % block] = order
        valid = self.index >= 0
        self.points = torch.zeros(n_blocks, block, dim, dtype=points.dtype, device=points.device)
        self.points[valid] = points[self.index[valid]]
        self.centres = self.points.sum(1) / valid.sum(1, keepdim=True)
        spread = (self.points - self.centres[:, None]).pow(2).sum(-1).sqrt()
        self.radius = torch.where(valid, spread, 0).amax(1)
        self.dist = torch.where(valid, math.inf, -math.inf)
        self.block_max = torch.full((n_blocks,), math.inf, device=points.device)


def greedy_coreset(
    points: torch.Tensor,
    n: int,
    start: int = 0,
    block: int = 128,
    seed: int = 0,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of ``n`` points chosen by greedy k-center, the first being ``start``, or, given
    ``initial`` distances [N] (e.g. :func:`start_distances`), the point where they are largest,
    every point's distance starting there; the same choices as :func:`greedy_coreset_plain`
    with far fewer distance evaluations."""
    total = points.shape[0]
    if not 0 < n <= total:
        raise ValueError(f"coreset size must be in 1..{total}, got {n}")
    if total <= 8 * block or points.device.type != "cpu":
        return greedy_coreset_plain(points, n, start, initial)  # on a GPU, the plain loop is fast
    idx, first_dist = _first(total, start, initial)
    b = _Blocks(points.float(), block, seed)
    if initial is not None:
        valid = b.index >= 0
        b.dist = torch.where(valid, first_dist[b.index.clamp_min(0)], -math.inf)
        b.block_max = b.dist.amax(1)
    picks = torch.empty(n, dtype=torch.long)
    touched_blocks = 0
    for i in range(n):
        if i == _PROBE and touched_blocks > _DENSE * _PROBE * len(b.centres):
            # the bound skips too little (features without cluster structure): the plain loop
            # is faster from here on, with the same distances and hence the same picks
            min_dist = torch.empty(total, dtype=b.dist.dtype)
            valid = b.index >= 0
            min_dist[b.index[valid]] = b.dist[valid]
            picks[i:] = _plain_picks(points.float(), n - i, idx, min_dist)
            return picks
        picks[i] = idx
        centre = points[idx].float()
        gap = (b.centres - centre).pow(2).sum(1).sqrt() - b.radius
        touched = torch.nonzero(gap * (1 - _MARGIN) <= b.block_max).reshape(-1)
        touched_blocks += len(touched)
        dist = (b.points.index_select(0, touched) - centre).pow_(2).sum(-1).sqrt_()
        dist = torch.minimum(b.dist.index_select(0, touched), dist)
        b.dist.index_copy_(0, touched, dist)
        b.block_max.index_copy_(0, touched, dist.amax(1))
        far = int(b.block_max.argmax())
        idx = int(b.index[far, int(b.dist[far].argmax())])
    return picks
