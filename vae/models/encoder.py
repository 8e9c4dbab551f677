"""Convolutional encoder of a cubic multi-channel volume into a diagonal Gaussian posterior."""
from __future__ import annotations

import torch
from torch import nn

from vae.models.blocks import BlockSequence, ConvBlock3d, NormKind, ResBlock3d, bottleneck_size, level_channels


class Encoder3d(nn.Module):
    """``x: [B, C, S, S, S]`` -> ``(mu, logvar)``, each ``[B, z_dim]``.

    A stem conv, then ``depth`` stages of (residual block, stride-2 conv) with widths
    ``base_filters * 2**level`` capped at ``max_filters``, then a 1x1x1 conv down to
    ``head_channels`` and linear heads for mu and logvar.

    ``logvar`` is clamped below at ``posterior_logvar_min`` and, for a delta-VAE
    (Razavi et al. 2019), above at ``posterior_logvar_max``. With ``mu_batchnorm_gamma``
    mu passes through a batch norm whose scale is fixed at gamma and whose shift is
    learnt (BN-VAE, Zhu et al. 2020), which bounds the expected KL below by
    ``z_dim * gamma**2 / 2``.
    """

    def __init__(
        self,
        in_channels: int,
        size: int,
        z_dim: int,
        base_filters: int = 32,
        max_filters: int = 256,
        depth: int = 4,
        norm: NormKind = "group",
        norm_groups: int = 8,
        head_channels: int = 16,
        posterior_logvar_min: float = -6.0,
        posterior_logvar_max: float | None = None,
        mu_batchnorm_gamma: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        grid = bottleneck_size(size, depth)
        self.input_shape = (in_channels, size, size, size)
        self.posterior_logvar_min = posterior_logvar_min
        self.posterior_logvar_max = posterior_logvar_max

        def width(level: int) -> int:
            return level_channels(level, base_filters, max_filters)

        blocks: list[nn.Module] = [ConvBlock3d(in_channels, width(0), norm, norm_groups)]
        for level in range(depth):
            blocks.append(ResBlock3d(width(level), width(level), norm, norm_groups))
            blocks.append(ConvBlock3d(width(level), width(level + 1), norm, norm_groups, stride=2))
        self.features = BlockSequence(blocks, gradient_checkpointing)
        # A narrow 1x1x1 conv before flattening keeps the linear heads small at 128^3.
        self.reduce = nn.Conv3d(width(depth), head_channels, 1)
        flat = head_channels * grid**3
        self.mu_head = nn.Linear(flat, z_dim)
        self.logvar_head = nn.Linear(flat, z_dim)
        self.mu_norm: nn.BatchNorm1d | None = None
        if mu_batchnorm_gamma is not None:
            self.mu_norm = nn.BatchNorm1d(z_dim)
            nn.init.constant_(self.mu_norm.weight, mu_batchnorm_gamma)
            self.mu_norm.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"encoder expects input [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}; "
                "check data.size and data.modalities against the model"
            )
        h = self.reduce(self.features(x)).flatten(1)  # [B, head_channels * g^3]
        # The posterior parameters are computed in the parameters' precision even under
        # autocast: the KL and the batch statistics built on them need it, and it is cheap.
        with torch.autocast(x.device.type, enabled=False):
            h = h.to(self.mu_head.weight.dtype)
            mu = self.mu_head(h)
            logvar = self.logvar_head(h)
            if self.mu_norm is not None:
                mu = self.mu_norm(mu)
        return mu, logvar.clamp(min=self.posterior_logvar_min, max=self.posterior_logvar_max)
