"""One training epoch and one validation pass of a VAE experiment (plain PyTorch)."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Collection, Iterable

import torch

from vae.config import ExperimentConfig
from vae.diagnostics import ValidationAccumulator
from vae.loss import compute_loss
from vae.models import VAE


def unwrap(model: torch.nn.Module) -> VAE:
    """The VAE inside a DDP (or other) wrapper."""
    return getattr(model, "module", model)


def train_epoch(
    model: torch.nn.Module,
    batches: Collection[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    epoch: int,
    dataset_size: int,
) -> dict[str, float]:
    """Train for one pass over ``batches``; returns the batch-mean of every loss term.

    Schedules see the fractional epoch ``epoch + i / steps``, so a resumed run follows
    exactly the same schedule as an uninterrupted one.
    """
    model.train()
    steps = max(len(batches), 1)
    sums: dict[str, float] = defaultdict(float)
    clip = cfg.optim.grad_clip_norm or math.inf
    for i, x in enumerate(batches):
        out = model(x)
        terms = compute_loss(
            x, out.x_hat, out.mu, out.logvar, out.z, cfg.objective,
            epoch=epoch + i / steps, total_epochs=cfg.train.epochs, dataset_size=dataset_size,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        for key, value in terms.scalars().items():
            sums[key] += value
        sums["grad_norm"] += float(grad_norm)
    return {key: value / steps for key, value in sums.items()}


@torch.no_grad()
def validate(model: torch.nn.Module, batches: Iterable[torch.Tensor], cfg: ExperimentConfig) -> dict:
    """One pass over ``batches`` filling the diagnostics, reduced across ranks."""
    vae = unwrap(model)
    vae.eval()
    fb = cfg.objective.free_bits
    acc = ValidationAccumulator(cfg.model.z_dim, free_bits_floor=fb.floor, free_bits_mode=fb.mode, seed=cfg.train.seed)
    for x in batches:
        mu, logvar = vae.encode(x)
        z = vae.reparameterize(mu, logvar)
        acc.update(x, vae.decode(mu), vae.decode(z), vae.decode(torch.zeros_like(mu)), mu, logvar, z)
    acc.reduce()
    return acc.result()
