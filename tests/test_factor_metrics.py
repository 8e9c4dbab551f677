import math
from collections import Counter

import numpy as np
import pytest

from vae.evaluation import factor_metrics as FM


def uniform_factors(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, k))


def random_rotation(d: int, seed: int = 1) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------
# Linear probe


def test_probe_recovers_factors_from_themselves_and_not_from_noise():
    v = uniform_factors(2000, 4)
    np.testing.assert_allclose(FM.probe_r2(v, v), 1.0, atol=1e-6)
    np.testing.assert_allclose(FM.probe_r2(v @ random_rotation(4), v), 1.0, atol=1e-6)  # linear mixing is linear
    noise = np.random.default_rng(5).normal(size=(2000, 6))
    assert np.all(np.abs(FM.probe_r2(noise, v)) <= 0.1)


def test_probe_r2_matches_the_signal_fraction():
    # v = mu @ w + e: R^2 = var(mu @ w) / (var(mu @ w) + var(e)) = 4 / (4 + 1) for unit-variance mu.
    rng = np.random.default_rng(2)
    mu = rng.normal(size=(20000, 3))
    v = (mu @ np.array([[2.0], [0.0], [0.0]])) + rng.normal(size=(20000, 1))
    assert FM.probe_r2(mu, v)[0] == pytest.approx(0.8, abs=0.02)


def test_probe_gives_nan_for_a_constant_factor():
    v = np.column_stack([uniform_factors(100, 1)[:, 0], np.ones(100)])
    r2 = FM.probe_r2(v, v)
    assert r2[0] == pytest.approx(1.0) and math.isnan(r2[1])


# ---------------------------------------------------------------------------
# MIG


def test_mig_of_identity_is_high_and_of_a_constant_is_zero():
    v = uniform_factors(20000, 4)
    assert FM.mig(v, v) > 0.9
    assert FM.mig(np.zeros((20000, 3)), v) == 0.0
    assert FM.mig(np.random.default_rng(3).normal(size=(20000, 4)), v) < 0.02


def test_mig_of_a_rotated_code_is_low():
    v = uniform_factors(5000, 3)
    assert FM.mig(v @ random_rotation(3), v) < 0.5 * FM.mig(v, v)


