"""Collapse diagnostics against analytic values and independent float64 numpy computations."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.special import logsumexp
from scipy.stats import norm

from vae.evaluation import diagnostics
from vae.evaluation.diagnostics import (
    ValidationAccumulator,
    active_units,
    active_units_from_variance,
    aggregate_posterior_kl,
    channel_capacity,
    decoder_sensitivity,
    max_offdiag_correlation,
    mutual_information,
    PSNR_CAP_DB,
    ssim_psnr_per_modality,
)

CHANNELS, EDGE, Z_DIM = 2, 16, 6
# Posterior-mean spread per latent dim: the first three are active (variance >> 0.01), the rest not.
MU_SCALES = np.array([2.0, 1.0, 0.5, 0.05, 0.01, 0.001])
VOLUME_AXES = (1, 2, 3, 4)


# ---------------------------------------------------------------------------- synthetic data


def make_samples(n: int, seed: int = 0, edge: int = EDGE) -> dict[str, np.ndarray]:
    """Posteriors, samples and a linear decoder's outputs for ``n`` volumes, as float32 arrays."""
    rng = np.random.default_rng(seed)
    template = rng.normal(size=(CHANNELS, edge, edge, edge))
    weights = rng.normal(scale=0.3, size=(Z_DIM, CHANNELS * edge**3))
    mu = rng.normal(size=(n, Z_DIM)) * MU_SCALES
    mu[:, 1] += 0.7 * mu[:, 0]  # a correlated pair for the off-diagonal correlation
    logvar = rng.uniform(-3.0, 0.5, size=(n, Z_DIM))
    z = mu + np.exp(0.5 * logvar) * rng.normal(size=(n, Z_DIM))

    def decode(codes: np.ndarray) -> np.ndarray:
        return template + (codes @ weights).reshape(-1, CHANNELS, edge, edge, edge)

    x_hat_mu = decode(mu)
    samples = {
        "x": x_hat_mu + 0.3 * rng.normal(size=x_hat_mu.shape),
        "x_hat_mu": x_hat_mu,
        "x_hat_z": decode(z),
        "x_hat_zero": decode(np.zeros_like(mu)),
        "mu": mu,
        "logvar": logvar,
        "z": z,
    }
    return {name: a.astype(np.float32) for name, a in samples.items()}


