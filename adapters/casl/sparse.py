"""Sparse voxel convolutions in plain torch: the few Minkowski-Engine operations a MinkUNet needs.

Hand-written because no maintained sparse-convolution library installs from the package index
for our torch and trains on a CPU (spconv 2.3's CPU wheel runs forward only; its backward calls
``torch.cuda.current_stream()``), and MinkowskiEngine has no CUDA 12 build. Everything here is
torch indexing and matrix products, so it runs wherever torch runs (CPU, CUDA, autocast) and
autograd gives the backward pass.

A :class:`VoxelGrid` holds one batch's occupied voxels at every tensor stride and the neighbour
maps between them, computed once per forward pass and shared by every layer (and by both CASL
encoders). Coordinates are ``[N, 4]`` int64 rows (batch, x, y, z), multiples of the stride.
Lookups go through a sorted table of packed keys (``torch.searchsorted``), the "voxel hashing"
of the sparse-convolution libraries without a hash table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

_BITS = 16  # bits per spatial axis in a packed key; the batch index takes the rest
_LIMIT = 1 << _BITS


def pack(coords: torch.Tensor) -> torch.Tensor:
    """One int64 key per (batch, x, y, z) row; rows must lie in [0, 2**16) per axis."""
    b, x, y, z = coords.unbind(1)
    return ((b * _LIMIT + x) * _LIMIT + y) * _LIMIT + z


def voxelize(clouds: list[torch.Tensor], voxel_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantises each cloud [N_i, 3] to voxels of edge ``voxel_size``.

    Returns the occupied voxels' coordinates [V, 4] (batch, x, y, z; each cloud shifted to start
    at 0) and for every point of the concatenated clouds the row of its voxel [sum N_i].
    """
    rows = []
    for b, points in enumerate(clouds):
        q = torch.floor(points / voxel_size).long()
        q = q - q.min(0).values
        if int(q.max()) >= _LIMIT:
            raise ValueError(
                f"cloud {b} spans {int(q.max()) + 1} voxels of {voxel_size} on one axis; at most "
                f"{_LIMIT} fit (normalise the cloud or use a larger voxel_size)"
            )
        rows.append(torch.cat([torch.full_like(q[:, :1], b), q], 1))
    coords = torch.cat(rows)
    unique, inverse = torch.unique(coords, dim=0, return_inverse=True)
    return unique, inverse


def _lookup(table: torch.Tensor, order: torch.Tensor, keys: torch.Tensor):
    """Rows of the sorted ``table`` (positions mapped back through ``order``) holding ``keys``;
    returns (found mask over keys, rows of the found keys)."""
    pos = torch.searchsorted(table, keys).clamp_max(len(table) - 1)
    found = table[pos] == keys
    return found, order[pos[found]]


