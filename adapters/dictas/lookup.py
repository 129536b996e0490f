"""DictAS's learned dictionary: query, key and value generators, the sparse lookup, and the
neighbourhood pooling of the features (scales)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: query rows of one sparsemax chunk: bounds the [rows, M] logits in memory for any M
LOOKUP_CHUNK = 1024
#: sparsemax first looks for its threshold among each row's largest TOP_T logits
TOP_T = 128


def sparsemax(logits: torch.Tensor, top: int | None = TOP_T) -> torch.Tensor:
    """Sparsemax over the last dimension (Martins & Astudillo, 2016), in float32.

    The threshold tau of a row depends only on its largest logits: the support is the largest
    k with 1 + k z_(k) > sum_{j<=k} z_(j). It is found among the ``top`` largest (a partial
    sort); rows whose support could be larger than ``top`` are sorted in full, so the result is
    exact either way. Differentiable (tau through the selected values)."""
    z = logits.float()
    n = z.shape[-1]
    t = n if top is None else min(top, n)
    values = z.topk(t, dim=-1).values if t < n else z.sort(dim=-1, descending=True).values
    tau, full = _threshold(values)
    if t < n and bool(full.any()):  # support may extend past the top t: those rows in full
        rows = full.nonzero(as_tuple=True)
        tau_full, _ = _threshold(z[rows].sort(dim=-1, descending=True).values)
        tau = tau.index_put(rows, tau_full)
    return torch.clamp(z - tau.unsqueeze(-1), min=0)


def _threshold(desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tau of each row from its values sorted in descending order, and whether the support
    filled every given value (then values past them may belong to it too)."""
    ks = torch.arange(1, desc.shape[-1] + 1, device=desc.device, dtype=desc.dtype)
    cumulative = desc.cumsum(-1)
    inside = 1 + ks * desc > cumulative
    support = inside.sum(-1, keepdim=True).clamp(min=1)  # the condition holds for a prefix
    tau = (cumulative.gather(-1, support - 1) - 1) / support.to(desc.dtype)
    return tau.squeeze(-1), support.squeeze(-1) == desc.shape[-1]


class TwoLayerMLP(nn.Module):
    """The generators' MLP: linear, dropout, + the block's normed input, linear, LayerNorm,
    linear without bias."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.linear3 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.linear1(x)) + residual
        return self.linear3(self.norm(self.linear2(x)))


class Generator(nn.Module):
    """LayerNorm -> multi-head self-attention (no qkv bias, no output projection) -> MLP, over
    the tokens [B, N, C] of one sequence; ``residual`` (the value generator) adds its input."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1, residual: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"generator width {dim} is not divisible by its {heads} heads")
        self.heads, self.residual = heads, residual
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.mlp = TwoLayerMLP(dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        b, n, c = h.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        out = self.mlp(out.transpose(1, 2).reshape(b, n, c), h)
        return x + out if self.residual else out


class GlobalFeature(nn.Module):
    """Attention pooling of the concatenated layers' tokens into one CLIP-space embedding
    (the text-alignment loss's image side)."""

    def __init__(self, dim: int, layers: int, embed_dim: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(dim * layers, dim // 2)
        self.compress = nn.Linear(dim // 2, 1)
        self.post = nn.Linear(dim // 2, embed_dim)

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(torch.cat(layers, dim=-1))
        weights = self.compress(x).softmax(dim=1)
        return self.post((weights * x).sum(1))


class Dictionary(nn.Module):
    """Query, key and value generators shared by every layer and scale (+ the global feature
    fusion when a text encoder is there). Lookup: sparsemax(Q(query) . K(ref) / sqrt(C)) .
    V(ref), single head. ``identity``: no generators (the training-free ablation)."""

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        dropout: float = 0.1,
        fuse: tuple[int, int] | None = None,
        identity: bool = False,
    ) -> None:
        super().__init__()
        if identity:  # the training-free ablation: the raw features are queries, keys, values
            self.query, self.key, self.value = nn.Identity(), nn.Identity(), nn.Identity()
        else:
            self.query = Generator(dim, heads, dropout)
            self.key = Generator(dim, heads, dropout)
            self.value = Generator(dim, heads, dropout, residual=True)
        self.fuse = None if fuse is None or identity else GlobalFeature(dim, *fuse)
        self.scale = dim**-0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def entries(self, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of reference tokens [B, M, C] (one dictionary per row)."""
        return self.key(references), self.value(references)

    def lookup(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Retrieved features [B, N, C] for query tokens [B, N, C] from keys/values [B or 1,
        M, C]. The sparsemax runs on chunks of ``LOOKUP_CHUNK`` query rows (the rows of every
        image of the batch together when the dictionary is shared), so memory is bounded by
        ``LOOKUP_CHUNK`` x M logits whatever the batch and the number of references."""
        q = self.query(query)
        b, n, c = q.shape
        shared = keys.shape[0] == 1 and b > 1
        if shared:  # one dictionary for the whole batch: chunk over all its rows
            q = q.reshape(1, b * n, c)
        out = []
        for start in range(0, q.shape[1], LOOKUP_CHUNK):
            chunk = q[:, start : start + LOOKUP_CHUNK]
            weights = sparsemax(chunk @ keys.transpose(1, 2) * self.scale)
            out.append(weights @ values.float())
        retrieved = torch.cat(out, 1)
        return (retrieved.reshape(b, n, c) if shared else retrieved).to(query.dtype)


def pool(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Neighbourhood aggregation of [B, C, h, w] maps: ``size`` x ``size`` mean with zero
    padding ('same' output, the padding counted), as the official scales 1 and 3."""
    if size == 1:
        return maps
    left, right = (size - 1) // 2, size // 2
    return F.avg_pool2d(F.pad(maps, (left, right, left, right)), size, stride=1)


def token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, C] tokens as a [B, C, h, w] map."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *grid)


def map_tokens(maps: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] map as [B, h*w, C] tokens."""
    return maps.flatten(2).transpose(1, 2)
