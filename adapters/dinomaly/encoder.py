"""Dinomaly's frozen encoders: a timm ViT (the paper's DINOv2) and the offline substitute.

Both return, for images [B, 3, H, W] normalised with the ImageNet statistics, the tokens of
each requested layer [B, prefix + h*w, width] and the token grid (h, w).
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.backbones import WeightsNotFoundError, load_weights, packaged_efficientnet_lite0

#: the offline substitute: ImageNet EfficientNet-Lite0, blocks of stages 2-4 (strides 8-16)
SUBSTITUTE = "efficientnet_lite0"


def default_layers(depth: int) -> tuple[int, ...]:
    """The official lists: blocks 2..9 of a 12-block ViT (S, B), 4, 6, ..., 18 of a 24-block one."""
    if depth == 12:
        return tuple(range(2, 10))
    if depth == 24:
        return tuple(range(4, 19, 2))
    raise ValueError(
        f"no default Dinomaly layers for a {depth}-block encoder: pass layers=(...) explicitly"
    )


def create_encoder(
    name: str, weights: str, layers: tuple[int, ...] | None, depth: int | None = None
) -> nn.Module:
    # random weights (tests, timing) are the same on every call: seed 0, whatever the global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = (
            EfficientNetEncoder(weights, layers)
            if name == SUBSTITUTE
            else ViTEncoder(name, weights, layers, depth)
        )
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


class ViTEncoder(nn.Module):
    """A timm ViT at its pretrained resolution, with DINOv2's own position-embedding
    interpolation at run time (bicubic, ``scale_factor`` = (grid + 0.1) / native grid, no
    antialias), which is what the official Dinomaly encoder does; timm's own resampling
    (``dynamic_img_size``) antialiases by default and, without it too, interpolates to a target
    size, which places the samples elsewhere: other embeddings."""

    substitute = False
    interpolate_offset = 0.1

    def __init__(
        self, name: str, weights: str, layers: tuple[int, ...] | None, depth: int | None
    ) -> None:
        super().__init__()
        vit = _create_vit(name, weights, depth)
        self.layers = tuple(layers) if layers is not None else default_layers(len(vit.blocks))
        if not self.layers or max(self.layers) >= len(vit.blocks) or min(self.layers) < 0:
            raise ValueError(
                f"layers {self.layers} are not blocks of {name} (0..{len(vit.blocks) - 1})"
            )
        self.vit = vit
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads
        self.prefix = vit.num_prefix_tokens
        self.patch = vit.patch_embed.patch_size
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The patch position embeddings of an h x w token grid [1, h*w, width] (cached)."""
        key = (h, w)
        if key not in self._positions:
            vit = self.vit
            patch = vit.pos_embed[:, 0 if vit.no_embed_class else self.prefix :]
            side = math.isqrt(patch.shape[1])
            if (h, w) == (side, side):
                out = patch
            else:
                grid = patch.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
                scale = ((h + self.interpolate_offset) / side, (w + self.interpolate_offset) / side)
                grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
                if grid.shape[-2:] != (h, w):
                    raise RuntimeError(f"position grid {tuple(grid.shape[-2:])} is not {(h, w)}")
                out = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(patch.dtype)
            self._positions[key] = out
        return self._positions[key]

    def _apply(self, fn, recurse=True):  # .to() / .half(): the cached embeddings follow
        self._positions = {}
        return super()._apply(fn, recurse)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        vit = self.vit
        x = vit.patch_embed.proj(image)  # a remainder smaller than a patch is dropped, as in DINOv2
        h, w = x.shape[-2:]
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(len(x), -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + self.positions(h, w)], 1)
        else:
            x = torch.cat(prefix + [x], 1)
            x = x + torch.cat([vit.pos_embed[:, : self.prefix], self.positions(h, w)], 1)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        out = []
        for i, block in enumerate(vit.blocks[: max(self.layers) + 1]):
            x = block(x)
            if i in self.layers:
                out.append(x)
        return out, (h, w)


