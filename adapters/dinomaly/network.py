"""Dinomaly's trainable part: the noisy bottleneck and the linear-attention decoder."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class NoisyBottleneck(nn.Module):
    """Dinomaly: dropout, Linear(d, 4d), GELU, dropout, Linear(4d, d), dropout. Dinomaly2
    (``narrow`` set): Linear(d, narrow), dropout, Linear(narrow, 4d), GELU, dropout,
    Linear(4d, d), dropout."""

    def __init__(self, dim: int, dropout: float, narrow: int | None = None) -> None:
        super().__init__()
        self.narrow = narrow
        if narrow is None:
            self.fc1 = nn.Linear(dim, 4 * dim)
        else:
            self.reduce = nn.Linear(dim, narrow)
            self.fc1 = nn.Linear(narrow, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x) if self.narrow is None else self.drop(self.reduce(x))
        x = self.drop(F.gelu(self.fc1(x)))
        return self.drop(self.fc2(x))


class LinearAttention(nn.Module):
    """Per-head linear attention: phi(x) = elu(x) + 1 on queries and keys, no 1/sqrt(d) scale;
    out_s = phi(q_s) (sum_t phi(k_t) v_t^T) / (phi(q_s) . sum_t phi(k_t) + eps)."""

    def __init__(self, dim: int, heads: int, eps: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k.transpose(-2, -1) @ v  # [b, h, d, d]
        norm = q @ k.sum(-2, keepdim=True).transpose(-2, -1)  # [b, h, n, 1]
        out = (q @ kv) / (norm + self.eps)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-8) with linear attention and a 4x MLP."""

    def __init__(self, dim: int, heads: int, eps: float = 0.0) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-8)
        self.norm1, self.attn = norm(dim), LinearAttention(dim, heads, eps)
        self.norm2 = norm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Reconstructor(nn.Module):
    """Bottleneck over the mean of the encoder layers, then ``depth`` decoder blocks; returns
    every block's output, last first (the order the loss pairs with the encoder layers)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        depth: int = 8,
        dropout: float = 0.2,
        narrow: int | None = None,
        eps: float = 0.0,
    ) -> None:
        super().__init__()
        self.bottleneck = NoisyBottleneck(dim, dropout, narrow)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, eps) for _ in range(depth))
        self.apply(_init)

    def forward(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.bottleneck(torch.stack(layers, 1).mean(1))
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out[::-1]


def _init(module: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.01 in [-0.03, 0.03]) weights and
    zero biases for linear layers, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
