"""3D VAE networks, and :func:`build_model` to assemble one from a :class:`ModelConfig`."""
from __future__ import annotations

from vae.config import ModelConfig
from vae.models.broadcast_decoder import BroadcastDecoder3d
from vae.models.conv_decoder import ConvDecoder3d
from vae.models.encoder import Encoder3d
from vae.models.autoencoder import VAE, VAEOutput

__all__ = ["VAE", "VAEOutput", "build_model", "Encoder3d", "ConvDecoder3d", "BroadcastDecoder3d"]


def build_model(model: ModelConfig, in_channels: int, size: int) -> VAE:
    """The VAE described by ``model`` for volumes ``[B, in_channels, size, size, size]``.

    Raises ValueError when ``size`` is not a multiple of ``2**model.depth`` or the
    broadcast grid does not divide ``size`` by a power of 2.
    """
    shared = dict(
        size=size,
        z_dim=model.z_dim,
        base_filters=model.base_filters,
        max_filters=model.max_filters,
        norm=model.norm,
        norm_groups=model.norm_groups,
        gradient_checkpointing=model.gradient_checkpointing,
    )
    encoder = Encoder3d(
        in_channels,
        depth=model.depth,
        posterior_logvar_min=model.posterior_logvar_min,
        posterior_logvar_max=model.posterior_logvar_max,
        mu_batchnorm_gamma=model.mu_batchnorm_gamma,
        **shared,
    )
    if model.decoder == "conv":
        decoder = ConvDecoder3d(in_channels, depth=model.depth, z_injection=model.z_injection, **shared)
    else:
        decoder = BroadcastDecoder3d(
            in_channels,
            grid=model.broadcast_grid,
            layers=model.broadcast_layers,
            z_injection=model.z_injection,
            **shared,
        )
    return VAE(encoder, decoder)
