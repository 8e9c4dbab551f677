"""Which trials are best: the Pareto front and *the* best trial of a sweep, on plain numbers.

``best.yaml``, ``summary.json``, the report and the benchmarks all name their best trial
through :func:`best_index`, so they always name the same one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("min", "max")


def check_modes(modes: Sequence[str]) -> None:
    bad = [mode for mode in modes if mode not in MODES]
    if bad:
        raise ValueError(f"objective modes must be 'min' or 'max', got {bad}")


def _costs(points: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """``points`` ``[N, K]`` as costs to minimise (max columns negated)."""
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        points = points.reshape(0, len(modes))
    if points.ndim != 2 or points.shape[1] != len(modes):
        raise ValueError(f"points must be [N, {len(modes)}] (one column per mode), got shape {points.shape}")
    check_modes(modes)
    return points * np.array([1.0 if mode == "min" else -1.0 for mode in modes])


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """Ascending indices of the non-dominated rows of ``points`` ``[N, K]``, column k to ``modes[k]`` ("min"/"max").

    Row j dominates row i when it is no worse in every objective and better in at least one,
    so equal rows never dominate each other and all of them stay on the front. A row with a
    NaN is never on the front and dominates nothing.
    """
    costs = _costs(points, modes)
    valid = np.flatnonzero(np.isfinite(costs).all(axis=1))
    costs = costs[valid]
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=-1)  # [j, i]: j no worse than i
    better = (costs[:, None, :] < costs[None, :, :]).any(axis=-1)
    dominated = (no_worse & better).any(axis=0)
    return valid[~dominated]


def best_index(points: Sequence[Sequence[float]], modes: Sequence[str]) -> int | None:
    """The index of the best row of ``points`` ``[N, K]``: best on the first objective, ties broken by
    the next ones, then by position (the earlier trial); rows with a non-finite value never win.

    The winner is always on the Pareto front: a row that dominated it would be at least as
    good on every objective and better on one, so it would have won the comparison.
    """
    costs = _costs(points, modes)
    finite = [i for i in range(len(costs)) if np.isfinite(costs[i]).all()]
    return min(finite, key=lambda i: (tuple(costs[i]), i)) if finite else None
