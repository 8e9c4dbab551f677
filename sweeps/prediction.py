"""Collapse predicted before it is paid for: a trial's effective decoder variance against the data's spectrum.

A beta-VAE with decoder variance sigma^2 has the stationary points of a VAE with variance
sigma^2_eff = beta * sigma^2, and with a linear decoder its optimum keeps a latent direction
only where the data vary by more than sigma^2_eff (probabilistic PCA; Lucas et al. 2019). When
sigma^2_eff is at least the top eigenvalue lambda_1 of the training subjects' covariance
(:mod:`vae.data.spectrum`), no direction survives: the collapsed code *is* the optimum, and
training longer only finds it. A nonlinear decoder can do somewhat better than the best
direction, hence a margin: a trial is *predicted* to collapse when sigma^2_eff >= margin * lambda_1
(default 2).

sigma^2_eff per likelihood (:func:`vae.objectives.effective_sigma2`): mean-reduced MSE
beta * D / 2; Gaussian beta * sigma^2; the sigma-VAE learns sigma^2 = E[recon], so its
sigma^2_eff = beta * recon(mu) is known after the first epoch. With capacity annealing the KL
term is gamma * |KL - C|, so gamma takes beta's place.

What keeps the optimum off collapse, so that nothing is predicted:

* a KL floor above what the collapse rule calls collapsed: free bits make ``floor`` nats per
  dimension free (``floor * z_dim`` in all) and capacity rewards KL up to C_max; below the floor
  nothing pulls mu back to the prior, so the reconstruction's pull, however small, opens the code
  and the optimum keeps that many nats (a constant shift of mu can fill the floor with none: the
  collapse rule, not the prediction, catches that). A floor at or below the rule's KL (or channel)
  threshold cannot lift a trial out of what the rule calls collapsed;
* DIP-I's diagonal term lambda_d * (Var(mu_j) - 1)^2, which makes a constant mu cost lambda_d per
  dimension and pulls a nearly constant one open (DIP-II's covariance, Cov(mu) + E[sigma^2], is the
  identity at collapse: no cost, no pull).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from vae.config import ExperimentConfig
from vae.data.spectrum import Spectrum
from vae.objectives import effective_sigma2

from .collapse_rule import CollapseRule, dip_pulls_collapse_open

PREDICTION_PREFIX = "predicted: "


@dataclass(frozen=True)
class Prediction:
    """A trial's effective decoder variance against ``margin`` times the data's lambda_1."""

    sigma2_eff: float
    lambda_1: float
    margin: float

    @property
    def collapses(self) -> bool:
        return self.sigma2_eff >= self.margin * self.lambda_1

    def reason(self) -> str:
        """The trial's stop reason (starts with :data:`PREDICTION_PREFIX`)."""
        return (f"{PREDICTION_PREFIX}sigma^2_eff >= lambda_1: sigma^2_eff {self.sigma2_eff:.4g} "
                f"vs {self.margin:g} x lambda_1 {self.lambda_1:.4g} of the data's spectrum")


def kl_weight_at_full_strength(cfg: ExperimentConfig) -> float:
    """The weight of one nat of KL once the schedules are at full strength (gamma under capacity)."""
    kl = cfg.objective.kl
    return kl.capacity_gamma if kl.capacity_max is not None else kl.beta


def free_nats(cfg: ExperimentConfig) -> float:
    """The KL, in nats, the loss leaves unpenalised (free bits) or rewards (capacity)."""
    objective = cfg.objective
    floor = objective.free_bits.floor * cfg.model.z_dim
    return max(floor, objective.kl.capacity_max or 0.0)


def exemption(cfg: ExperimentConfig, rule: CollapseRule) -> str | None:
    """Why collapse is not the optimum of this trial's loss whatever its sigma^2_eff, or None."""
    threshold = max(rule.kl_min, rule.channel_min or 0.0)
    if free_nats(cfg) > threshold:
        return f"its KL floor of {free_nats(cfg):.3g} nats exceeds the collapse rule's {threshold:g}"
    if dip_pulls_collapse_open(cfg):
        return "DIP-I's diagonal term makes a constant mu cost lambda_d per dimension"
    return None


def sigma2_eff(cfg: ExperimentConfig, first_epoch: Mapping[str, float] | None = None) -> float | None:
    """The trial's sigma^2_eff at full strength; for the sigma-VAE from its first epoch's recon(mu)
    (None before it, or for a value that is not a number)."""
    objective, weight = cfg.objective, kl_weight_at_full_strength(cfg)
    if objective.likelihood == "sigma_vae":
        recon = (first_epoch or {}).get("recon_mu")
        return weight * float(recon) if isinstance(recon, (int, float)) and recon == recon else None
    return effective_sigma2(objective.likelihood, objective.sigma2, weight, cfg.in_channels * cfg.data.size**3)


def predict(
    cfg: ExperimentConfig,
    spectrum: Spectrum | None,
    rule: CollapseRule,
    margin: float,
    first_epoch: Mapping[str, float] | None = None,
) -> Prediction | None:
    """The prediction for a trial of ``cfg``: None when there is no spectrum, no sigma^2_eff yet, or an
    :func:`exemption`; else its numbers (:attr:`Prediction.collapses` says whether it collapses)."""
    if spectrum is None or spectrum.top <= 0 or exemption(cfg, rule) is not None:
        return None
    s2 = sigma2_eff(cfg, first_epoch)
    return None if s2 is None else Prediction(s2, spectrum.top, margin)