def split(samples: dict[str, np.ndarray], sizes: list[int], order: np.ndarray | None = None) -> list[dict]:
    """Batches of torch tensors with the given sizes, optionally after permuting the samples."""
    order = np.arange(len(samples["x"])) if order is None else order
    assert sum(sizes) == len(order)
    bounds = np.cumsum([0, *sizes])
    return [
        {name: torch.from_numpy(a[order[lo:hi]]) for name, a in samples.items()}
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def accumulate(batches: list[dict], **kwargs) -> dict:
    acc = ValidationAccumulator(Z_DIM, **kwargs)
    for batch in batches:
        acc.update(**batch)
    acc.reduce()
    return acc.result()


# ---------------------------------------------------------------------------- numpy references


def numpy_mi(mu: np.ndarray, logvar: np.ndarray, noise: np.ndarray) -> float:
    """He et al.'s MI estimator written with scipy densities, z_i = mu_i + sigma_i * noise_i."""
    n = len(mu)
    sigma = np.exp(0.5 * logvar)
    z = mu + sigma * noise
    log_q_z_given_x = norm.logpdf(z[:, None, :], loc=mu[None], scale=sigma[None]).sum(axis=2)  # [i, j]
    log_qz = logsumexp(log_q_z_given_x, axis=1) - np.log(n)
    # E_q log q(z|x) of a Gaussian is minus its entropy, sum_d 0.5 * log(2 pi e sigma_d^2).
    neg_entropy = -np.sum(0.5 * np.log(2 * np.pi * np.e * sigma**2), axis=1).mean()
    return float(neg_entropy - log_qz.mean())


def torch_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()


def numpy_psnr(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """PSNR per channel, 10 log10(range^2 / MSE), range = max - min of the target channel."""
    data_range = x.max(axis=(0, 2, 3, 4)) - x.min(axis=(0, 2, 3, 4))
    mse = ((x_hat - x) ** 2).mean(axis=(0, 2, 3, 4))
    return 10 * np.log10(data_range**2 / mse)


def numpy_reference(samples: dict[str, np.ndarray], floor: float, mode: str, seed: int = 0) -> dict:
    s = {name: a.astype(np.float64) for name, a in samples.items()}
    mu, logvar, z, x = s["mu"], s["logvar"], s["z"], s["x"]
    n = len(mu)
    kl = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1)
    kl_mean = kl.mean(axis=0)
    mu_var = mu.var(axis=0, ddof=1)
    corr = np.corrcoef(mu, rowvar=False)
    spread = ((x - x.mean(axis=0)) ** 2).sum(axis=VOLUME_AXES).mean()
    shift = ((s["x_hat_mu"] - s["x_hat_zero"]) ** 2).sum(axis=VOLUME_AXES).mean()
    # MI is specified on the pool sorted lexicographically, noise from Generator(seed).
    order = sorted(range(n), key=lambda i: tuple(mu[i]) + tuple(logvar[i]))
    if mode == "batch_mean":
        kl_constrained = np.maximum(kl_mean, floor).sum()
    else:
        kl_constrained = np.maximum(kl, floor).sum(axis=1).mean()
    sigma2 = np.exp(logvar).mean(axis=0)
    capacity = 0.5 * np.log(1 + mu_var / sigma2)
    # the aggregate posterior's Gaussian against N(0, I), by the textbook formula in float64
    cov = np.cov(mu, rowvar=False) + np.diag(sigma2)
    prior_kl = 0.5 * (np.trace(cov) + mu.mean(0) @ mu.mean(0) - Z_DIM - np.log(np.linalg.det(cov)))
    marginal = mu_var + sigma2
    prior_kl_dims = 0.5 * (marginal + mu.mean(0) ** 2 - 1 - np.log(marginal))
    return {
        "au": float((mu_var > 0.01).sum()),
        "au_fraction": float((mu_var > 0.01).mean()),
        "kl_raw": kl_mean.sum(),
        "kl_per_dim": kl_mean,
        "kl_per_dim_max": kl_mean.max(),
        "kl_constrained": kl_constrained,
        "logvar_mean": logvar.mean(),
        "z_std": np.sqrt(z.var(axis=0, ddof=1).mean()),
        "mu_var_per_dim": mu_var,
        "mu_var_mean": mu_var.mean(),
        "channel_nats": capacity.sum(),
        "channel_nats_per_dim": capacity,
        "prior_kl": prior_kl,
        "prior_kl_dim_max": prior_kl_dims.max(),
        "recon_mu": ((s["x_hat_mu"] - x) ** 2).mean(),
        "recon_zero": ((s["x_hat_zero"] - x) ** 2).mean(),
        "recon_mu_vs_z": ((s["x_hat_mu"] - s["x_hat_z"]) ** 2).mean(),
        "z_sensitivity": shift / spread,
        "mi": numpy_mi(mu[order], logvar[order], torch_noise(mu.shape, seed)),
        "mi_pairs": float(n),
        "mu_max_offdiag_corr": np.abs(corr[~np.eye(Z_DIM, dtype=bool)]).max(),
    }


# ---------------------------------------------------------------------------- active units


@pytest.mark.parametrize("k", [0, 3, 8])
def test_active_units_counts_the_informative_dims(k):
    rng = np.random.default_rng(k)
    scales = np.r_[np.ones(k), np.full(8 - k, 1e-3)]
    mu = torch.from_numpy(rng.normal(size=(500, 8)) * scales)
    assert active_units(mu) == k


def test_active_units_threshold_is_strict():
    var = torch.tensor([0.0099, 0.01, 0.0101, 5.0], dtype=torch.float64)
    assert active_units_from_variance(var, 0.01) == 2
    assert active_units_from_variance(var, 5.0) == 0


def test_active_units_uses_the_unbiased_variance():
    # Column [0, 0.2]: unbiased variance 0.02, population variance 0.01.
    mu = torch.tensor([[0.0], [0.2]], dtype=torch.float64)
    assert active_units(mu, eps=0.015) == 1
    assert active_units(mu, eps=0.025) == 0


def test_active_units_of_one_sample_is_zero():
    assert active_units(torch.full((1, 4), 3.0)) == 0


def test_active_units_rejects_a_vector():
    with pytest.raises(ValueError, match=r"mu_all must be \[N, D\]"):
        active_units(torch.zeros(5))


# ---------------------------------------------------------------------------- mutual information


def test_mi_of_identical_posteriors_is_zero():
    n, d, seed = 2048, 4, 3
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).expand(n, d)
    logvar = torch.tensor([0.0, -1.0, 0.3, -2.0], dtype=torch.float64).expand(n, d)
    mi = mutual_information(mu, logvar, torch.Generator().manual_seed(seed))
    # Every q(z|x_j) is the same density, so log q(z_i) = log q(z_i|x_i) and only the
    # entropy's Monte Carlo error remains: 0.5 * mean ||eps||^2 - 0.5 * D.
    eps = torch_noise((n, d), seed)
    assert mi == pytest.approx(0.5 * (eps**2).sum(axis=1).mean() - 0.5 * d, abs=1e-9)
    assert abs(mi) < 0.05


