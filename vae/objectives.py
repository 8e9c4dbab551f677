"""Pure loss functions of a 3D VAE. Tensors are batch-first; nothing here holds state.

Batch statistics (free bits in ``batch_mean`` mode, DIP covariances, TC, the sigma-VAE's
sigma) are computed on whatever batch they are given: under DDP the caller passes the
global batch from :func:`vae.dist.gather_batch` (for sigma, the squared error summed over
ranks). Without a process group that is simply the local batch.

Schedules are functions of a float epoch ``t`` (the caller may pass
``epoch + step / steps_per_epoch``), so a resumed run continues where it stopped.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

LIKELIHOODS = ("mse_mean", "gaussian", "sigma_vae")
KL_SCHEDULES = ("constant", "linear", "cyclical")
DIP_KINDS = ("i", "ii")
TC_ESTIMATORS = ("mws", "mss")

_LOG_2PI = math.log(2.0 * math.pi)
_SIGMA_VAE_MIN_LOG_SIGMA = -6.0  # Rybkin et al.'s soft lower bound on log sigma


# --------------------------------------------------------------------------- helpers


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it already is: half-precision sums and covariances are too coarse."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _without_autocast(t: torch.Tensor) -> AbstractContextManager:
    """Switch autocast off on ``t``'s device, which would otherwise run matmuls in half precision."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def _check_latents(**tensors: torch.Tensor) -> None:
    """Latent tensors must share one ``[B, D]`` shape."""
    _check_same_shape(**tensors)
    name, t = next(iter(tensors.items()))
    if t.dim() != 2:
        raise ValueError(f"{name} must be [batch, latent_dim], got shape {tuple(t.shape)}")


def _progress(t: float, length: float) -> float:
    """Fraction of a linear ramp of ``length`` epochs done at ``t``, in [0, 1]; a zero-length ramp is done."""
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, t / length))


# --------------------------------------------------------------------------- KL


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per sample and latent dimension.

    ``mu``, ``logvar``: ``[B, D]`` -> ``[B, D]`` nats.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def kl_raw(kl_bd: torch.Tensor) -> torch.Tensor:
    """Total KL in nats from ``kl_bd`` ``[B, D]``: summed over dimensions, averaged over the batch."""
    return kl_bd.sum(dim=1).mean()


def free_bits(kl_bd: torch.Tensor, floor: float, mode: str = "batch_mean") -> torch.Tensor:
    """KL with a floor of ``floor`` nats per dimension (Kingma et al. 2016), a scalar from ``[B, D]``.

    ``batch_mean``: average each dimension's KL over the batch, then clamp at the floor
    (the IAF form). ``per_sample``: clamp each sample's KL per dimension, then average.
    Below the floor the gradient is zero: free bits stop the KL from pushing a
    dimension further down, they do not pull information into it.
    """
    if floor <= 0:
        return kl_raw(kl_bd)
    if mode == "batch_mean":
        return kl_bd.mean(dim=0).clamp(min=floor).sum()
    if mode == "per_sample":
        return kl_bd.clamp(min=floor).sum(dim=1).mean()
    raise ValueError(f"free bits mode must be 'batch_mean' or 'per_sample', not {mode!r}")


# --------------------------------------------------------------------------- reconstruction


def sum_squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over every voxel of each sample: ``[B, C, *spatial]`` -> ``[B]``."""
    _check_same_shape(x_hat=x_hat, x=x)
    return (_at_least_float32(x_hat) - _at_least_float32(x)).pow(2).flatten(1).sum(dim=1)


def mse_mean(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch and voxels, a scalar: the audited loss, kept to reproduce its collapse.

    Next to a KL summed over latent dims with weight ``beta``, this is a Gaussian decoder
    with variance sigma^2 = beta * D / 2 (D voxels per sample): divide
    ``mse_mean + beta * KL`` by ``beta`` to get ``SSE / (2 sigma^2) + KL``. For a 4 x 128^3
    volume that is sigma^2 ~ 4e6 * beta: a latent direction would have to explain more than
    beta / 2 of all voxel variance to survive, so the optimum is collapsed.
    """
    _check_same_shape(x_hat=x_hat, x=x)
    return F.mse_loss(_at_least_float32(x_hat), _at_least_float32(x))