def _create_vit(name: str, weights: str, depth: int | None) -> nn.Module:
    kwargs = {} if depth is None else {"depth": depth}
    try:
        if weights == "pretrained":
            if depth is not None:
                raise ValueError("encoder_depth only applies to random or local weights")
            try:
                return timm.create_model(name, pretrained=True)
            except RuntimeError as err:
                if "Unknown model" in str(err):
                    raise
                raise _missing(name, err) from err
            except Exception as err:  # hub unreachable and nothing in the local cache
                raise _missing(name, err) from err
        vit = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: unknown model name
        raise ValueError(f"unknown timm encoder {name!r}: {err}") from err
    if not hasattr(vit, "blocks") or not hasattr(vit, "pos_embed"):
        raise ValueError(f"encoder {name!r} is not a timm VisionTransformer")
    if weights != "random":
        from timm.models.vision_transformer import checkpoint_filter_fn

        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"encoder checkpoint file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # timm's converter also reads Meta's DINOv2 files (register_tokens, mask_token, ...)
        vit.load_state_dict(checkpoint_filter_fn(state, vit))
    return vit


def _missing(name: str, err: Exception) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"no pretrained weights for {name!r}: the hub is unreachable and the HuggingFace cache "
        f"has none ({type(err).__name__}: {err}). Pass weights=<path to a checkpoint> (timm's or "
        f"Meta's DINOv2 .pth), or encoder='{SUBSTITUTE}' for the offline substitute."
    )


class EfficientNetEncoder(nn.Module):
    """The offline substitute (not the paper's encoder): ImageNet EfficientNet-Lite0, the
    outputs of its 8 blocks in stages 2-4 (40 channels at stride 8, 80 and 112 at stride 16),
    average-pooled to the stride-16 grid and embedded into ``width`` channels by fixed random
    semi-orthogonal maps (inner products, hence cosines, within a layer are unchanged)."""

    substitute = True
    width, heads = 128, 8
    stages = (2, 3, 4)
    depth = 8  # the blocks of stages 2-4 (2 + 3 + 3)

    def __init__(self, weights: str, layers: tuple[int, ...] | None) -> None:
        super().__init__()
        net = timm.create_model(SUBSTITUTE, pretrained=False)
        if weights == "pretrained":
            weights = str(packaged_efficientnet_lite0())
        if weights != "random":
            from bench.backbones import _state_dict_from_file

            load_weights(net, _state_dict_from_file(Path(weights)), weights)
        self.stem = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[: self.stages[0]])
        self.blocks = nn.ModuleList(b for s in self.stages for b in net.blocks[s])
        self.layers = tuple(layers) if layers is not None else tuple(range(len(self.blocks)))
        if not self.layers or max(self.layers) >= len(self.blocks) or min(self.layers) < 0:
            raise ValueError(
                f"substitute layers {self.layers} are not in 0..{len(self.blocks) - 1}"
            )
        self.embed_dim, self.num_heads, self.prefix = self.width, self.heads, 0
        generator = torch.Generator().manual_seed(0)
        for i, block in enumerate(self.blocks):
            channels = block.conv_pwl.out_channels
            q, _ = torch.linalg.qr(torch.randn(self.width, channels, generator=generator))
            self.register_buffer(f"embed{i}", q.T.contiguous())  # [channels, width], Q^T Q = I

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        x = self.stem(image)
        maps = []
        for i, block in enumerate(self.blocks[: max(self.layers) + 1]):
            x = block(x)
            if i in self.layers:
                maps.append((i, x))
        grid = min((m.shape[-2:] for _, m in maps), key=lambda s: s[0] * s[1])
        out = []
        for i, m in maps:
            m = F.adaptive_avg_pool2d(m, grid) if m.shape[-2:] != grid else m
            out.append(m.flatten(2).transpose(1, 2) @ getattr(self, f"embed{i}"))
        return out, (int(grid[0]), int(grid[1]))