def test_mi_of_separated_posteriors_reaches_the_log_n_cap():
    n, d, seed = 256, 4, 5
    rng = np.random.default_rng(0)
    mu = torch.from_numpy(rng.normal(scale=100.0, size=(n, d)))
    logvar = torch.full((n, d), -10.0, dtype=torch.float64)
    mi = mutual_information(mu, logvar, torch.Generator().manual_seed(seed))
    # q(z_i|x_j) vanishes for j != i, so log q(z_i) = log q(z_i|x_i) - log N exactly.
    eps = torch_noise((n, d), seed)
    assert mi == pytest.approx(math.log(n) + 0.5 * (eps**2).sum(axis=1).mean() - 0.5 * d, abs=1e-6)
    assert abs(mi - math.log(n)) < 0.2


@pytest.mark.parametrize("chunk_elements", [None, 30])
def test_mi_matches_numpy_with_the_same_noise(monkeypatch, chunk_elements):
    if chunk_elements is not None:  # one row of the [N, N] block at a time
        monkeypatch.setattr(diagnostics, "_MI_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(40, 3)) * np.array([1.5, 0.3, 0.01])
    logvar = rng.uniform(-2.0, 0.5, size=(40, 3))
    mi = mutual_information(torch.from_numpy(mu), torch.from_numpy(logvar), torch.Generator().manual_seed(9))
    assert mi == pytest.approx(numpy_mi(mu, logvar, torch_noise(mu.shape, 9)), rel=1e-10, abs=1e-12)


def test_mi_rejects_mismatched_logvar():
    with pytest.raises(ValueError, match="logvar must have the shape of mu"):
        mutual_information(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------------------- correlation


def test_max_offdiag_correlation_of_identity_is_zero():
    assert max_offdiag_correlation(torch.eye(5)) == 0.0


def test_max_offdiag_correlation_recovers_a_known_correlation():
    std = np.array([2.0, 3.0, 0.5])
    corr = np.array([[1.0, -0.8, 0.1], [-0.8, 1.0, 0.3], [0.1, 0.3, 1.0]])
    cov = torch.from_numpy(corr * np.outer(std, std))
    assert max_offdiag_correlation(cov) == pytest.approx(0.8, abs=1e-12)
    assert max_offdiag_correlation(7.0 * cov) == pytest.approx(0.8, abs=1e-12)


def test_max_offdiag_correlation_ignores_zero_variance_dims():
    cov = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    assert max_offdiag_correlation(cov) == pytest.approx(0.5)
    assert max_offdiag_correlation(torch.zeros(3, 3)) == 0.0
    assert max_offdiag_correlation(torch.ones(1, 1)) == 0.0


def test_max_offdiag_correlation_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="cov must be a square"):
        max_offdiag_correlation(torch.zeros(2, 3))


# ---------------------------------------------------------------------------- decoder sensitivity


def linear_decoder_data(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Volumes x = x_bar + W mu with centred mu, so decode(mu) = x and decode(0) = x_bar exactly."""
    rng = np.random.default_rng(seed)
    x_bar = rng.normal(size=(1, CHANNELS, EDGE, EDGE, EDGE))
    weights = rng.normal(size=(Z_DIM, CHANNELS * EDGE**3))
    mu = rng.normal(size=(n, Z_DIM))
    mu -= mu.mean(axis=0)

    def decode(codes: np.ndarray) -> np.ndarray:
        return x_bar + (codes @ weights).reshape(-1, CHANNELS, EDGE, EDGE, EDGE)

    logvar = np.full_like(mu, -1.0)
    z = mu + np.exp(0.5 * logvar) * rng.normal(size=mu.shape)
    x = decode(mu)
    return {"x": x, "x_hat_mu": x, "x_hat_z": decode(z), "x_hat_zero": decode(np.zeros_like(mu)),
            "mu": mu, "logvar": logvar, "z": z}


def template_decoder_data(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A decoder that ignores z: decode(mu) = decode(z) = decode(0) = one template."""
    samples = linear_decoder_data(n, seed)
    template = np.broadcast_to(samples["x"].mean(axis=0), samples["x"].shape).copy()
    return {**samples, "x_hat_mu": template, "x_hat_z": template, "x_hat_zero": template}


def spread(x: np.ndarray) -> float:
    return float(((x - x.mean(axis=0)) ** 2).sum(axis=VOLUME_AXES).mean())


def test_decoder_sensitivity_of_a_decoder_that_ignores_z_is_zero():
    s = template_decoder_data()
    as_torch = {name: torch.from_numpy(a) for name, a in s.items()}
    assert decoder_sensitivity(as_torch["x_hat_mu"], as_torch["x_hat_zero"], spread(s["x"])) == 0.0
    result = accumulate(split(s, [5, 7]))
    assert result["z_sensitivity"] == pytest.approx(0.0, abs=1e-12)
    assert result["recon_mu"] == pytest.approx(result["recon_zero"], rel=1e-12)
    assert result["recon_mu_vs_z"] == 0.0


def test_decoder_sensitivity_of_an_exact_decoder_is_one():
    s = linear_decoder_data()
    as_torch = {name: torch.from_numpy(a) for name, a in s.items()}
    assert decoder_sensitivity(as_torch["x_hat_mu"], as_torch["x_hat_zero"], spread(s["x"])) == pytest.approx(1.0)
    result = accumulate(split(s, [5, 7]))
    assert result["recon_mu"] == 0.0
    assert result["z_sensitivity"] == pytest.approx(1.0, rel=1e-9)
    assert result["recon_zero"] == pytest.approx(spread(s["x"]) / (CHANNELS * EDGE**3), rel=1e-9)


def test_decoder_sensitivity_of_constant_data_is_zero_and_negative_variance_is_rejected():
    volumes = torch.ones(3, 1, 4, 4, 4)
    assert decoder_sensitivity(volumes, 0 * volumes, 0.0) == 0.0
    with pytest.raises(ValueError, match="data_variance must be >= 0"):
        decoder_sensitivity(volumes, volumes, -1.0)


# ---------------------------------------------------------------------------- SSIM / PSNR


@pytest.mark.parametrize("spatial", [(16, 16, 16), (7, 9, 16)])
def test_ssim_of_identical_volumes_is_one(spatial):
    x = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(0))
    ssim, psnr = ssim_psnr_per_modality(x, x)
    torch.testing.assert_close(ssim, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (psnr == PSNR_CAP_DB).all()  # finite: a sweep must never report inf


def test_psnr_follows_its_formula_and_noise_lowers_ssim():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 16, 16, 16, generator=generator, dtype=torch.float64)
    x[:, 1] *= 4.0  # modalities with different ranges
    noise_std = torch.tensor([0.1, 0.5], dtype=torch.float64).view(1, 2, 1, 1, 1)
    x_hat = x + noise_std * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    ssim, psnr = ssim_psnr_per_modality(x_hat, x)
    np.testing.assert_allclose(psnr.numpy(), numpy_psnr(x_hat.numpy(), x.numpy()), rtol=1e-5)
    assert ((ssim > 0) & (ssim < 0.999)).all()


def test_ssim_psnr_reject_a_constant_target_and_tiny_volumes():
    x = torch.randn(2, 2, 8, 8, 8)
    x[:, 1] = 0.0
    with pytest.raises(ValueError, match="target channel 1 is constant"):
        ssim_psnr_per_modality(x + 0.1, x)
    with pytest.raises(ValueError, match="spatial edge >= 3"):
        ssim_psnr_per_modality(torch.randn(1, 1, 2, 8, 8), torch.randn(1, 1, 2, 8, 8))


# ---------------------------------------------------------------------------- accumulator

SAMPLES = make_samples(16)
BATCH_SIZES = [3, 5, 2, 6]


def assert_results_match(result: dict, expected: dict, rtol: float = 1e-9) -> None:
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, rtol=rtol, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("floor, mode", [(0.0, "batch_mean"), (0.5, "batch_mean"), (0.5, "per_sample")])
def test_accumulator_matches_one_shot_numpy(floor, mode):
    expected = numpy_reference(SAMPLES, floor, mode)
    kl = 0.5 * (SAMPLES["mu"] ** 2 + np.exp(SAMPLES["logvar"]) - SAMPLES["logvar"] - 1)
    assert kl.mean(axis=0).min() < 0.5 < kl.mean(axis=0).max()  # the floor clamps some dims, not all
    assert expected["au"] == 3

    batches = split(SAMPLES, BATCH_SIZES)
    result = accumulate(batches, free_bits_floor=floor, free_bits_mode=mode, quality_volumes=len(SAMPLES["mu"]))
    assert_results_match(result, expected)

    # SSIM and PSNR are per-batch scores averaged with batch-size weights (every volume scored here).
    weights = np.array(BATCH_SIZES) / sum(BATCH_SIZES)
    ssim = sum(w * ssim_psnr_per_modality(b["x_hat_mu"], b["x"])[0].numpy() for w, b in zip(weights, batches))
    psnr = sum(w * numpy_psnr(b["x_hat_mu"].double().numpy(), b["x"].double().numpy())
               for w, b in zip(weights, batches))
    np.testing.assert_allclose(result["ssim"], ssim, rtol=1e-9)
    np.testing.assert_allclose(result["psnr"], psnr, rtol=1e-5)
    assert result["ssim_mean"] == pytest.approx(ssim.mean(), rel=1e-9)
    assert result["psnr_mean"] == pytest.approx(psnr.mean(), rel=1e-5)


def test_image_quality_is_scored_on_the_first_volumes_only():
    batches = split(SAMPLES, BATCH_SIZES)  # 3, 5, ...: the first 4 volumes span two batches
    result = accumulate(batches, quality_volumes=4)
    first, second = batches[0], batches[1]
    ssim = (3 * ssim_psnr_per_modality(first["x_hat_mu"], first["x"])[0]
            + ssim_psnr_per_modality(second["x_hat_mu"][:1], second["x"][:1])[0]) / 4
    np.testing.assert_allclose(result["ssim"], ssim.numpy(), rtol=1e-9)
    full = accumulate(batches, quality_volumes=len(SAMPLES["mu"]))
    assert result["recon_mu"] == full["recon_mu"] and result["ssim"] != full["ssim"]


def test_accumulator_keys_are_plain_finite_floats():
    result = accumulate(split(SAMPLES, BATCH_SIZES))
    lists = {"kl_per_dim", "mu_var_per_dim", "channel_nats_per_dim", "ssim", "psnr"}
    assert set(result) == {
        "au", "au_fraction", "kl_raw", "kl_per_dim", "kl_per_dim_max", "kl_constrained", "logvar_mean",
        "z_std", "mu_var_per_dim", "mu_var_mean", "channel_nats", "channel_nats_per_dim", "prior_kl", "prior_kl_dim_max",
        "recon_mu", "recon_zero", "recon_mu_vs_z",
        "z_sensitivity", "mi", "mi_pairs", "mu_max_offdiag_corr", "ssim", "psnr", "ssim_mean", "psnr_mean",
    }
    for key, value in result.items():
        values = value if key in lists else [value]
        assert all(type(v) is float and math.isfinite(v) for v in values), key


def test_accumulator_does_not_depend_on_batch_order_or_split():
    reference = accumulate(split(SAMPLES, BATCH_SIZES))
    shuffled = np.random.default_rng(4).permutation(16)
    result = accumulate(split(SAMPLES, [1, 4, 4, 4, 3], order=shuffled))
    scores = {"ssim", "psnr", "ssim_mean", "psnr_mean"}  # per-batch scores: these do depend on the split
    assert_results_match(result, {k: v for k, v in reference.items() if k not in scores}, rtol=1e-10)


def test_accumulator_subsamples_the_mi_pool_deterministically():
    batches = split(make_samples(40, seed=2, edge=8), [8] * 5)
    first, again = (accumulate(batches, mi_pool=16, seed=3) for _ in range(2))
    other_seed = accumulate(batches, mi_pool=16, seed=4)
    assert first["mi_pairs"] == 16.0
    assert first["mi"] == again["mi"]
    assert first["mi"] != other_seed["mi"]
    assert first["kl_raw"] == other_seed["kl_raw"]  # only the MI pool depends on the seed


def test_accumulator_with_one_sample_reports_zero_spread():
    result = accumulate(split(SAMPLES, [1], order=np.array([0])))
    assert result["au"] == 0.0 and result["mu_var_mean"] == 0.0 and result["z_std"] == 0.0
    assert result["z_sensitivity"] == 0.0 and result["mu_max_offdiag_corr"] == 0.0
    assert math.isfinite(result["mi"]) and result["mi_pairs"] == 1.0


def test_accumulator_rejects_bad_input_and_misuse():
    batch = split(SAMPLES, [4, 12])[0]
    with pytest.raises(ValueError, match="free_bits_mode must be one of"):
        ValidationAccumulator(Z_DIM, free_bits_mode="per_dim")
    with pytest.raises(ValueError, match="result before any update"):
        ValidationAccumulator(Z_DIM).result()
    acc = ValidationAccumulator(Z_DIM)
    with pytest.raises(ValueError, match=r"logvar must be \[B, z_dim\]"):
        acc.update(**{**batch, "logvar": batch["logvar"][:, :2]})
    with pytest.raises(ValueError, match="x_hat_zero must have the shape of x"):
        acc.update(**{**batch, "x_hat_zero": batch["x_hat_zero"][:1]})
    acc.update(**batch)
    with pytest.raises(ValueError, match="volume shape changed"):
        acc.update(**{name: t[:, :1] if t.ndim == 5 else t for name, t in batch.items()})
    acc.reduce()
    with pytest.raises(RuntimeError, match="reduce called twice"):
        acc.reduce()
    with pytest.raises(RuntimeError, match="update after reduce"):
        acc.update(**batch)


# ---------------------------------------------------------------------------- DDP

DDP_SAMPLES, DDP_EDGE = 20, 8
DDP_BATCHES = [4, 4, 4, 4, 4]  # five batches: ranks get three and two (interleaved, like a DistributedSampler)


def ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = split(make_samples(DDP_SAMPLES, edge=DDP_EDGE), DDP_BATCHES)[rank::world_size]
        results = {
            "full_pool": accumulate(batches, free_bits_floor=0.5, free_bits_mode="per_sample",
                                    quality_volumes=DDP_SAMPLES),
            "small_pool": accumulate(batches, mi_pool=8),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_reduce_across_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single = accumulate(split(make_samples(DDP_SAMPLES, edge=DDP_EDGE), DDP_BATCHES), free_bits_floor=0.5,
                        free_bits_mode="per_sample", quality_volumes=DDP_SAMPLES)
    for result in ranks:
        assert_results_match(result["full_pool"], single, rtol=1e-10)
        assert result["full_pool"]["au"] == single["au"]
        assert result["small_pool"]["mi_pairs"] == 8.0
    # Every rank holds the same merged pool, so the same MI.
    assert ranks[0]["small_pool"] == ranks[1]["small_pool"]


# ---------------------------------------------------------------------------- channel capacity and the prior


def test_channel_capacity_is_zero_when_closed_and_scale_free():
    sigma2 = torch.tensor([1.0, 1.0, 0.0025, 4.0], dtype=torch.float64)
    mu_var = torch.tensor([0.0, 3.0, 0.005, 12.0], dtype=torch.float64)
    capacity = channel_capacity(mu_var, sigma2)
    assert capacity.tolist() == pytest.approx([0.0, 0.5 * math.log(4.0), 0.5 * math.log(3.0), 0.5 * math.log(4.0)])
    # AU's fixed 0.01 misses the third dimension (Var(mu) 0.005) that carries 0.55 nats
    assert active_units_from_variance(mu_var) == 2 and capacity[2] > 0.5
    with pytest.raises(ValueError, match="positive"):
        channel_capacity(mu_var, torch.zeros(4, dtype=torch.float64))


def test_marginal_prior_kl_by_hand():
    kl = diagnostics.marginal_prior_kl(torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 4.0]))
    assert kl.tolist() == pytest.approx([0.0, 2.0, 0.5 * (3 - math.log(4.0))])
    # N < D subjects: the marginals need no invertible covariance, unlike the joint KL
    with pytest.raises(ValueError, match="positive"):
        diagnostics.marginal_prior_kl(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_aggregate_posterior_kl_by_hand():
    assert aggregate_posterior_kl(torch.zeros(3), torch.eye(3)) == pytest.approx(0.0, abs=1e-12)
    # one dim with variance 4, another with mean 2: 0.5 (4 - 1 - log 4) + 0.5 * 2^2
    mean, cov = torch.tensor([0.0, 2.0, 0.0]), torch.diag(torch.tensor([4.0, 1.0, 1.0]))
    assert aggregate_posterior_kl(mean, cov) == pytest.approx(0.5 * (3 - math.log(4.0)) + 2.0)
    # only the first two moments count: sharp posteriors (sigma^2 1e-4) spread with Var(mu) 1 match them
    assert aggregate_posterior_kl(torch.zeros(2), torch.diag(torch.tensor([1.0001, 1.0001]))) < 1e-3
    # ... while Var(mu) 6.9, as an autoencoder's code drifts, does not
    assert aggregate_posterior_kl(torch.zeros(1), torch.tensor([[6.9]])) == pytest.approx(0.5 * (5.9 - math.log(6.9)))
    with pytest.raises(ValueError, match="positive definite"):
        aggregate_posterior_kl(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))

