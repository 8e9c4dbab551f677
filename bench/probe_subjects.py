"""How many validation subjects a per-epoch statistic needs before it means anything.

    python -m bench.probe_subjects [--repeats 200]

For N validation subjects it measures, over ``--repeats`` independent draws:

* the through-channel probe R^2 (``vae.evaluation.probes.probe_r2`` on 10 samples of q(z|x)
  per subject, 5 folds over subjects) of a code that carries nothing about the factor
  (z ~ N(0, I), z_dim 16): its mean and 95th percentile are how high chance alone scores;
* the same probe on a code that carries the factor with a true through-channel R^2 of 0.8
  (one dimension mu = 2 f, sigma 1): the spread (sd) of the estimate;
* AU: the probability that a unit with Var(mu) = 2 x the 0.01 threshold is counted inactive
  (the sample variance over N subjects is Var * chi^2_{N-1} / (N-1)), analytic;
* MI: the estimate over N subjects cannot exceed log N nats, analytic.

The threshold the training start-up warns under (``vae.evaluation.probes.MIN_VALIDATION_SUBJECTS``)
is the smallest N from which on chance stays below 0.1 at its 95th percentile, the estimate is
biased by less than 0.1 and spreads by less than ``MAX_SD`` = 0.075: two trials 0.15 apart in R^2
are then told apart at two standard deviations, which is what ranking trials by R^2 needs.
"""
from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

import numpy as np
from scipy.stats import chi2

from bench.results import machine, publish
from vae.evaluation.probes import MIN_VALIDATION_SUBJECTS, draw_samples, probe_r2

SUBJECTS = (6, 8, 12, 16, 24, 32, 48, 64, 96)
Z_DIM, SAMPLES, TRUE_R2 = 16, 10, 0.8
AU_EPS = 0.01
MAX_SD, MAX_BIAS, MAX_CHANCE = 0.075, 0.1, 0.1


def probe_scores(n: int, signal: float, rng: np.random.Generator, repeats: int) -> np.ndarray:
    """R^2 of ``repeats`` probes on N subjects whose first latent dimension's mean is ``signal`` x factor."""
    scores = np.empty(repeats)
    for r in range(repeats):
        factor = rng.standard_normal(n)
        mu = np.zeros((n, Z_DIM))
        mu[:, 0] = signal * factor
        z = draw_samples(mu, np.zeros_like(mu), SAMPLES, seed=int(rng.integers(2**31)))
        scores[r], _ = probe_r2(z, factor, seed=r)
    return scores


def measure(repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    signal = math.sqrt(TRUE_R2 / (1 - TRUE_R2))  # R^2 = s^2 / (s^2 + 1) through unit noise
    rows = []
    for n in SUBJECTS:
        null, carried = probe_scores(n, 0.0, rng, repeats), probe_scores(n, signal, rng, repeats)
        rows.append({
            "subjects": n,
            "null_mean": float(null.mean()), "null_p95": float(np.percentile(null, 95)),
            "carried_mean": float(carried.mean()), "carried_sd": float(carried.std(ddof=1)),
            "au_miss_probability": float(chi2.cdf((n - 1) * AU_EPS / (2 * AU_EPS), n - 1)),
            "mi_ceiling_nats": math.log(n),
        })
    return rows


def meaningful(row: dict) -> bool:
    return (row["null_p95"] < MAX_CHANCE and abs(row["carried_mean"] - TRUE_R2) < MAX_BIAS
            and row["carried_sd"] < MAX_SD)


def threshold(rows: list[dict]) -> int | None:
    """The smallest N from which on every row is :func:`meaningful`."""
    for k, row in enumerate(rows):
        if all(meaningful(r) for r in rows[k:]):
            return row["subjects"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rows = measure(args.repeats)
    needed = threshold(rows)
    lines = [
        "## Validation subjects a per-epoch statistic needs (`bench/probe_subjects.py`)", "",
        f"Machine: {machine()}. Date: {datetime.date.today()}. Command: `python -m bench.probe_subjects "
        f"--repeats {args.repeats}`.", "",
        f"Through-channel ridge probe (z_dim {Z_DIM}, {SAMPLES} samples of q(z|x) per subject, 5 folds over "
        f"subjects), {args.repeats} draws per row. *Chance*: a code carrying nothing. *Carried*: a code with true "
        f"R² {TRUE_R2}. AU miss: probability that a unit with Var(μ) = 2 × 0.01 reads inactive. MI ceiling: log N.",
        "", "| subjects | chance R² mean | chance R² 95th pct | carried R² mean | carried R² sd | AU miss | MI ceiling (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['subjects']} | {r['null_mean']:.3f} | {r['null_p95']:.3f} | {r['carried_mean']:.3f} | "
                     f"{r['carried_sd']:.3f} | {r['au_miss_probability']:.3f} | {r['mi_ceiling_nats']:.2f} |")
    lines += ["", f"Smallest N from which on chance stays < {MAX_CHANCE} (95th pct), the bias < {MAX_BIAS} and the "
                  f"sd < {MAX_SD} (trials 0.15 apart told apart at 2 sd): **{needed}**; the training start-up "
                  f"warns below {MIN_VALIDATION_SUBJECTS} validation subjects."]
    publish(Path(__file__).parent, "bench/probe_subjects.py",
            {"machine": machine(), "date": str(datetime.date.today()), "repeats": args.repeats, "rows": rows,
             "threshold": needed}, "\n".join(lines))


if __name__ == "__main__":
    main()
