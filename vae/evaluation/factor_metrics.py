"""Scores of a representation against ground-truth factors of variation.

Inputs are posterior means ``mu`` [N, D] (one row per subject) and factor values
``factors`` [N, K] (e.g. from the phantom's factors.csv). Three views:

- linear probe R^2 per factor: how much of each factor a linear read-out of mu recovers;
- MIG (Chen et al. 2018) in the disentanglement_lib form: 20-bin histograms of mu,
  continuous factors cut into equal-frequency bins;
- DCI (Eastwood & Williams 2018) with gradient-boosted regression trees.

Everything here is numpy / scikit-learn; nothing depends on torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Ridge
from sklearn.metrics import mutual_info_score


def _check_inputs(mu: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    factors = np.asarray(factors, dtype=np.float64)
    if mu.ndim != 2 or factors.ndim != 2:
        raise ValueError(f"mu and factors must be 2-D [N, D] and [N, K], got shapes {mu.shape} and {factors.shape}")
    if len(mu) != len(factors):
        raise ValueError(f"mu has {len(mu)} rows but factors has {len(factors)}: one row per subject in both")
    if len(mu) < 4:
        raise ValueError(f"need at least 4 subjects to score a representation, got {len(mu)}")
    if not np.all(np.isfinite(mu)):
        raise ValueError("mu contains NaN or inf")
    bad = np.flatnonzero(~np.all(np.isfinite(factors), axis=0))
    if bad.size:
        raise ValueError(
            f"factor column(s) {bad.tolist()} contain NaN or inf: drop subjects where they are undefined "
            "(e.g. tumour geometry where tumour_present is 0) or drop those factors"
        )
    return mu, factors


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint index sets (train, test) of a set of n items."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(max(int(round(n * test_fraction)), 2), n - 2)
    order = np.random.default_rng(seed).permutation(n)
    return order[n_test:], order[:n_test]


def _r2(target: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column against the column mean; NaN for a constant column. [N, K] -> [K]"""
    residual = ((target - prediction) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / total, np.nan)


def probe_r2(
    mu: np.ndarray, factors: np.ndarray, test_fraction: float = 0.3, seed: int = 0, alpha: float = 1e-3
) -> np.ndarray:
    """Test-split R^2 of a ridge regression from mu [N, D] to each factor [N, K]. -> [K]

    mu is standardised with the training statistics, so ``alpha`` is a penalty in units
    of standardised features (small: close to least squares). Constant factors give NaN.
    """
    mu, factors = _check_inputs(mu, factors)
    train, test = split_indices(len(mu), test_fraction, seed)
    mean, std = mu[train].mean(0), mu[train].std(0)
    scaled = (mu - mean) / np.where(std > 0, std, 1.0)
    probe = Ridge(alpha=alpha).fit(scaled[train], factors[train])
    return _r2(factors[test], probe.predict(scaled[test]).reshape(len(test), -1))


def histogram_discretize(values: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Per column, the index (1..n_bins) of its equal-width histogram bin. [N, C] -> [N, C] int"""
    return np.stack([np.digitize(v, np.histogram(v, n_bins)[1][:-1]) for v in values.T], axis=1)


def discretize_factors(factors: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Integer codes per factor. [N, K] -> [N, K]

    A factor with at most n_bins distinct values keeps them; others get n_bins equal-frequency bins.
    """
    codes = []
    for v in factors.T:
        distinct, code = np.unique(v, return_inverse=True)
        if len(distinct) > n_bins:
            inner_edges = np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1])
            code = np.searchsorted(inner_edges, v, side="right")
        codes.append(code)
    return np.stack(codes, axis=1)


def discrete_entropy(codes: np.ndarray) -> float:
    """Entropy (nats) of the empirical distribution of integer codes [N]."""
    p = np.unique(codes, return_counts=True)[1] / len(codes)
    return float(-(p * np.log(p)).sum())


