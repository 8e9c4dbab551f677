"""The training objective of one experiment, assembled from the pure terms in ``objectives``.

    total = recon(x_hat, x) + KL term + s_dip(t) * DIP penalty + (beta_tc - 1) * TC

where the KL term is ``beta(t) * KL_constrained`` or, with capacity annealing,
``gamma * |KL_constrained - C(t)|``. Batch statistics (free bits in batch-mean mode, the
DIP covariance, TC, the sigma-VAE's sigma) are taken over the global batch: under DDP
``mu``, ``logvar`` and ``z`` are gathered from every rank with their gradients, and the
squared error that sets sigma is summed over ranks with its gradient. So each rank's
statistics and KL, DIP and TC terms match the single-process ones, its reconstruction
term is the mean over its own samples (their mean over ranks is the single-process
value), and DDP's gradient averaging gives the single-process gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vae import objectives as obj
from vae.config import ObjectiveConfig
from vae.dist import all_reduce_sum, all_reduce_sum_with_grad, gather_batch


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    recon: torch.Tensor
    kl_raw: torch.Tensor  # nats, summed over dims, global batch mean
    kl_constrained: torch.Tensor  # after free bits
    kl_weight: float
    capacity: float | None
    dip_penalty: torch.Tensor  # unweighted by the schedule
    dip_weight: float
    tc: torch.Tensor
    tc_weight: float

    def scalars(self) -> dict[str, float]:
        """Detached Python floats with stable names, for logging and reporting."""
        out = {
            "loss": self.total,
            "recon": self.recon,
            "kl_raw": self.kl_raw,
            "kl_constrained": self.kl_constrained,
            "kl_weight": self.kl_weight,
            "dip_penalty": self.dip_penalty,
            "dip_weight": self.dip_weight,
            "tc": self.tc,
            "tc_weight": self.tc_weight,
        }
        if self.capacity is not None:
            out["capacity"] = self.capacity
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}


def _grad_if(needed: bool) -> torch.autograd.grad_mode.set_grad_enabled:
    """Keep autograd on for a term only when it is weighted (a zero weight times an
    inf would otherwise poison the gradient, and the graph costs memory)."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and needed)


def _reconstruction(x_hat: torch.Tensor, x: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """The reconstruction term of the local batch, with the sigma-VAE's sigma from the global batch."""
    if cfg.likelihood != "sigma_vae":
        return obj.reconstruction(x_hat, x, cfg.likelihood, cfg.sigma2)
    sse = obj.sum_squared_error(x_hat, x)  # [B]
    # Sigma is a function of the data (Rybkin et al.'s optimal sigma), so its gradient reaches
    # every rank's reconstructions, as it reaches every sample's in one process.
    global_sse = all_reduce_sum_with_grad(sse.sum())
    global_count = all_reduce_sum(torch.tensor(x.numel(), device=x.device))
    return obj.shared_sigma_nll(sse, obj.optimal_log_sigma(global_sse, global_count), x[0].numel())


def compute_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    z: torch.Tensor,
    cfg: ObjectiveConfig,
    epoch: float,
    total_epochs: int,
    dataset_size: int,
) -> LossTerms:
    """The loss of one (local) batch at (fractional) ``epoch``; see the module docstring."""
    recon = _reconstruction(x_hat, x, cfg)

    mu, logvar, z = gather_batch(mu), gather_batch(logvar), gather_batch(z)
    kl_bd = obj.kl_per_dim(mu.float(), logvar.float())
    kl_raw = obj.kl_raw(kl_bd)
    kl_constrained = obj.free_bits(kl_bd, cfg.free_bits.floor, cfg.free_bits.mode)

    kl = cfg.kl
    kl_weight = obj.kl_weight(
        epoch, kl.beta, kl.schedule, total_epochs,
        warmup_start=kl.warmup_start, warmup_epochs=kl.warmup_epochs,
        cycles=kl.cycles, cycle_ratio=kl.cycle_ratio,
    )
    if kl.capacity_max is None:
        capacity = None
        kl_term = kl_weight * kl_constrained
    else:
        capacity = obj.capacity(epoch, kl.capacity_max, kl.capacity_ramp_epochs)
        kl_term = obj.capacity_penalty(kl_constrained, capacity, kl.capacity_gamma)

    dip = cfg.dip
    if dip.kind == "none":
        dip_weight, dip_penalty = 0.0, kl_raw.new_zeros(())
    else:
        dip_weight = obj.ramp(epoch, dip.start_epoch, dip.warmup_epochs)
        # Reported from the first epoch; differentiated only once its schedule has started.
        with _grad_if(dip_weight != 0.0):
            dip_penalty = obj.dip_penalty(obj.dip_covariance(mu, logvar, dip.kind), dip.lambda_od, dip.lambda_diag)

    # Always estimated so that every run reports TC; weighted only in a beta-TCVAE.
    # The estimators need two samples or more in the (global) batch.
    tc_weight = cfg.tc.beta_tc - 1.0
    with _grad_if(tc_weight != 0.0):
        if z.shape[0] >= 2:
            tc = obj.total_correlation(z, mu, logvar, dataset_size, cfg.tc.estimator)
        else:
            tc = kl_raw.new_zeros(())

    total = recon + kl_term
    if dip_weight:
        total = total + dip_weight * dip_penalty
    if tc_weight:
        total = total + tc_weight * tc
    return LossTerms(
        total=total, recon=recon, kl_raw=kl_raw, kl_constrained=kl_constrained,
        kl_weight=kl_weight, capacity=capacity, dip_penalty=dip_penalty, dip_weight=dip_weight,
        tc=tc, tc_weight=tc_weight,
    )
