"""vae.objectives against analytic values and independent float64 computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from vae import objectives as obj


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(seed)
    mu = torch.randn(batch, dim, generator=g, dtype=dtype)
    logvar = 0.5 * torch.randn(batch, dim, generator=g, dtype=dtype)
    return mu, logvar


def _volumes(seed: int, shape: tuple[int, ...] = (2, 3, 8, 8, 8), dtype=torch.float64):
    g = _generator(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x_hat = x + 0.7 * torch.randn(shape, generator=g, dtype=dtype)
    return x_hat, x


# --------------------------------------------------------------------------- KL


def test_kl_of_the_prior_is_zero():
    zeros = torch.zeros(3, 5)
    assert torch.equal(obj.kl_per_dim(zeros, zeros), torch.zeros(3, 5))


def test_kl_per_dim_matches_closed_form_in_float64():
    mu, logvar = _latents(4, 6, seed=0, dtype=torch.float32)
    m, s = mu.double().numpy(), np.exp(0.5 * logvar.double().numpy())
    expected = np.log(1.0 / s) + (s**2 + m**2) / 2.0 - 0.5
    np.testing.assert_allclose(obj.kl_per_dim(mu, logvar).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_kl_per_dim_matches_torch_distributions():
    mu, logvar = _latents(4, 6, seed=1)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior)
    torch.testing.assert_close(obj.kl_per_dim(mu, logvar), expected, rtol=1e-12, atol=1e-12)


def test_kl_raw_sums_dims_and_averages_batch():
    kl_bd = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 0.5]])
    assert obj.kl_raw(kl_bd).item() == pytest.approx((6.0 + 1.0) / 2)


# --------------------------------------------------------------------------- free bits


@pytest.mark.parametrize("mode", ["batch_mean", "per_sample"])
def test_free_bits_has_no_gradient_below_the_floor(mode):
    kl_bd = torch.full((3, 4), 0.01, requires_grad=True)
    loss = obj.free_bits(kl_bd, floor=0.5, mode=mode)
    loss.backward()
    assert loss.item() == pytest.approx(4 * 0.5)
    assert torch.equal(kl_bd.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("mode", ["batch_mean", "per_sample"])
def test_free_bits_passes_the_kl_gradient_above_the_floor(mode):
    kl_bd = torch.full((3, 4), 2.0, requires_grad=True)
    obj.free_bits(kl_bd, floor=0.5, mode=mode).backward()
    # d/dKL_bj of the batch-mean KL: unit weight per nat, shared over the 3 samples.
    torch.testing.assert_close(kl_bd.grad, torch.full((3, 4), 1.0 / 3))


def test_batch_mean_clamps_the_batch_mean_not_each_sample():
    # Dimension 0: sample 0 is below the floor, sample 1 above; the batch mean 0.5 is below.
    kl_bd = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    batch_mean = obj.free_bits(kl_bd, floor=0.6, mode="batch_mean")
    per_sample = obj.free_bits(kl_bd, floor=0.6, mode="per_sample")
    assert batch_mean.item() == pytest.approx(0.6 + 1.0)
    assert per_sample.item() == pytest.approx(((0.6 + 1.0) + (1.0 + 1.0)) / 2)
    (grad_batch_mean,) = torch.autograd.grad(batch_mean, kl_bd)
    (grad_per_sample,) = torch.autograd.grad(per_sample, kl_bd)
    # batch_mean switches dimension 0 off for the whole batch, per_sample only for sample 0.
    torch.testing.assert_close(grad_batch_mean, torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
    torch.testing.assert_close(grad_per_sample, torch.tensor([[0.0, 0.5], [0.5, 0.5]]))


@pytest.mark.parametrize("mode", ["batch_mean", "per_sample"])
def test_free_bits_with_zero_floor_is_the_raw_kl(mode):
    mu, logvar = _latents(5, 3, seed=2)
    kl_bd = obj.kl_per_dim(mu, logvar)
    assert obj.free_bits(kl_bd, 0.0, mode).item() == pytest.approx(kl_bd.sum().item() / 5, rel=1e-12)


def test_free_bits_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="per_batch"):
        obj.free_bits(torch.ones(2, 2), 0.5, mode="per_batch")


# --------------------------------------------------------------------------- likelihoods


def test_mse_mean_matches_numpy():
    x_hat, x = _volumes(seed=3)
    expected = np.mean((x_hat.numpy() - x.numpy()) ** 2)
    assert obj.mse_mean(x_hat, x).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("sigma2", [0.05, 1.0])
def test_gaussian_nll_matches_a_float64_sum(sigma2):
    x_hat, x = _volumes(seed=4, dtype=torch.float32)
    a, b = x_hat.double().numpy(), x.double().numpy()
    per_sample = [np.sum((b[i] - a[i]) ** 2) / (2.0 * sigma2) for i in range(a.shape[0])]
    assert obj.gaussian_nll(x_hat, x, sigma2).item() == pytest.approx(np.mean(per_sample), rel=1e-5)


@pytest.mark.parametrize("beta", [1.0, 4.0, 1e-3])
def test_mse_mean_is_a_gaussian_with_sigma2_beta_d_over_2(beta):
    """mse_mean + beta KL has the gradients of beta * (gaussian(sigma2 = beta D / 2) + KL)."""
    x_hat, x = _volumes(seed=5)
    mu, logvar = _latents(2, 4, seed=6)
    params = [t.clone().requires_grad_() for t in (x_hat, mu, logvar)]
    num_voxels = x[0].numel()
    sigma2 = obj.effective_sigma2("mse_mean", sigma2=1.0, beta=beta, num_voxels=num_voxels)
    assert sigma2 == pytest.approx(beta * num_voxels / 2)

    def grads(loss):
        return torch.autograd.grad(loss, params)

    xh, m, lv = params
    audited = grads(obj.mse_mean(xh, x) + beta * obj.kl_raw(obj.kl_per_dim(m, lv)))
    gaussian = grads(obj.gaussian_nll(xh, x, sigma2) + obj.kl_raw(obj.kl_per_dim(m, lv)))
    for g_audited, g_gaussian in zip(audited, gaussian):
        torch.testing.assert_close(g_audited, beta * g_gaussian, rtol=1e-12, atol=1e-15)


def test_effective_sigma2_of_each_likelihood():
    assert obj.effective_sigma2("gaussian", sigma2=0.1, beta=4.0, num_voxels=1000) == pytest.approx(0.4)
    assert obj.effective_sigma2("mse_mean", sigma2=0.1, beta=1.0, num_voxels=4 * 128**3) == 4 * 128**3 / 2
    assert obj.effective_sigma2("sigma_vae", sigma2=0.1, beta=1.0, num_voxels=1000) is None
    with pytest.raises(ValueError, match="bernoulli"):
        obj.effective_sigma2("bernoulli", sigma2=0.1, beta=1.0, num_voxels=1000)


def _sigma_vae_reference(x_hat: np.ndarray, x: np.ndarray) -> float:
    """Rybkin et al.'s optimal-sigma NLL, written elementwise in float64 numpy."""
    log_sigma = math.log(math.sqrt(np.mean((x - x_hat) ** 2)))
    log_sigma = -6.0 + np.logaddexp(0.0, log_sigma + 6.0)  # softclip(log_sigma, -6)
    per_voxel = 0.5 * ((x - x_hat) / math.exp(log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
    return float(np.mean([per_voxel[i].sum() for i in range(x.shape[0])]))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sigma_vae_nll_matches_a_float64_reimplementation(dtype, rtol):
    x_hat, x = _volumes(seed=7, dtype=dtype)
    expected = _sigma_vae_reference(x_hat.double().numpy(), x.double().numpy())
    assert obj.sigma_vae_nll(x_hat, x).item() == pytest.approx(expected, rel=rtol)


def test_sigma_vae_sigma_minimises_the_gaussian_nll():
    x_hat, x = _volumes(seed=8)
    a, b = x_hat.numpy(), x.numpy()

    def nll(log_sigma: float) -> float:  # batch-mean Gaussian NLL at a free shared sigma
        per_voxel = 0.5 * ((b - a) / math.exp(log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
        return per_voxel.sum() / b.shape[0]

    clipped = obj.sigma_vae_log_sigma(x_hat, x).item()
    unclipped = -6.0 + math.log(math.expm1(clipped + 6.0))  # undo softclip(., -6)
    h = 1e-5
    derivative = (nll(unclipped + h) - nll(unclipped - h)) / (2 * h)
    assert abs(derivative) < 1e-6 * x[0].numel()
    assert nll(unclipped) < min(nll(unclipped - 0.05), nll(unclipped + 0.05))
    assert obj.sigma_vae_nll(x_hat, x).item() == pytest.approx(nll(clipped), rel=1e-12)


def test_sigma_vae_is_finite_for_a_perfect_reconstruction():
    x = torch.randn(2, 1, 4, 4, 4, generator=_generator(9))
    x_hat = x.clone().requires_grad_()
    loss = obj.sigma_vae_nll(x_hat, x)
    loss.backward()
    assert obj.sigma_vae_log_sigma(x_hat, x).item() == pytest.approx(-6.0, abs=1e-6)
    assert torch.isfinite(loss) and torch.isfinite(x_hat.grad).all()


def test_sigma_vae_sigma_from_pooled_errors_is_the_whole_batchs():
    """How a caller pools sigma over the slices of a batch (ranks under DDP): summed squared
    errors and element counts, the count as a tensor, give the whole batch's sigma and NLL."""
    x_hat, x = _volumes(seed=11, shape=(4, 2, 6, 6, 6))
    pooled = sum(obj.sum_squared_error(h, t).sum() for h, t in zip(x_hat.chunk(2), x.chunk(2)))
    log_sigma = obj.optimal_log_sigma(pooled, torch.tensor(x.numel()))
    assert log_sigma.item() == pytest.approx(obj.sigma_vae_log_sigma(x_hat, x).item(), rel=1e-12)
    first_half = obj.shared_sigma_nll(obj.sum_squared_error(x_hat[:2], x[:2]), log_sigma, x[0].numel())
    second_half = obj.shared_sigma_nll(obj.sum_squared_error(x_hat[2:], x[2:]), log_sigma, x[0].numel())
    assert ((first_half + second_half) / 2).item() == pytest.approx(obj.sigma_vae_nll(x_hat, x).item(), rel=1e-12)


@pytest.mark.parametrize("likelihood", obj.LIKELIHOODS)
def test_reconstruction_dispatches_on_the_likelihood(likelihood):
    x_hat, x = _volumes(seed=10)
    direct = {
        "mse_mean": lambda: obj.mse_mean(x_hat, x),
        "gaussian": lambda: obj.gaussian_nll(x_hat, x, 0.3),
        "sigma_vae": lambda: obj.sigma_vae_nll(x_hat, x),
    }[likelihood]()
    assert obj.reconstruction(x_hat, x, likelihood, sigma2=0.3).item() == direct.item()


def test_reconstruction_rejects_bad_input():
    x_hat, x = _volumes(seed=11)
    with pytest.raises(ValueError, match="'l1'"):
        obj.reconstruction(x_hat, x, "l1", sigma2=1.0)
    with pytest.raises(ValueError, match="sigma2"):
        obj.reconstruction(x_hat, x, "gaussian", sigma2=0.0)
    with pytest.raises(ValueError, match="one shape"):
        obj.reconstruction(x_hat[:, :2], x, "mse_mean", sigma2=1.0)


# --------------------------------------------------------------------------- schedules


def test_constant_and_linear_kl_weight():
    kw = dict(beta=2.0, total_epochs=100, warmup_start=0.1, warmup_epochs=10)
    assert obj.kl_weight(37.0, schedule="constant", **kw) == 2.0
    assert obj.kl_weight(0.0, schedule="linear", **kw) == pytest.approx(0.2)
    assert obj.kl_weight(5.0, schedule="linear", **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert obj.kl_weight(10.0, schedule="linear", **kw) == pytest.approx(2.0)
    assert obj.kl_weight(50.0, schedule="linear", **kw) == pytest.approx(2.0)
    assert obj.kl_weight(0.0, 2.0, "linear", 100, warmup_start=0.1, warmup_epochs=0) == 2.0


def _frange_cycle_linear(n_iter: int, start: float = 0.0, stop: float = 1.0, n_cycle: int = 4, ratio: float = 0.5):
    """haofuml/cyclical_annealing's frange_cycle_linear, loop for loop."""
    schedule = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and int(i + c * period) < n_iter:
            schedule[int(i + c * period)] = v
            v += step
            i += 1
    return schedule


@pytest.mark.parametrize(
    "total, cycles, ratio", [(40, 4, 0.5), (32, 4, 0.25), (30, 3, 0.75), (16, 2, 0.5), (10, 1, 1.0)]
)
def test_cyclical_kl_weight_matches_fu_et_al(total, cycles, ratio):
    beta = 3.0
    reference = _frange_cycle_linear(total, start=0.0, stop=beta, n_cycle=cycles, ratio=ratio)
    ours = [obj.kl_weight(t, beta, "cyclical", total, cycles=cycles, cycle_ratio=ratio) for t in range(total)]
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("total, cycles", [(40, 4), (10, 3)])
def test_cyclical_kl_weight_breakpoints(total, cycles):
    beta, ratio = 0.5, 0.5
    period = total / cycles

    def weight(t):
        return obj.kl_weight(t, beta, "cyclical", total, cycles=cycles, cycle_ratio=ratio)

    assert weight(0.0) == 0.0
    assert weight(0.25 * period) == pytest.approx(0.5 * beta)
    assert weight(period * ratio) == pytest.approx(beta)
    assert weight(0.8 * period) == beta
    assert weight(0.999 * period) == beta
    assert weight(period) == pytest.approx(0.0, abs=1e-12)
    assert weight(period + 0.25 * period) == pytest.approx(0.5 * beta)


def test_kl_weight_rejects_bad_schedules():
    with pytest.raises(ValueError, match="sigmoid"):
        obj.kl_weight(0.0, 1.0, "sigmoid", 10)
    with pytest.raises(ValueError, match="total_epochs"):
        obj.kl_weight(0.0, 1.0, "cyclical", 0)
    with pytest.raises(ValueError, match="cycle_ratio"):
        obj.kl_weight(0.0, 1.0, "cyclical", 10, cycle_ratio=0.0)


def test_capacity_ramp_and_penalty():
    assert [obj.capacity(t, 25.0, 10.0) for t in (0.0, 5.0, 10.0, 20.0)] == [0.0, 12.5, 25.0, 25.0]
    assert obj.capacity(0.0, 25.0, 0.0) == 25.0
    kl = torch.tensor(3.0, requires_grad=True)
    penalty = obj.capacity_penalty(kl, c=5.0, gamma=1000.0)
    penalty.backward()
    assert penalty.item() == pytest.approx(2000.0)
    assert kl.grad.item() == -1000.0  # below C the KL is pushed up
    kl_above = torch.tensor(7.0, requires_grad=True)
    obj.capacity_penalty(kl_above, c=5.0, gamma=1000.0).backward()
    assert kl_above.grad.item() == 1000.0


def test_dip_ramp_start_and_warmup():
    times = (0.0, 4.99, 5.0, 10.0, 15.0, 100.0)
    assert [obj.ramp(t, start=5.0, warmup=10.0) for t in times] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert [obj.ramp(t, start=5.0, warmup=0.0) for t in (4.99, 5.0, 6.0)] == [0.0, 1.0, 1.0]


# --------------------------------------------------------------------------- DIP-VAE


@pytest.mark.parametrize("lambda_od, lambda_d", [(1.0, 10.0), (50.0, 50.0)])
def test_dip_penalty_of_the_identity_is_zero(lambda_od, lambda_d):
    assert obj.dip_penalty(torch.eye(6), lambda_od, lambda_d).item() == 0.0


def test_dip_penalty_matches_a_double_loop():
    cov = torch.randn(5, 5, generator=_generator(12), dtype=torch.float64)
    c = cov.numpy()
    off_diagonal = sum(c[i, j] ** 2 for i in range(5) for j in range(5) if i != j)
    diagonal = sum((c[i, i] - 1.0) ** 2 for i in range(5))
    assert obj.dip_penalty(cov, 2.0, 7.0).item() == pytest.approx(2.0 * off_diagonal + 7.0 * diagonal, rel=1e-12)


def _antixk_dip_ii_covariance(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """AntixK/PyTorch-VAE models/dip_vae.py, verbatim: the bugs this project must not have."""
    centered_mu = mu - mu.mean(dim=1, keepdim=True)
    cov_mu = centered_mu.t().matmul(centered_mu).squeeze()
    return cov_mu + torch.mean(torch.diagonal((2 * log_var).exp(), dim1=0), dim=0)


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_covariance_matches_numpy(kind):
    mu, logvar = _latents(16, 5, seed=13)
    expected = np.cov(mu.numpy(), rowvar=False, bias=True)
    if kind == "ii":
        expected = expected + np.diag(np.exp(logvar.numpy()).mean(axis=0))
    np.testing.assert_allclose(obj.dip_covariance(mu, logvar, kind).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_dip_ii_covariance_differs_from_the_antixk_formula():
    mu, logvar = _latents(16, 5, seed=14)
    ours = obj.dip_covariance(mu, logvar, "ii")
    buggy = _antixk_dip_ii_covariance(mu, logvar)
    assert buggy.shape == ours.shape
    assert not torch.allclose(buggy, ours, rtol=1e-2, atol=1e-2)


def test_dip_at_full_collapse():
    mu = torch.randn(1, 6, generator=_generator(15)).expand(8, 6)
    logvar = torch.zeros(8, 6)
    cov_ii = obj.dip_covariance(mu, logvar, "ii")
    torch.testing.assert_close(cov_ii, torch.eye(6), rtol=0, atol=1e-6)
    assert obj.dip_penalty(cov_ii, 10.0, 10.0).item() == pytest.approx(0.0, abs=1e-8)  # DIP-II cannot resist
    cov_i = obj.dip_covariance(mu, logvar, "i")
    assert obj.dip_penalty(cov_i, 10.0, 100.0).item() == pytest.approx(100.0 * 6, rel=1e-5)  # DIP-I does


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_covariance_is_float32_under_bf16_autocast(kind):
    mu, logvar = (t.to(torch.bfloat16) for t in _latents(16, 5, seed=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cov = obj.dip_covariance(mu, logvar, kind)
    assert cov.dtype == torch.float32
    expected = np.cov(mu.double().numpy(), rowvar=False, bias=True)
    if kind == "ii":
        expected = expected + np.diag(np.exp(logvar.double().numpy()).mean(axis=0))
    # A bf16 matmul would be off by ~1e-2 relative.
    np.testing.assert_allclose(cov.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dip_rejects_bad_input():
    mu, logvar = _latents(4, 3, seed=17)
    with pytest.raises(ValueError, match="'iii'"):
        obj.dip_covariance(mu, logvar, "iii")
    with pytest.raises(ValueError, match="one shape"):
        obj.dip_covariance(mu, logvar[:, :2], "ii")
    with pytest.raises(ValueError, match="square"):
        obj.dip_penalty(torch.ones(3, 4), 1.0, 1.0)


# --------------------------------------------------------------------------- beta-TCVAE


def test_log_density_gaussian_matches_scipy():
    mu, logvar = _latents(4, 3, seed=18)
    z = torch.randn(4, 3, generator=_generator(19), dtype=torch.float64)
    expected = stats.norm.logpdf(z.numpy(), loc=mu.numpy(), scale=np.exp(0.5 * logvar.numpy()))
    np.testing.assert_allclose(obj.log_density_gaussian(z, mu, logvar).numpy(), expected, rtol=1e-12)


def _is_mss_weight_matrix(weights: np.ndarray, dataset_size: int) -> bool:
    """Chen et al. App. C: each row 1/N on its own sample, one stratified weight, 1/(M - 1) elsewhere."""
    m, n = weights.shape[0], dataset_size
    stratified, other = (n - m + 1) / (n * (m - 1)), 1.0 / (m - 1)
    for i, row in enumerate(weights):
        if not math.isclose(row.sum(), 1.0, rel_tol=1e-12) or not math.isclose(row[i], 1.0 / n, rel_tol=1e-12):
            return False
        rest = np.delete(row, i)
        if np.isclose(rest, stratified, rtol=1e-12).sum() != 1 or np.isclose(rest, other, rtol=1e-12).sum() != m - 2:
            return False
    return True


def test_mss_weight_matrix_has_the_papers_weights():
    weights = obj.log_importance_weight_matrix(5, 100, dtype=torch.float64).exp().numpy()
    assert _is_mss_weight_matrix(weights, 100)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diag(weights), 1.0 / 100, rtol=1e-12)
    assert np.isclose(weights, 96 / 400, rtol=1e-12).sum() == 5  # (N - M + 1) / (N (M - 1)), once per row


def test_the_public_mss_construction_fails_the_same_check():
    """rtqichen/beta-tcvae VAE._log_importance_weight_matrix, verbatim."""
    batch_size, dataset_size = 5, 100
    N = dataset_size
    M = batch_size - 1
    strat_weight = (N - M) / (N * M)
    W = torch.empty(batch_size, batch_size, dtype=torch.float64).fill_(1 / M)
    W.view(-1)[:: M + 1] = 1 / N
    W.view(-1)[1 :: M + 1] = strat_weight
    W[M - 1, 0] = strat_weight
    public = W.numpy()
    assert not _is_mss_weight_matrix(public, dataset_size)
    # It strides down column 0: rows 1.. give 1/N to sample 0, and row M - 2 sums to 1.23.
    assert np.allclose(public[[0, 1, 2, 4], 0], 1 / N)
    assert not np.isclose(np.diag(public)[1:], 1 / N).any()
    assert public.sum(axis=1)[batch_size - 2] == pytest.approx(1.23)


def _numpy_total_correlation(z, mu, logvar, dataset_size, estimator):
    """Chen et al.'s estimators with explicit loops and scipy's logsumexp, float64."""
    m, d = z.shape
    n = dataset_size
    log_q = np.empty((m, m, d))
    for i in range(m):
        for j in range(m):
            log_q[i, j] = stats.norm.logpdf(z[i], mu[j], np.exp(0.5 * logvar[j]))
    if estimator == "mws":
        log_w = np.full((m, m), -np.log(n * m))
    else:
        w = np.full((m, m), 1.0 / (m - 1))
        for i in range(m):
            w[i, (i + 1) % m] = (n - m + 1) / (n * (m - 1))
            w[i, i] = 1.0 / n
        log_w = np.log(w)
    tc = []
    for i in range(m):
        log_qz = logsumexp(log_q[i].sum(axis=1) + log_w[i])
        log_prod = sum(logsumexp(log_q[i, :, k] + log_w[i]) for k in range(d))
        tc.append(log_qz - log_prod)
    return np.mean(tc)


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_total_correlation_matches_a_float64_reimplementation(estimator):
    mu, logvar = _latents(6, 3, seed=20)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(6, 3, generator=_generator(21), dtype=torch.float64)
    expected = _numpy_total_correlation(z.numpy(), mu.numpy(), logvar.numpy(), 50, estimator)
    assert obj.total_correlation(z, mu, logvar, 50, estimator).item() == pytest.approx(expected, rel=1e-10)
    ours32 = obj.total_correlation(z.float(), mu.float(), logvar.float(), 50, estimator).item()
    assert ours32 == pytest.approx(expected, rel=1e-4)


def _aggregate_samples(correlated: bool, batch: int = 512, dim: int = 4, seed: int = 22):
    """z ~ q(z | x) with N(0, 1) means and variance 0.25: independent dims, or every dim a copy of one mean."""
    g = _generator(seed)
    mu = torch.randn(batch, 1 if correlated else dim, generator=g).expand(batch, dim)
    logvar = torch.full((batch, dim), math.log(0.25))
    z = mu + 0.5 * torch.randn(batch, dim, generator=g)
    return z, mu, logvar


def _gaussian_tc(dim: int, rho: float) -> float:
    """TC of an equicorrelated Gaussian: -0.5 log det of its correlation matrix."""
    return -0.5 * math.log((1 - rho) ** (dim - 1) * (1 + (dim - 1) * rho))


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_total_correlation_separates_independent_from_correlated_latents(estimator):
    batch, dim = 512, 4
    independent = obj.total_correlation(*_aggregate_samples(False), batch, estimator).item()
    correlated = obj.total_correlation(*_aggregate_samples(True), batch, estimator).item()
    true_tc = _gaussian_tc(dim, rho=1.0 / 1.25)  # corr(z_a, z_b) = Var(mu) / Var(z) = 1 / 1.25
    assert correlated - independent == pytest.approx(true_tc, abs=0.25)
    if estimator == "mss":  # consistent: ~0 for a factorised aggregate posterior
        assert abs(independent) < 0.15
        assert correlated == pytest.approx(true_tc, abs=0.15)


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_total_correlation_gradient_reaches_mu_and_logvar(estimator):
    mu, logvar = (t.float().requires_grad_() for t in _latents(8, 4, seed=23))
    z = mu + torch.exp(0.5 * logvar) * torch.randn(8, 4, generator=_generator(24))
    obj.total_correlation(z, mu, logvar, 100, estimator).backward()
    for grad in (mu.grad, logvar.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_total_correlation_is_float32_under_bf16_autocast(estimator):
    mu, logvar = _latents(8, 4, seed=25)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(8, 4, generator=_generator(26), dtype=torch.float64)
    expected = _numpy_total_correlation(*(t.bfloat16().double().numpy() for t in (z, mu, logvar)), 100, estimator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tc = obj.total_correlation(z.bfloat16(), mu.bfloat16(), logvar.bfloat16(), 100, estimator)
    assert tc.dtype == torch.float32
    assert tc.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_total_correlation_rejects_bad_input():
    mu, logvar = _latents(4, 3, seed=27)
    with pytest.raises(ValueError, match="'mc'"):
        obj.total_correlation(mu, mu, logvar, 100, "mc")
    with pytest.raises(ValueError, match=r"dataset_size \(2\)"):
        obj.total_correlation(mu, mu, logvar, 2, "mws")
    with pytest.raises(ValueError, match="one shape"):
        obj.total_correlation(mu[:, :2], mu, logvar, 100, "mws")
    with pytest.raises(ValueError, match="at least 2"):
        obj.log_importance_weight_matrix(1, 100)


# --------------------------------------------------------------------------- the audited collapse in numbers


def test_audited_exp2_at_full_collapse_reports_the_free_bits_floor():
    """mu = 0 and logvar = 0 for all 128 dims: KL_raw is 0 and the objective sees the floor,
    128 x 0.05 = 6.4 nats (the audit's kl_constrained of 6.40-6.43); DIP-II adds nothing."""
    from vae.config import load_experiment
    from vae.evaluation.diagnostics import ValidationAccumulator
    from vae.loss import compute_loss

    cfg = load_experiment("exp2_dipvae_sbd", ["data.size=16", "data.modalities=[t1c]"])
    assert cfg.model.z_dim == 128
    batch, d = 8, cfg.model.z_dim
    mu = logvar = torch.zeros(batch, d)
    x = torch.randn(batch, 1, 16, 16, 16)
    x_hat = x.mean(dim=0, keepdim=True).expand_as(x)  # the template
    terms = compute_loss(x, x_hat, mu, logvar, torch.randn(batch, d), cfg.objective,
                         epoch=cfg.train.epochs - 1.0, total_epochs=cfg.train.epochs, dataset_size=100)
    assert float(terms.kl_raw) == 0.0
    assert float(terms.kl_constrained) == pytest.approx(6.4, rel=1e-6)
    assert terms.dip_weight == 1.0 and float(terms.dip_penalty) == 0.0

    fb = cfg.objective.free_bits
    acc = ValidationAccumulator(d, free_bits_floor=fb.floor, free_bits_mode=fb.mode)
    acc.update(x, x_hat, x_hat, x_hat, mu, logvar, torch.randn(batch, d))
    acc.reduce()
    reported = acc.result()
    assert reported["kl_raw"] == 0.0 and reported["au"] == 0
    assert reported["kl_constrained"] == pytest.approx(6.4, rel=1e-6)