def mig_per_factor(mu: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Normalised gap between the two latents most informative about each factor. -> [K]

    (I(z_a; v_k) - I(z_b; v_k)) / H(v_k), with a and b the top two latents by mutual
    information; NaN for a factor with zero entropy. With D = 1 the runner-up is 0.
    """
    mu, factors = _check_inputs(mu, factors)
    z_codes = histogram_discretize(mu, n_bins)
    v_codes = discretize_factors(factors, n_bins)
    gaps = np.full(factors.shape[1], np.nan)
    for k, v in enumerate(v_codes.T):
        entropy = discrete_entropy(v)
        if entropy <= 0:
            continue
        information = sorted((mutual_info_score(v, z) for z in z_codes.T), reverse=True) + [0.0]
        gaps[k] = (information[0] - information[1]) / entropy
    return gaps


def mig(mu: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> float:
    """Mutual information gap: mean of mig_per_factor over factors with nonzero entropy (NaN if none)."""
    gaps = mig_per_factor(mu, factors, n_bins)
    defined = gaps[np.isfinite(gaps)]
    return float(defined.mean()) if defined.size else float("nan")


def _normalised_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """Entropy of distributions along ``axis`` in base (their length); 0 for a length-1 axis."""
    n = p.shape[axis]
    if n == 1:
        return np.zeros(p.shape[1 - axis])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis) / np.log(n)


def dci_from_importance(importance: np.ndarray) -> tuple[float, float]:
    """Eastwood & Williams disentanglement and completeness of an importance matrix R [D, K].

    D = sum_i rho_i (1 - H_K(P_i.)), P_ij = R_ij / sum_k R_ik, rho_i = sum_k R_ik / sum R;
    C = sum_j w_j (1 - H_D(P~_.j)), P~_ij = R_ij / sum_i R_ij, w_j = sum_i R_ij / sum R.
    (With one regressor per factor whose importances sum to 1, w_j = 1/K: a plain mean.)
    """
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or np.any(r < 0) or not np.all(np.isfinite(r)):
        raise ValueError(f"importance must be a finite non-negative [D, K] matrix, got shape {r.shape}")
    total = r.sum()
    if total == 0:
        return float("nan"), float("nan")
    code_weight, factor_weight = r.sum(1), r.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_code = np.nan_to_num(r / code_weight[:, None])
        per_factor = np.nan_to_num(r / factor_weight[None, :])
    disentanglement = (code_weight / total) @ (1.0 - _normalised_entropy(per_code, axis=1))
    completeness = (factor_weight / total) @ (1.0 - _normalised_entropy(per_factor, axis=0))
    return float(disentanglement), float(completeness)


def dci(
    mu: np.ndarray, factors: np.ndarray, seed: int = 0, test_fraction: float = 0.3, n_estimators: int = 20
) -> dict[str, float]:
    """DCI with one GradientBoostingRegressor per factor, fitted on a train split.

    Returns disentanglement and completeness (1 is best, from the trees' feature
    importances) and informativeness = the mean over factors of the test NRMSE,
    sqrt(mean((v - v_hat)^2)) / std(v) (0 is perfect, ~1 is no better than the mean).
    Factors constant on the test split are left out of the informativeness.
    """
    mu, factors = _check_inputs(mu, factors)
    train, test = split_indices(len(mu), test_fraction, seed)
    importance = np.zeros((mu.shape[1], factors.shape[1]))
    errors = []
    for k, v in enumerate(factors.T):
        model = GradientBoostingRegressor(n_estimators=n_estimators, max_depth=3, random_state=seed)
        model.fit(mu[train], v[train])
        importance[:, k] = model.feature_importances_
        spread = v[test].std()
        if spread > 0:
            errors.append(np.sqrt(np.mean((model.predict(mu[test]) - v[test]) ** 2)) / spread)
    disentanglement, completeness = dci_from_importance(importance)
    informativeness = float(np.mean(errors)) if errors else float("nan")
    return {"disentanglement": disentanglement, "completeness": completeness, "informativeness": informativeness}


def factor_report(
    mu: np.ndarray, factors: np.ndarray, names: Sequence[str], seed: int = 0, n_bins: int = 20
) -> dict[str, float]:
    """All scores under stable keys: ``probe_r2/<name>``, ``probe_r2/mean``, ``mig/<name>``,
    ``mig/mean``, ``dci/disentanglement``, ``dci/completeness``, ``dci/informativeness``
    (test NRMSE, lower is better) and ``n_samples``. Means skip NaN entries.
    """
    mu, factors = _check_inputs(mu, factors)
    names = list(names)
    if len(names) != factors.shape[1] or len(set(names)) != len(names):
        raise ValueError(f"names must be {factors.shape[1]} distinct factor names (one per column), got {names}")
    r2 = probe_r2(mu, factors, seed=seed)
    gaps = mig_per_factor(mu, factors, n_bins)
    report: dict[str, float] = {"n_samples": float(len(mu))}
    for prefix, values in (("probe_r2", r2), ("mig", gaps)):
        report.update({f"{prefix}/{name}": float(value) for name, value in zip(names, values)})
        defined = values[np.isfinite(values)]
        report[f"{prefix}/mean"] = float(defined.mean()) if defined.size else float("nan")
    report.update({f"dci/{key}": value for key, value in dci(mu, factors, seed=seed).items()})
    return report
