"""Spatial Broadcast Decoder (Watters et al. 2019, arXiv:1901.07017) for volumes."""
from __future__ import annotations

import torch
from torch import nn

from vae.models.blocks import (
    BlockSequence,
    ConvBlock3d,
    NormKind,
    UpBlock3d,
    UpsampleMode,
    ZInjection,
    film_dim,
    level_channels,
)


def broadcast_upsampling_stages(size: int, grid: int | None) -> int:
    """Number of 2x upsamplings from a ``grid`` edge to a ``size`` edge (0 for None)."""
    if grid is None:
        return 0
    ratio = size // grid
    if grid > size or size % grid or ratio & (ratio - 1):
        raise ValueError(
            f"broadcast grid {grid} must divide the volume size {size} by a power of 2 "
            f"(size / grid in 1, 2, 4, ...); change model.broadcast_grid or set it to None for full resolution"
        )
    return ratio.bit_length() - 1


def coordinate_grid(grid: int) -> torch.Tensor:
    """``[3, G, G, G]``: channel a holds linspace(-1, 1, G) along spatial axis a."""
    axis = torch.linspace(-1.0, 1.0, grid)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))


class BroadcastDecoder3d(nn.Module):
    """``z: [B, z_dim]`` -> ``x_hat: [B, out_channels, S, S, S]``.

    z is tiled over a ``G^3`` grid and concatenated with 3 fixed coordinate channels,
    then ``layers`` stride-1 3x3x3 conv blocks run at the grid resolution, then a 1x1x1
    conv gives the (linear) output.

    ``grid=None`` is the form of Watters et al.: G = S, base_filters wide, no
    upsampling. An integer ``grid`` runs the broadcast stack at ``G^3`` with widths
    ``base_filters * 2**k`` (capped at ``max_filters``) and follows it with
    ``k = log2(S / G)`` resize-conv stages that halve the width down to base_filters;
    far cheaper at 128^3. With ``z_injection="film"`` every block is modulated by z.
    """

    coords: torch.Tensor

    def __init__(
        self,
        out_channels: int,
        size: int,
        z_dim: int,
        base_filters: int = 32,
        max_filters: int = 256,
        grid: int | None = 8,
        layers: int = 2,
        norm: NormKind = "group",
        norm_groups: int = 8,
        z_injection: ZInjection = "input",
        upsample_mode: UpsampleMode = "nearest",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"broadcast decoder needs at least 1 conv layer, got layers={layers}")
        stages = broadcast_upsampling_stages(size, grid)
        self.grid = size if grid is None else grid
        film = film_dim(z_injection, z_dim)

        def width(level: int) -> int:
            return level_channels(level, base_filters, max_filters)

        # Fixed inputs, rebuilt with the module: kept out of checkpoints.
        self.register_buffer("coords", coordinate_grid(self.grid)[None], persistent=False)  # [1, 3, G, G, G]
        in_widths = [z_dim + 3] + [width(stages)] * (layers - 1)
        blocks: list[nn.Module] = [
            ConvBlock3d(in_width, width(stages), norm, norm_groups, z_dim=film) for in_width in in_widths
        ]
        for level in reversed(range(stages)):
            blocks.append(UpBlock3d(width(level + 1), width(level), norm, norm_groups, film, upsample_mode))
        self.blocks = BlockSequence(blocks, gradient_checkpointing)
        self.out = nn.Conv3d(width(0), out_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.grid
        tiled = z[:, :, None, None, None].expand(-1, -1, g, g, g)  # [B, Z, G, G, G]
        coords = self.coords.to(z.dtype).expand(z.shape[0], -1, -1, -1, -1)  # [B, 3, G, G, G]
        h = torch.cat([tiled, coords], dim=1)
        return self.out(self.blocks(h, z))