def gaussian_nll(x_hat: torch.Tensor, x: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Gaussian NLL with fixed variance ``sigma2``: sum over voxels of (x - x_hat)^2 / (2 sigma2), batch mean.

    ``x_hat``, ``x``: ``[B, C, *spatial]`` -> scalar. The constant 0.5 * D * log(2 pi sigma2)
    is left out: it has no gradient.
    """
    if sigma2 <= 0:
        raise ValueError(f"sigma2 must be a positive decoder variance, got {sigma2}")
    return (sum_squared_error(x_hat, x) / (2.0 * sigma2)).mean()


def _soft_clip_below(t: torch.Tensor, minimum: float) -> torch.Tensor:
    """Smooth ``max(t, minimum)``: ``minimum + softplus(t - minimum)``."""
    return minimum + F.softplus(t - minimum)


def optimal_log_sigma(sse: torch.Tensor, num_elements: int | torch.Tensor) -> torch.Tensor:
    """Soft-clipped log sqrt(MSE), the MSE being ``sse`` (a scalar) summed over ``num_elements`` values.

    The sigma-VAE's shared log sigma; :func:`sigma_vae_log_sigma` from one batch's tensors.
    """
    mse = sse / num_elements
    # An exactly zero error would give log 0 and an infinite gradient.
    log_sigma = 0.5 * mse.clamp_min(torch.finfo(mse.dtype).tiny).log()
    return _soft_clip_below(log_sigma, _SIGMA_VAE_MIN_LOG_SIGMA)


def shared_sigma_nll(sse: torch.Tensor, log_sigma: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Gaussian NLL with one sigma for every voxel, from the per-sample squared errors ``sse`` ``[B]``.

    Per voxel 0.5 * ((x - x_hat) / sigma)^2 + log sigma + 0.5 log(2 pi), summed over the
    ``num_voxels`` voxels of a sample and averaged over the batch, a scalar.
    """
    nll = 0.5 * sse * torch.exp(-2.0 * log_sigma) + num_voxels * (log_sigma + 0.5 * _LOG_2PI)
    return nll.mean()


def sigma_vae_log_sigma(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The shared log sigma of the "optimal sigma" VAE (Rybkin et al. 2021), a scalar.

    log sqrt(MSE over the whole batch): the sigma that minimises the Gaussian NLL of the
    current reconstructions, soft-clipped from below at -6 so that a near-perfect
    reconstruction cannot drive the NLL to minus infinity. Worth logging.
    """
    return optimal_log_sigma(sum_squared_error(x_hat, x).sum(), x.numel())


def sigma_vae_nll(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL with the batch's optimal shared sigma (Rybkin et al. 2021), a scalar.

    :func:`shared_sigma_nll` with log sigma as in :func:`sigma_vae_log_sigma`. The gradient
    flows through sigma as in the reference code; at the optimum it is ~0 there. Under DDP
    sigma is a statistic of the global batch: :func:`vae.loss.compute_loss` all-reduces
    the squared error and passes it to :func:`optimal_log_sigma`.
    """
    sse = sum_squared_error(x_hat, x)  # [B]
    return shared_sigma_nll(sse, optimal_log_sigma(sse.sum(), x.numel()), x[0].numel())


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")


def reconstruction(x_hat: torch.Tensor, x: torch.Tensor, likelihood: str, sigma2: float) -> torch.Tensor:
    """Reconstruction loss named by ``likelihood`` (``sigma2`` is used by ``gaussian`` only), a scalar."""
    _check_likelihood(likelihood)
    if likelihood == "mse_mean":
        return mse_mean(x_hat, x)
    if likelihood == "gaussian":
        return gaussian_nll(x_hat, x, sigma2)
    return sigma_vae_nll(x_hat, x)


def effective_sigma2(likelihood: str, sigma2: float, beta: float, num_voxels: int) -> float | None:
    """Decoder variance, in z-scored units, that ``likelihood`` with KL weight ``beta`` amounts to.

    ``beta``-VAE with variance sigma^2 has the stationary points of a VAE with variance
    beta * sigma^2, and a latent direction survives only if it explains more data
    variance than that. ``mse_mean``: beta * D / 2; ``gaussian``: beta * sigma2;
    ``sigma_vae``: ``None``, as sigma is learned from the reconstructions.
    """
    _check_likelihood(likelihood)
    if likelihood == "mse_mean":
        return beta * num_voxels / 2.0
    if likelihood == "gaussian":
        return beta * sigma2
    return None


# --------------------------------------------------------------------------- schedules


def kl_weight(
    t: float,
    beta: float,
    schedule: str,
    total_epochs: float,
    warmup_start: float = 0.0,
    warmup_epochs: float = 0.0,
    cycles: int = 4,
    cycle_ratio: float = 0.5,
) -> float:
    """Weight of the KL at epoch ``t``.

    ``constant``: ``beta``. ``linear``: from ``warmup_start * beta`` up to ``beta`` over
    ``warmup_epochs`` (Bowman et al. 2016; He et al. 2019). ``cyclical`` (Fu et al. 2019,
    ``frange_cycle_linear`` from 0 to ``beta``): ``cycles`` periods over ``total_epochs``;
    each rises linearly from 0 over its first ``cycle_ratio`` and holds ``beta`` for the rest.
    """
    if schedule == "constant":
        return beta
    if schedule == "linear":
        return beta * (warmup_start + (1.0 - warmup_start) * _progress(t, warmup_epochs))
    if schedule == "cyclical":
        if total_epochs <= 0 or cycles < 1 or not 0 < cycle_ratio <= 1:
            raise ValueError(
                "cyclical KL schedule needs total_epochs > 0, cycles >= 1 and 0 < cycle_ratio <= 1, "
                f"got total_epochs={total_epochs}, cycles={cycles}, cycle_ratio={cycle_ratio}"
            )
        period = total_epochs / cycles
        tau = (t % period) / period
        return beta * min(1.0, tau / cycle_ratio)
    raise ValueError(f"KL schedule must be one of {KL_SCHEDULES}, not {schedule!r}")


def capacity(t: float, c_max: float, ramp_epochs: float) -> float:
    """Target KL C in nats at epoch ``t``, rising linearly from 0 to ``c_max`` over ``ramp_epochs``.

    The capacity of Burgess et al. 2018; a zero-length ramp gives ``c_max`` from the start.
    """
    return c_max * _progress(t, ramp_epochs)


def capacity_penalty(kl: torch.Tensor, c: float, gamma: float) -> torch.Tensor:
    """gamma * |KL - C| (Burgess et al. 2018, Eq. 8) on the batch-mean KL ``kl`` (a scalar).

    Below C the gradient is -gamma * dKL: unlike free bits, it pushes information into z.
    """
    return gamma * (kl - c).abs()


def ramp(t: float, start: float, warmup: float) -> float:
    """Multiplier that is 0 before epoch ``start`` and rises linearly to 1 over ``warmup`` epochs after it."""
    if t < start:
        return 0.0
    return _progress(t - start, warmup)


# --------------------------------------------------------------------------- DIP-VAE


def dip_covariance(mu: torch.Tensor, logvar: torch.Tensor, kind: str) -> torch.Tensor:
    """Covariance regularised by DIP-VAE (Kumar et al. 2018), ``[D, D]`` from ``[B, D]`` inputs.

    ``i``: Cov_batch(mu), the population covariance (divided by B) of the posterior means.
    ``ii``: Cov_q(z) = Cov_batch(mu) + diag(mean over the batch of exp(logvar)).
    Computed in float32 (or float64) even under autocast.
    """
    if kind not in DIP_KINDS:
        raise ValueError(f"DIP kind must be one of {DIP_KINDS}, not {kind!r}")
    _check_latents(mu=mu, logvar=logvar)
    with _without_autocast(mu):
        mu = _at_least_float32(mu)
        centred = mu - mu.mean(dim=0, keepdim=True)
        # Equals disentanglement_lib's E[mu mu^T] - E[mu] E[mu]^T, without its cancellation.
        cov = centred.T @ centred / mu.shape[0]
        if kind == "ii":
            cov = cov + torch.diag(_at_least_float32(logvar).exp().mean(dim=0))
    return cov


def dip_penalty(cov: torch.Tensor, lambda_od: float, lambda_d: float) -> torch.Tensor:
    """lambda_od * sum_{i != j} C_ij^2 + lambda_d * sum_i (C_ii - 1)^2 for ``cov`` ``[D, D]``, a scalar."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square [D, D] matrix, got shape {tuple(cov.shape)}")
    diagonal = cov.diagonal()
    off_diagonal = cov - torch.diag(diagonal)
    return lambda_od * off_diagonal.pow(2).sum() + lambda_d * (diagonal - 1.0).pow(2).sum()


# --------------------------------------------------------------------------- beta-TCVAE


def _check_dataset_size(dataset_size: int, batch_size: int) -> None:
    if dataset_size < batch_size:
        raise ValueError(
            f"dataset_size ({dataset_size}) must be at least the batch size ({batch_size}): "
            "pass the number of training volumes"
        )


def log_density_gaussian(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) elementwise, broadcasting the three inputs."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def log_importance_weight_matrix(
    batch_size: int,
    dataset_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """log of the minibatch stratified sampling weights of Chen et al. 2018 (App. C), ``[M, M]``.

    With M = ``batch_size`` and N = ``dataset_size``, row i weighs sample i's own x_i by
    1/N, one stratified element (column (i + 1) mod M) by (N - M + 1) / (N (M - 1)) and
    every other element by 1/(M - 1); each row sums to 1.
    """
    m, n = batch_size, dataset_size
    if m < 2:
        raise ValueError(f"the MSS estimator needs a batch of at least 2 samples, got {m}")
    _check_dataset_size(n, m)
    weights = torch.full((m, m), 1.0 / (m - 1), dtype=torch.float64)
    rows = torch.arange(m)
    weights[rows, (rows + 1) % m] = (n - m + 1) / (n * (m - 1))
    # The public version (rtqichen/beta-tcvae, copied by disentangling-vae, pythae and
    # PyTorch-VAE) writes W.view(-1)[::M+1] with M+1 = batch size: that strides down
    # column 0, not the diagonal, so rows 1.. weigh sample 0 by 1/N and one row sums to > 1.
    weights.fill_diagonal_(1.0 / n)
    return weights.log().to(dtype=dtype, device=device)


def total_correlation(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int, estimator: str = "mws"
) -> torch.Tensor:
    """Batch estimate of TC = KL(q(z) || prod_d q(z_d)) (Chen et al. 2018), a scalar in nats.

    ``z``, ``mu``, ``logvar``: ``[B, D]``, with z_i drawn from q(z | x_i). q(z) and its
    marginals are estimated from the batch by minibatch weighted sampling (``mws``:
    weight 1/(N M) per element) or minibatch stratified sampling (``mss``: the weights of
    :func:`log_importance_weight_matrix`). Both are biased for small batches; MWS values
    also carry a large positive offset (about (D - 1) log N once the batch covers the
    aggregate posterior), so compare them with each other, not with 0. Computed in
    float32 (or float64) even under autocast; memory is O(B^2 D).
    """
    if estimator not in TC_ESTIMATORS:
        raise ValueError(f"TC estimator must be one of {TC_ESTIMATORS}, not {estimator!r}")
    _check_latents(z=z, mu=mu, logvar=logvar)
    batch_size = z.shape[0]
    _check_dataset_size(dataset_size, batch_size)
    with _without_autocast(z):
        z, mu, logvar = (_at_least_float32(t) for t in (z, mu, logvar))
        # log q(z_id | x_j): [B (sample i), B (posterior j), D]
        log_q_zd_given_x = log_density_gaussian(z[:, None, :], mu[None, :, :], logvar[None, :, :])
        if estimator == "mws":
            log_w = torch.full_like(log_q_zd_given_x[..., 0], -math.log(dataset_size * batch_size))
        else:
            log_w = log_importance_weight_matrix(batch_size, dataset_size, dtype=z.dtype, device=z.device)
        log_qz = torch.logsumexp(log_q_zd_given_x.sum(dim=2) + log_w, dim=1)  # [B]
        log_prod_qzd = torch.logsumexp(log_q_zd_given_x + log_w[:, :, None], dim=1).sum(dim=1)  # [B]
        return (log_qz - log_prod_qzd).mean()