def entropy_of(labels) -> float:
    counts = np.array(list(Counter(labels).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a, b) -> float:
    """I(a; b) = H(a) + H(b) - H(a, b) from counts."""
    return entropy_of(a) + entropy_of(b) - entropy_of(list(zip(a, b)))


def test_mig_matches_an_independent_count_based_computation():
    rng = np.random.default_rng(7)
    n, n_bins = 600, 20
    factors = np.column_stack([rng.integers(0, 3, n), rng.integers(0, 5, n)]).astype(float)  # discrete: kept as is
    noise = rng.normal(size=(n, 3))
    mu = np.column_stack([factors[:, 0] + 0.3 * noise[:, 0], noise[:, 1], factors[:, 1] + noise[:, 2]])
    # Equal-width bins over each latent's range, written out by hand.
    z_codes = [np.minimum(((z - z.min()) / (z.max() - z.min()) * n_bins).astype(int), n_bins - 1) for z in mu.T]
    expected = []
    for v in factors.T:
        mi = sorted((mutual_information(v.tolist(), z.tolist()) for z in z_codes), reverse=True)
        expected.append((mi[0] - mi[1]) / entropy_of(v.tolist()))
    np.testing.assert_allclose(FM.mig_per_factor(mu, factors, n_bins), expected, rtol=1e-10)
    assert FM.mig(mu, factors, n_bins) == pytest.approx(np.mean(expected))


def test_continuous_factors_get_equal_frequency_bins():
    v = np.random.default_rng(0).exponential(size=(1000, 1))  # skewed: equal-width bins would be unequal
    codes = FM.discretize_factors(v, 20)[:, 0]
    np.testing.assert_array_equal(np.bincount(codes), np.full(20, 50))
    assert FM.discrete_entropy(codes) == pytest.approx(math.log(20))


def test_mig_skips_factors_without_entropy():
    v = np.column_stack([uniform_factors(2000, 1)[:, 0], np.full(2000, 3.0)])
    gaps = FM.mig_per_factor(v, v)
    assert math.isnan(gaps[1]) and FM.mig(v, v) == pytest.approx(gaps[0])


# ---------------------------------------------------------------------------
# DCI


@pytest.mark.parametrize(
    "importance, expected",
    [
        (np.eye(3), (1.0, 1.0)),
        (np.ones((4, 4)), (0.0, 0.0)),
        # Code 0 serves only factor 0 (D_0 = 1); code 1 splits evenly (D_1 = 0); rho = (1/3, 2/3).
        # Factor 0 is split over two codes (C_0 = 0); factor 1 uses one (C_1 = 1); weights (2/3, 1/3).
        (np.array([[1.0, 0.0], [1.0, 1.0]]), (1 / 3, 1 / 3)),
        # A code with no importance does not count; the others are perfect.
        (np.array([[0.5, 0.0], [0.0, 0.0], [0.0, 0.5]]), (1.0, 1.0)),
    ],
)
def test_dci_from_importance_analytic(importance, expected):
    np.testing.assert_allclose(FM.dci_from_importance(importance), expected, atol=1e-12)


def test_dci_from_importance_follows_the_entropy_formula():
    r = np.random.default_rng(4).uniform(size=(5, 3))
    p_code = r / r.sum(1, keepdims=True)
    d = sum(r[i].sum() / r.sum() * (1 + sum(p * math.log(p, 3) for p in p_code[i])) for i in range(5))
    p_factor = r / r.sum(0, keepdims=True)
    c = sum(r[:, j].sum() / r.sum() * (1 + sum(p * math.log(p, 5) for p in p_factor[:, j])) for j in range(3))
    np.testing.assert_allclose(FM.dci_from_importance(r), (d, c), rtol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        FM.dci_from_importance(-r)


def test_dci_ranks_identity_above_mixing_and_noise():
    v = uniform_factors(1500, 4)
    identity = FM.dci(v, v)
    mixed = FM.dci(v @ random_rotation(4), v)
    noise = FM.dci(np.random.default_rng(9).normal(size=(1500, 4)), v)
    assert identity["disentanglement"] > 0.95 and identity["completeness"] > 0.95
    assert identity["informativeness"] < 0.2  # test NRMSE
    assert mixed["disentanglement"] < identity["disentanglement"] - 0.25
    assert mixed["completeness"] < identity["completeness"] - 0.25
    assert noise["informativeness"] > 0.95


# ---------------------------------------------------------------------------
# Report and input checks


def test_factor_report_has_stable_keys():
    v = uniform_factors(400, 2)
    report = FM.factor_report(v, v, ["radius", "centre_x"])
    assert set(report) == {
        "n_samples", "probe_r2/radius", "probe_r2/centre_x", "probe_r2/mean", "mig/radius", "mig/centre_x",
        "mig/mean", "dci/disentanglement", "dci/completeness", "dci/informativeness",
    }  # fmt: skip
    assert report["n_samples"] == 400 and report["probe_r2/mean"] == pytest.approx(1.0)
    assert report["mig/mean"] == pytest.approx((report["mig/radius"] + report["mig/centre_x"]) / 2)


@pytest.mark.parametrize(
    "mu, factors, names, message",
    [
        (np.zeros((10, 2)), np.zeros((9, 1)), ["a"], "one row per subject"),
        (np.zeros(10), np.zeros((10, 1)), ["a"], "2-D"),
        (np.zeros((10, 2)), np.full((10, 1), np.nan), ["a"], "tumour_present"),
        (np.zeros((10, 2)), np.zeros((10, 2)), ["a"], "names"),
    ],
)
def test_bad_inputs_are_named(mu, factors, names, message):
    with pytest.raises(ValueError, match=message):
        FM.factor_report(mu, factors, names)
