"""The VAE: an encoder to a diagonal Gaussian posterior, a sample, a decoder. No loss here."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class VAEOutput(NamedTuple):
    x_hat: torch.Tensor  # [B, C, S, S, S] reconstruction of the sampled z
    mu: torch.Tensor  # [B, D] posterior mean
    logvar: torch.Tensor  # [B, D] posterior log-variance
    z: torch.Tensor  # [B, D] the sample decoded into x_hat


class VAE(nn.Module):
    """Pairs an encoder ``x -> (mu, logvar)`` with a decoder ``z -> x_hat``.

    ``forward`` always samples z, in training and evaluation alike; the mean
    reconstruction is ``decode(mu)``, asked for explicitly.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C, S, S, S]`` -> ``(mu, logvar)``, each ``[B, D]``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [B, D]`` -> ``x_hat: [B, C, S, S, S]``."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A sample ``z = mu + eps * exp(logvar / 2)``, ``eps ~ N(0, I)``, ``[B, D]``."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return VAEOutput(self.decode(z), mu, logvar, z)
