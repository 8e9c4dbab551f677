"""What a code carries about a factor, measured through its channel: probes cross-validated over subjects.

A probe from the posterior means mu reads what the *encoder* computes, but the decoder sees
z = mu + sigma * eps. A collapsed encoder's mu still moves a little (Var(mu) ~ 1e-4 against
sigma ~ 1); standardising mu scales that up, and a probe on it can rank a collapsed model
first. A probe on samples of q(z|x) is drowned by the same noise the decoder is: it measures
what passes the channel. So both are reported and the one on samples is the headline.

Every probe is a ridge regression on standardised features whose penalty is chosen inside
each training fold (leave-one-out over the fold's rows), scored out of fold: the folds split
*subjects*, and a subject's samples are held out together.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold

from vae.data.subject_factors import LOCATION_FACTORS, SIZE_FACTORS, FactorTable

ALPHAS = np.logspace(-3, 3, 13)  # penalties in units of standardised features
FOLDS = 5
MIN_SUBJECTS = 5  # fewer and a cross-validated R^2 is not computed at all
# Below this many subjects a probe's R^2 spreads by more than 0.075 from one draw of subjects to the
# next (or is biased by more than 0.1): too much to rank trials by (measured by bench/probe_subjects.py).
MIN_VALIDATION_SUBJECTS = 24
SAMPLES = 10  # draws of z per subject for a probe through the channel


def draw_samples(mu: np.ndarray, logvar: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` draws of z = mu + sigma * eps per subject: ``[N, D], [N, D] -> [N, S, D]`` (float64)."""
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    eps = np.random.default_rng(seed).standard_normal((len(mu), samples, mu.shape[1]))
    return mu[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * eps


def probe_r2(features: np.ndarray, target: np.ndarray, folds: int = FOLDS, seed: int = 0) -> tuple[float, np.ndarray]:
    """Out-of-fold R^2 of a ridge probe from ``features`` to ``target`` ``[N]``, and the out-of-fold
    prediction per subject ``[N]`` (the mean over its samples).

    ``features`` is ``[N, F]`` (one row per subject) or ``[N, S, F]`` (S samples per subject).
    R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2 over every held-out row: 0 is no better
    than predicting the mean, negative is worse. NaN for a constant target or fewer than
    :data:`MIN_SUBJECTS` subjects.
    """
    target = np.asarray(target, np.float64)
    features = np.asarray(features, np.float64)
    features = features[:, None, :] if features.ndim == 2 else features  # [N, S, F]
    n, samples, _ = features.shape
    if len(target) != n:
        raise ValueError(f"features hold {n} subjects but target {len(target)}")
    if n < MIN_SUBJECTS or np.ptp(target) == 0:
        return float("nan"), np.full(n, np.nan)
    predictions = np.empty((n, samples))
    for train, test in KFold(min(folds, n), shuffle=True, random_state=seed).split(np.arange(n)):
        x_train = features[train].reshape(-1, features.shape[2])
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        scale = np.where(std > 0, std, 1.0)
        probe = RidgeCV(alphas=ALPHAS).fit((x_train - mean) / scale, np.repeat(target[train], samples))
        predictions[test] = probe.predict(((features[test] - mean) / scale).reshape(-1, features.shape[2])).reshape(
            len(test), samples)
    residual = ((predictions - target[:, None]) ** 2).sum()
    total = samples * ((target - target.mean()) ** 2).sum()
    return float(1.0 - residual / total), predictions.mean(axis=1)


def semantic_r2(r2_by_factor: Mapping[str, float]) -> dict[str, float]:
    """The through-channel probe R^2 of the tumour's location (mean over its centroid's axes), of its
    size, and the mean of the two (``semantic_r2``): NaN where no such factor was scored."""
    def mean_of(names: Sequence[str]) -> float:
        values = [r2_by_factor[n] for n in names if n in r2_by_factor and math.isfinite(r2_by_factor[n])]
        return float(np.mean(values)) if values else math.nan

    location, size = mean_of(LOCATION_FACTORS), mean_of(SIZE_FACTORS)
    both = [v for v in (location, size) if math.isfinite(v)]
    return {"location_r2": location, "size_r2": size, "semantic_r2": float(np.mean(both)) if both else math.nan}


PROBE_KEYS = ("semantic_r2", "location_r2", "size_r2", "probe_subjects")


def probe_key(factor: str) -> str:
    """The epoch metric of one factor's through-channel probe."""
    return f"probe_r2/{factor}"


def channel_probe_metrics(
    mu: np.ndarray, logvar: np.ndarray, factors: FactorTable | None, seed: int = 0
) -> dict[str, Any]:
    """What a validation pass reports of its posteriors ``mu, logvar: [N, D]`` (rows = ``factors``' rows):
    :data:`PROBE_KEYS` and one :func:`probe_key` per factor, all finite.

    Each probe reads :data:`SAMPLES` draws of q(z|x) per subject. ``probe_subjects`` is how many
    subjects the location and size probes rest on (the fewest of theirs). An R^2 that cannot be
    computed (no factors, fewer than :data:`MIN_SUBJECTS` subjects, a constant factor) is
    reported as 0, "no better than the mean", with ``probe_subjects`` saying why.
    """
    if factors is None:
        return dict.fromkeys(PROBE_KEYS, 0.0)
    if len(mu) != len(factors.values):
        raise ValueError(f"{len(mu)} posteriors for {len(factors.values)} rows of factors")
    z = draw_samples(mu, logvar, SAMPLES, seed)
    r2, counts = {}, {}
    for k, name in enumerate(factors.names):
        defined = np.isfinite(factors.values[:, k])
        r2[name], _ = probe_r2(z[defined], factors.values[defined, k], seed=seed)
        counts[name] = int(defined.sum())
    headline = [counts[n] for n in (*LOCATION_FACTORS, *SIZE_FACTORS) if n in counts]
    summary = semantic_r2(r2) | {"probe_subjects": float(min(headline)) if headline else 0.0}
    per_factor = {probe_key(name): value for name, value in r2.items()}
    return {key: value if math.isfinite(value) else 0.0 for key, value in (summary | per_factor).items()}