@dataclass(frozen=True)
class KernelMap:
    """Input-output row pairs of one convolution, grouped by kernel offset: the pairs of offset
    k are ``src[o_k:o_k+counts[k]]``, ``dst[...]`` with o_k the sum of the earlier counts."""

    src: torch.Tensor
    dst: torch.Tensor
    counts: tuple[int, ...]

    @classmethod
    def of(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> KernelMap:
        return cls(
            torch.cat([p[0] for p in pairs]),
            torch.cat([p[1] for p in pairs]),
            tuple(len(p[0]) for p in pairs),
        )


class VoxelGrid:
    """One batch's voxels at strides 1, 2, 4, ... and the maps between them (cached)."""

    def __init__(self, coords: torch.Tensor) -> None:
        self._coords = {1: coords}
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._maps: dict[tuple[str, int, int], KernelMap] = {}
        self._children: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self._coords[1].device

    def coords(self, stride: int) -> torch.Tensor:
        """Occupied voxels [N_s, 4] at ``stride`` (a power of two)."""
        if stride not in self._coords:
            finer = self.coords(stride // 2)
            coarse = finer.clone()
            coarse[:, 1:] = torch.div(finer[:, 1:], stride, rounding_mode="floor") * stride
            self._coords[stride] = torch.unique(coarse, dim=0)
        return self._coords[stride]

    def size(self, stride: int) -> int:
        return int(self.coords(stride).shape[0])

    def _table(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        if stride not in self._tables:
            keys = pack(self.coords(stride))
            table, order = torch.sort(keys)
            self._tables[stride] = (table, order)
        return self._tables[stride]

    def neighbours(self, stride: int, kernel: int) -> KernelMap:
        """For each of the kernel**3 offsets (x slowest, z fastest), the pairs (input rows,
        output rows) of voxels at ``stride`` whose neighbour at that offset is occupied."""
        key = ("neighbours", stride, kernel)
        if key not in self._maps:
            coords = self.coords(stride)
            table, order = self._table(stride)
            rows = torch.arange(len(coords), device=coords.device)
            half = kernel // 2
            span = range(-half, kernel - half)
            pairs = []
            for offset in itertools.product(span, span, span):
                if offset == (0, 0, 0):
                    pairs.append((rows, rows))
                    continue
                shift = torch.tensor((0, *offset), device=coords.device) * stride
                query = coords + shift
                inside = ((query[:, 1:] >= 0) & (query[:, 1:] < _LIMIT)).all(1)
                found, source = _lookup(table, order, pack(query[inside]))
                pairs.append((source, rows[inside][found]))
            self._maps[key] = KernelMap.of(pairs)
        return self._maps[key]

    def children(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each voxel at ``stride``: its parent's row at ``2 * stride`` and which of the 8
        children it is (0..7, x slowest)."""
        if stride not in self._children:
            fine = self.coords(stride)
            parent = fine.clone()
            parent[:, 1:] = torch.div(fine[:, 1:], 2 * stride, rounding_mode="floor") * 2 * stride
            table, order = self._table(2 * stride)
            found, rows = _lookup(table, order, pack(parent))
            assert bool(found.all()), "every voxel has a parent one stride up"
            bits = torch.div(fine[:, 1:], stride, rounding_mode="floor") % 2
            child = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
            self._children[stride] = (rows, child)
        return self._children[stride]

    def down(self, stride: int) -> KernelMap:
        """Kernel-2 stride-2 map from ``stride`` to ``2 * stride``: (child row, parent row) by
        child position."""
        key = ("down", stride, 2)
        if key not in self._maps:
            parent, child = self.children(stride)
            order = torch.argsort(child, stable=True)
            counts = torch.bincount(child, minlength=8).tolist()
            self._maps[key] = KernelMap(order, parent[order], tuple(counts))
        return self._maps[key]

    def up(self, stride: int) -> KernelMap:
        """Transposed map from ``2 * stride`` back to ``stride``: (parent row, child row)."""
        key = ("up", stride, 2)
        if key not in self._maps:
            down = self.down(stride)
            self._maps[key] = KernelMap(down.dst, down.src, down.counts)
        return self._maps[key]


@dataclass
class SparseTensor:
    """Features [N_s, C] of the voxels of ``grid`` at ``stride``."""

    feats: torch.Tensor
    grid: VoxelGrid
    stride: int = 1

    def with_feats(self, feats: torch.Tensor) -> SparseTensor:
        return SparseTensor(feats, self.grid, self.stride)


def _kernel(volume: int, cin: int, cout: int) -> nn.Parameter:
    # Minkowski Engine's initialisation: Kaiming normal, fan_out = kernel volume x out channels
    std = math.sqrt(2.0 / (volume * cout))
    return nn.Parameter(torch.randn(volume, cin, cout) * std)


def _accumulate(
    feats: torch.Tensor, weight: torch.Tensor, kernel_map: KernelMap, rows_out: int
) -> torch.Tensor:
    """out[dst] += feats[src] @ weight[k] over every pair: one gather, one matrix product per
    offset, one scatter (few large operations: many small ones stall CPU thread pools), summed
    in float32 also under autocast."""
    gathered = feats[kernel_map.src]
    parts = [
        chunk @ weight[k] for k, chunk in enumerate(gathered.split(kernel_map.counts)) if len(chunk)
    ]
    dtype = torch.promote_types(parts[0].dtype if parts else feats.dtype, torch.float32)
    out = torch.zeros(rows_out, weight.shape[2], device=feats.device, dtype=dtype)
    if parts:
        out.index_add_(0, kernel_map.dst, torch.cat(parts).to(dtype))
    return out


class SubmanifoldConv(nn.Module):
    """A kernel**3 convolution whose outputs are the input voxels (Minkowski stride-1 conv)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, bias: bool = False) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = _kernel(kernel**3, cin, cout)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        kernel_map = x.grid.neighbours(x.stride, self.kernel)
        out = _accumulate(x.feats, self.weight, kernel_map, len(x.feats))
        if self.bias is not None:
            out = out + self.bias
        return x.with_feats(out)


class DownConv(nn.Module):
    """Kernel 2, stride 2: each voxel's 8 children, one weight matrix per child position."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = _kernel(8, cin, cout)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = _accumulate(x.feats, self.weight, x.grid.down(x.stride), x.grid.size(2 * x.stride))
        return SparseTensor(out, x.grid, 2 * x.stride)


class UpConv(nn.Module):
    """Transposed kernel 2, stride 2 onto the voxels one stride down (Minkowski's transposed
    convolution onto the encoder's coordinates): each voxel gets its parent's features through
    the weight of its child position."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = _kernel(8, cin, cout)

    def forward(self, x: SparseTensor) -> SparseTensor:
        fine = x.stride // 2
        out = _accumulate(x.feats, self.weight, x.grid.up(fine), x.grid.size(fine))
        return SparseTensor(out, x.grid, fine)


class Norm(nn.Module):
    """Batch normalisation over the voxels' features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(self.bn(x.feats))


class ReLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(torch.relu(x.feats))


class BasicBlock(nn.Module):
    """Residual block of two 3x3x3 convolutions (Minkowski Engine's BasicBlock); a 1x1
    projection on the shortcut when the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = SubmanifoldConv(cin, cout), Norm(cout)
        self.conv2, self.norm2 = SubmanifoldConv(cout, cout), Norm(cout)
        self.project = (
            nn.Sequential(SubmanifoldConv(cin, cout, kernel=1), Norm(cout)) if cin != cout else None
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = torch.relu(self.norm1(self.conv1(x)).feats)
        out = self.norm2(self.conv2(x.with_feats(out))).feats
        shortcut = x.feats if self.project is None else self.project(x).feats
        return x.with_feats(torch.relu(out + shortcut))


def blocks(cin: int, cout: int, count: int) -> nn.Sequential:
    """``count`` residual blocks, the first changing the width from ``cin`` to ``cout``."""
    return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout) for i in range(count)])


def to_dense(x: SparseTensor, batch: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense [B, C, X, Y, Z] grid of voxel-index units (stride 1 spacing) holding ``x``; empty
    voxels are zero. For tests and debugging: the reference the sparse ops must match."""
    coords = x.grid.coords(x.stride)
    out = x.feats.new_zeros(batch, x.feats.shape[1], *shape)
    b, i, j, k = coords.unbind(1)
    out[b, :, i, j, k] = x.feats
    return out
