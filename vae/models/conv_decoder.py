"""Convolutional decoder, the mirror of :class:`vae.models.encoder.Encoder3d`."""
from __future__ import annotations

import torch
from torch import nn

from vae.models.blocks import (
    BlockSequence,
    NormKind,
    ResBlock3d,
    UpBlock3d,
    UpsampleMode,
    ZInjection,
    bottleneck_size,
    film_dim,
    level_channels,
)


class ConvDecoder3d(nn.Module):
    """``z: [B, z_dim]`` -> ``x_hat: [B, out_channels, S, S, S]``.

    A linear map of z to ``[C_top, g, g, g]`` with ``g = S / 2**depth``, then ``depth``
    stages of (residual block, 2x resize-conv) halving the width as the encoder doubled
    it, then a 3x3x3 conv to ``out_channels``. The output is linear: the data are
    z-scored. With ``z_injection="film"`` every block is also modulated by z.
    """

    def __init__(
        self,
        out_channels: int,
        size: int,
        z_dim: int,
        base_filters: int = 32,
        max_filters: int = 256,
        depth: int = 4,
        norm: NormKind = "group",
        norm_groups: int = 8,
        z_injection: ZInjection = "input",
        upsample_mode: UpsampleMode = "nearest",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.grid = bottleneck_size(size, depth)
        film = film_dim(z_injection, z_dim)

        def width(level: int) -> int:
            return level_channels(level, base_filters, max_filters)

        self.project = nn.Linear(z_dim, width(depth) * self.grid**3)
        blocks: list[nn.Module] = []
        for level in reversed(range(depth)):
            blocks.append(ResBlock3d(width(level + 1), width(level + 1), norm, norm_groups, film))
            blocks.append(UpBlock3d(width(level + 1), width(level), norm, norm_groups, film, upsample_mode))
        self.blocks = BlockSequence(blocks, gradient_checkpointing)
        self.out = nn.Conv3d(width(0), out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.grid
        h = self.project(z).view(z.shape[0], -1, g, g, g)  # [B, C_top, g, g, g]
        return self.out(self.blocks(h, z))
