"""Building blocks shared by the 3D encoder and decoders.

Every block maps ``h: [B, C_in, S, S, S]`` (and optionally ``z: [B, Z]``) to
``[B, C_out, S', S', S']``. Blocks built with ``z_dim`` carry a :class:`FiLM` layer that
lets z modulate their features; the others ignore ``z``.
"""
from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

NormKind = Literal["group", "batch", "instance", "none"]
ZInjection = Literal["input", "film"]
UpsampleMode = Literal["nearest", "trilinear"]


def group_count(channels: int, groups: int) -> int:
    """GroupNorm groups for ``channels``: gcd(channels, groups), so any width is accepted.

    For the usual power-of-two widths this is ``groups`` itself; narrow test models
    (4 channels with 8 groups) fall back to fewer groups instead of failing.
    """
    return math.gcd(channels, groups)


def make_norm(kind: NormKind, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer over ``[B, channels, S, S, S]``, with a learnable affine."""
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch', 'instance' or 'none', not {kind!r}")


def conv3x3(in_channels: int, out_channels: int, norm: NormKind, stride: int = 1) -> nn.Conv3d:
    # A bias before a norm with its own shift is redundant.
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none")


def level_channels(level: int, base_filters: int, max_filters: int) -> int:
    """Width ``level`` 2x-resamplings below full resolution: base * 2**level, capped."""
    return min(base_filters * 2**level, max_filters)


def bottleneck_size(size: int, depth: int) -> int:
    """Edge of the volume after ``depth`` 2x downsamplings of a ``size`` edge."""
    stride = 2**depth
    if size < stride or size % stride:
        raise ValueError(
            f"volume size {size} must be a multiple of 2**depth = {stride}; change data.size or model.depth"
        )
    return size // stride


def film_dim(z_injection: ZInjection, z_dim: int) -> int | None:
    """The z width a FiLM layer needs, or None when z enters the decoder only at its input."""
    if z_injection == "input":
        return None
    if z_injection == "film":
        return z_dim
    raise ValueError(f"z_injection must be 'input' or 'film', not {z_injection!r}")


class FiLM(nn.Module):
    """Per-channel modulation by z (Perez et al. 2018): ``h * (1 + dgamma(z)) + dbeta(z)``.

    The linear map starts at zero, so a fresh FiLM layer is the identity and the
    decoder starts as its input-only counterpart.
    """

    def __init__(self, z_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(z_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``h: [B, C, S, S, S]``, ``z: [B, Z]`` -> ``[B, C, S, S, S]``."""
        dgamma, dbeta = self.linear(z)[:, :, None, None, None].chunk(2, dim=1)
        return h * (1 + dgamma) + dbeta


class ConvBlock3d(nn.Module):
    """conv3x3x3 (stride 1 or 2) -> norm -> [FiLM] -> SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: NormKind = "group",
        norm_groups: int = 8,
        stride: int = 1,
        z_dim: int | None = None,
    ):
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, norm, stride)
        self.norm = make_norm(norm, out_channels, norm_groups)
        self.film = FiLM(z_dim, out_channels) if z_dim else None
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.conv(h))
        if self.film is not None:
            h = self.film(h, z)
        return self.act(h)


class ResBlock3d(nn.Module):
    """Residual block: SiLU(skip(h) + [FiLM](norm(conv(SiLU(norm(conv(h))))))).

    The skip is the identity, or a 1x1x1 conv when the width changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: NormKind = "group",
        norm_groups: int = 8,
        z_dim: int | None = None,
    ):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, norm)
        self.norm1 = make_norm(norm, out_channels, norm_groups)
        self.conv2 = conv3x3(out_channels, out_channels, norm)
        self.norm2 = make_norm(norm, out_channels, norm_groups)
        self.film = FiLM(z_dim, out_channels) if z_dim else None
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(h)))
        out = self.norm2(self.conv2(out))
        if self.film is not None:
            out = self.film(out, z)
        return self.act(out + self.skip(h))


class UpBlock3d(nn.Module):
    """2x resize-conv: upsample, then a :class:`ConvBlock3d`.

    Resizing before a stride-1 conv avoids the checkerboard artefacts of transposed
    convolutions (Odena et al. 2016).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: NormKind = "group",
        norm_groups: int = 8,
        z_dim: int | None = None,
        mode: UpsampleMode = "nearest",
    ):
        super().__init__()
        if mode not in ("nearest", "trilinear"):
            raise ValueError(f"upsample mode must be 'nearest' or 'trilinear', not {mode!r}")
        self.upsample = nn.Upsample(scale_factor=2, mode=mode)
        self.conv = ConvBlock3d(in_channels, out_channels, norm, norm_groups, z_dim=z_dim)

    def forward(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(self.upsample(h), z)


class BlockSequence(nn.ModuleList):
    """Blocks applied in order to ``(h, z)``, optionally with gradient checkpointing.

    Checkpointing keeps only each block's input and recomputes its activations in the
    backward pass: the same gradients for about one extra forward, and far less memory
    at 128^3. Batch-norm running statistics are updated again by the recomputation.
    """

    def __init__(self, blocks: Iterable[nn.Module], gradient_checkpointing: bool = False):
        super().__init__(blocks)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self:
            h = checkpoint(block, h, z, use_reentrant=False) if recompute else block(h, z)
        return h
