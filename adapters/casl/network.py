"""CASL's network: a MinkUNet34C-shaped sparse U-Net whose skips are curvature prompts.

- Curvature-prompt encoder: an MLP embeds each point's multi-scale curvature, the embeddings are
  averaged per voxel (the stride-1 prompt) and encoded by 3 stride-2 stages (prompts at strides
  2, 4, 8).
- Coordinate encoder: every voxel's input is one learned 3-vector (the coordinates masked out),
  a ``stem_kernel``**3 stem and 4 stride-2 stages (strides 2..16).
- Decoder: 4 transposed stride-2 convolutions; at each resolution the curvature prompt of that
  stride is concatenated where MinkUNet concatenates its encoder skip, then residual blocks.
- Heads per point: the voxel's last features concatenated with the point's raw curvature,
  through PO3AD's point MLP (Linear, BN, PReLU, Linear to 16, BN, PReLU, Linear): xyz (3) and
  normal / anomalous logits (2).
"""

from __future__ import annotations

import torch
from torch import nn

from .sparse import DownConv, Norm, ReLU, SparseTensor, SubmanifoldConv, UpConv, VoxelGrid, blocks


def _stage(cin: int, cout: int, count: int) -> nn.Sequential:
    """Stride-2 kernel-2 convolution (width kept), BN, ReLU, then ``count`` residual blocks."""
    return nn.Sequential(DownConv(cin, cin), Norm(cin), ReLU(), blocks(cin, cout, count))


def _point_head(cin: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.PReLU(),
        nn.Linear(hidden, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.PReLU(),
        nn.Linear(16, out),
    )


class CASLNet(nn.Module):
    """Masked-coordinate reconstruction prompted by curvature (see the module docstring).

    ``encoder`` and ``decoder`` are MinkUNet's PLANES split in two; ``layers`` its 8 block counts
    (the curvature encoder uses the first three).
    """

    def __init__(
        self,
        curvature_channels: int,
        encoder: tuple[int, ...] = (32, 64, 128, 256),
        decoder: tuple[int, ...] = (256, 128, 96, 96),
        layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2),
        stem: int = 32,
        stem_kernel: int = 5,
    ) -> None:
        super().__init__()
        if len(encoder) != 4 or len(decoder) != 4 or len(layers) != 8:
            raise ValueError(
                "CASLNet needs 4 encoder widths, 4 decoder widths and 8 block counts, got "
                f"{len(encoder)}, {len(decoder)} and {len(layers)}"
            )
        s = curvature_channels
        self.embed = nn.Sequential(
            nn.Linear(s, stem), nn.BatchNorm1d(stem), nn.ReLU(),
            nn.Linear(stem, stem), nn.BatchNorm1d(stem), nn.ReLU(),
        )  # fmt: skip
        widths = (stem, *encoder)
        self.prompt_stages = nn.ModuleList(
            _stage(widths[i], widths[i + 1], layers[i]) for i in range(3)
        )
        self.mask_token = nn.Parameter(torch.randn(3))
        self.stem = nn.Sequential(SubmanifoldConv(3, stem, stem_kernel), Norm(stem), ReLU())
        self.coord_stages = nn.ModuleList(
            _stage(widths[i], widths[i + 1], layers[i]) for i in range(4)
        )
        prompts = (encoder[2], encoder[1], encoder[0], stem)  # at strides 8, 4, 2, 1
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        cin = encoder[3]
        for j, (width, prompt) in enumerate(zip(decoder, prompts)):
            self.up.append(nn.Sequential(UpConv(cin, width), Norm(width), ReLU()))
            self.decode.append(blocks(width + prompt, width, layers[4 + j]))
            cin = width
        self.xyz_head = _point_head(decoder[3] + s, decoder[3], 3)
        self.anomaly_head = _point_head(decoder[3] + s, decoder[3], 2)

    def forward(
        self, coords: torch.Tensor, point_voxel: torch.Tensor, curvature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``coords`` [V, 4] voxels (batch, x, y, z), ``point_voxel`` [P] each point's voxel row,
        ``curvature`` [P, S] per point; returns xyz [P, 3] and logits [P, 2]."""
        grid = VoxelGrid(coords)
        if self.training and grid.size(16) < 2:
            raise ValueError(
                f"the batch's {len(coords)} voxels make {grid.size(16)} voxel at the coarsest "
                "level (16 voxels wide), too few for batch normalisation in training: use a "
                "smaller voxel_size (the clouds are normalised to radius 1)"
            )
        embedded = self.embed(curvature).float()  # voxel means summed in float32 under autocast
        pooled = embedded.new_zeros(len(coords), embedded.shape[1])
        pooled = pooled.index_add(0, point_voxel, embedded)
        counts = torch.bincount(point_voxel, minlength=len(coords)).clamp_min(1)
        prompt = SparseTensor(pooled / counts[:, None].to(pooled.dtype), grid, 1)
        prompts = [prompt]
        for stage in self.prompt_stages:
            prompt = stage(prompt)
            prompts.append(prompt)
        token = self.mask_token.expand(len(coords), 3)
        x = self.stem(SparseTensor(token, grid, 1))
        for stage in self.coord_stages:
            x = stage(x)
        for up, decode, prompt in zip(self.up, self.decode, reversed(prompts)):
            x = up(x)
            x = decode(x.with_feats(torch.cat([x.feats, prompt.feats.to(x.feats.dtype)], 1)))
        point = torch.cat([x.feats[point_voxel], curvature.to(x.feats.dtype)], 1)
        return self.xyz_head(point), self.anomaly_head(point)
