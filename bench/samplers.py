"""TPE settings for many trials at a time on the headline sweep's conditional space, on a simulated sweep.

    python -m bench.samplers [--trials 64] [--concurrent 16] [--seeds 20] [--size 32]

Each sampler drives ``dip_sbd``'s real space (the sweep's own define-by-run sampling, its enqueued
audited point first, its two objectives and its prior constraint told through Optuna's ask-and-tell
as the sweep tells them) with ``--concurrent`` trials running at once: a trial is asked for whenever
one finishes, so every suggestion is made while the others are still running, as on a cluster.

The response is simulated, from the project's own account of collapse (docs/metrics.md):

* sigma^2_eff of the trial's configuration (``sweeps.prediction``) against lambda_1 = 4.5 % of D (the
  share measured on the phantom); the sigma-VAE's sigma^2 taken as 0.3. A predicted trial is collapsed
  after 1 epoch; an exempt one (a KL floor) with sigma^2_eff >= the margin x lambda_1 after 20 epochs by the
  collapse rule. Both are told as pruned and break the constraint, as in a sweep;
* otherwise the code opens with log10(margin x lambda_1 / sigma^2_eff) / 4 (saturating four decades below):
  semantic R^2 = 0.9 x that x a quality factor (conv decoder 1, broadcast 0.75; DIP-I 1, DIP-II 0.9;
  FiLM 1, input 0.95; cyclical 1, constant 0.95; lambda_od above 30 and free bits above 0.5 cost a
  little), recon(mu) = 0.35 - 0.25 x the opening, and the aggregate posterior drifts from the prior as
  sigma^2_eff falls: max KL to the prior per dimension = 0.3 x sqrt(1e-3 lambda_1 / sigma^2_eff), so the
  best feasible codes sit just inside the constraint (<= 1 nat), near sigma^2_eff ~ 1e-3 lambda_1 as
  measured in ``bench/science.py`` at 32^3 (the default size here: at 128^3 the space's Gaussian, beta x
  sigma^2 <= 10, does not reach that ratio, so the model would leave it nothing feasible to find);
* observed with noise (R^2 +- 0.05, recon +- 0.01, prior KL x lognormal 0.2); a healthy trial runs 100
  epochs (+- 10 %).

Reported per sampler, over seeds: near-duplicate suggestions (same choices, every number within 2 %
of its range on the sampled scale, of an earlier trial), trials spent on collapse, and the true
semantic R^2 of the trial the sweep would name best (``sweeps.selection.best_index`` over the feasible
completed trials' observed values) against the best of 20 000 random feasible configurations.
"""
from __future__ import annotations

import argparse
import heapq
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from bench.results import machine, publish
from sweeps.prediction import exemption, sigma2_eff
from sweeps.search import open_study, suggest
from sweeps.selection import best_index
from sweeps.spec import Sweep, load_sweep

HERE = Path(__file__).resolve().parent
SECTION = "bench/samplers.py"
SPECTRUM_SHARE = 0.045  # lambda_1 / D on the phantom (bench/stopping.py prints it)
SIGMA_VAE_RECON = 0.3
HEALTHY_EPOCHS, RULE_EPOCHS, PREDICTED_EPOCHS = 100, 20, 1
DUPLICATE_TOLERANCE = 0.02
REFERENCE_SAMPLES = 20_000

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "TPE, Optuna 5 defaults (the sweep's: independent, constant liar)":
        lambda seed: optuna.samplers.TPESampler(seed=seed),
    "TPE without constant liar (Optuna 4's default)":
        lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=False),
    "TPE multivariate + constant liar":
        lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
    "TPE multivariate + group + constant liar":
        lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


@dataclass(frozen=True)
class Response:
    """What a simulated trial reports: its (true) semantic R^2, recon(mu), max prior KL per dimension, and
    whether it collapses (after how many epochs)."""

    semantic: float
    recon: float
    prior_kl: float
    collapsed: bool
    epochs: int


def response(sweep: Sweep, params: Mapping[str, Any]) -> Response:
    """The simulated truth of a configuration (module docstring)."""
    cfg = sweep.experiment_for(params)
    lambda_1 = SPECTRUM_SHARE * cfg.in_channels * cfg.data.size**3
    s2 = sigma2_eff(cfg, {"recon_mu": SIGMA_VAE_RECON})
    ratio, margin = s2 / lambda_1, sweep.spec.early_stop.predict_margin
    if ratio >= margin:
        exempt = exemption(cfg, sweep.spec.early_stop.collapse) is not None
        return Response(0.0, 0.35, 0.0, True, RULE_EPOCHS if exempt else PREDICTED_EPOCHS)
    opening = float(np.clip(math.log10(margin / ratio) / 4.0, 0.0, 1.0))
    dip, objective, model = cfg.objective.dip, cfg.objective, cfg.model
    quality = ((1.0 if model.decoder == "conv" else 0.75) * (1.0 if dip.kind == "i" else 0.9)
               * (1.0 if model.z_injection == "film" else 0.95)
               * (1.0 if objective.kl.schedule == "cyclical" else 0.95)
               * (1.0 - 0.1 * max(0.0, math.log10(dip.lambda_od / 30.0)))
               * (0.9 if objective.free_bits.floor > 0.5 else 1.0))
    prior_kl = 0.3 * math.sqrt(1e-3 / ratio)
    return Response(0.9 * opening * quality, 0.35 - 0.25 * opening, prior_kl, False, HEALTHY_EPOCHS)


def run_sweep(sweep: Sweep, sampler: optuna.samplers.BaseSampler, trials: int, concurrent: int, seed: int,
              constraint_max: float) -> dict[str, Any]:
    """One simulated sweep: ``trials`` asked ``concurrent`` at a time, each told when it finishes."""
    rng = np.random.default_rng(seed)
    storage = optuna.storages.InMemoryStorage()
    open_study(storage, "simulated", sweep)
    study = optuna.load_study(study_name="simulated", storage=storage, sampler=sampler)
    running: list[tuple[float, int, optuna.Trial, Response]] = []
    truth: dict[int, Response] = {}
    clock, asked = 0.0, 0

    def start() -> None:
        nonlocal asked
        trial = study.ask()
        suggest(sweep, trial)
        truth[trial.number] = outcome = response(sweep, trial.params)
        duration = outcome.epochs * rng.uniform(0.9, 1.1)
        heapq.heappush(running, (clock + duration, trial.number, trial, outcome))
        asked += 1

    while asked < min(concurrent, trials):
        start()
    while running:
        clock, _, trial, outcome = heapq.heappop(running)
        if outcome.collapsed:
            trial.set_constraint("prior_kl_dim_max", math.inf)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            prior_kl = outcome.prior_kl * float(np.exp(rng.normal(0.0, 0.2)))
            trial.set_constraint("prior_kl_dim_max", prior_kl - constraint_max)
            study.tell(trial, [outcome.semantic + rng.normal(0.0, 0.05), outcome.recon + rng.normal(0.0, 0.01)])
        if asked < trials:
            start()
    return judge_sweep(sweep, study, truth)


def unit_point(trial: optuna.trial.FrozenTrial) -> tuple[dict[str, Any], dict[str, float]]:
    """A trial's choices, and its numbers mapped to [0, 1] on their sampled (log or linear) scale."""
    choices, numbers = {}, {}
    for name, dist in trial.distributions.items():
        value = trial.params[name]
        if isinstance(dist, CategoricalDistribution):
            choices[name] = value
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            low, high, x = dist.low, dist.high, value
            if dist.log:
                low, high, x = math.log(low), math.log(high), math.log(x)
            numbers[name] = 0.0 if high == low else (x - low) / (high - low)
    return choices, numbers


def near_duplicates(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials whose choices equal, and every number lies within the tolerance of, an earlier trial's."""
    points = [unit_point(t) for t in sorted(trials, key=lambda t: t.number)]
    count = 0
    for i, (choices, numbers) in enumerate(points):
        for other_choices, other_numbers in points[:i]:
            if other_choices == choices and other_numbers.keys() == numbers.keys() and all(
                    abs(numbers[k] - other_numbers[k]) <= DUPLICATE_TOLERANCE for k in numbers):
                count += 1
                break
    return count


def judge_sweep(sweep: Sweep, study: optuna.Study, truth: Mapping[int, Response]) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())]
    best = best_index([t.values for t in feasible], [mode for _, mode in sweep.objectives])
    return {
        "trials": len(trials),
        "unfinished": sum(1 for t in trials if not t.state.is_finished()),
        "near_duplicates": near_duplicates(trials),
        "collapsed": sum(1 for t in trials if t.state == TrialState.PRUNED),
        "feasible": len(feasible),
        "best_semantic": None if best is None else truth[feasible[best].number].semantic,
    }


def reference_best(sweep: Sweep, constraint_max: float, samples: int = REFERENCE_SAMPLES) -> float:
    """The best true semantic R^2 of ``samples`` random configurations within the constraint."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    best = 0.0
    for _ in range(samples):
        trial = study.ask()
        sweep.space.suggest(trial)
        outcome = response(sweep, trial.params)
        if not outcome.collapsed and outcome.prior_kl <= constraint_max:
            best = max(best, outcome.semantic)
        study.tell(trial, 0.0)
    return best


def summarise(runs: Sequence[Mapping[str, Any]], trials: int, reference: float) -> dict[str, Any]:
    best = [r["best_semantic"] for r in runs if r["best_semantic"] is not None]
    return {
        "near_duplicate_share": float(np.mean([r["near_duplicates"] for r in runs])) / trials,
        "collapsed_mean": float(np.mean([r["collapsed"] for r in runs])),
        "best_semantic_mean": float(np.mean(best)) if best else None,
        "best_semantic_sd": float(np.std(best)) if best else None,
        "share_of_reference": float(np.mean(best)) / reference if best else None,
        "sweeps_without_best": len(runs) - len(best),
    }


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "## TPE settings for parallel trials (`bench/samplers.py`)",
        "",
        f"- Date: {result['date']}; machine: {result['machine']}",
        f"- Command: `{result['command']}`",
        f"- Simulated `{result['sweep']}` sweeps at {result['size']}^3 (the response model is in the benchmark's docstring): "
        f"{result['trials']} trials, {result['concurrent']} at a time, {result['seeds']} sampler seeds each; "
        f"best reachable true semantic R² (20 000 random feasible configurations): {result['reference']:.3f}.",
        "",
        "| sampler | near-duplicate suggestions | trials spent on collapse | true semantic R² of the named best "
        "| of the reachable | sweeps without a best |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in result["samplers"].items():
        best = "-" if s["best_semantic_mean"] is None else f"{s['best_semantic_mean']:.3f} ± {s['best_semantic_sd']:.3f}"
        share = "-" if s["share_of_reference"] is None else f"{100 * s['share_of_reference']:.0f} %"
        lines.append(f"| {name} | {100 * s['near_duplicate_share']:.1f} % | {s['collapsed_mean']:.1f} "
                     f"| {best} | {share} | {s['sweeps_without_best']} |")
    lines += ["", result["reading"]]
    return "\n".join(lines)


def reading(samplers: Mapping[str, Mapping[str, Any]]) -> str:
    ranked = sorted(((s["best_semantic_mean"] or 0.0, name) for name, s in samplers.items()), reverse=True)
    duplicates = sorted((s["near_duplicate_share"], name) for name, s in samplers.items())
    return (f"Best found, in order: {'; '.join(f'{name} ({value:.3f})' for value, name in ranked)}. Most "
            f"near-duplicates: {duplicates[-1][1]} ({100 * duplicates[-1][0]:.1f} %). The sweep uses the sampler "
            "its `sampler:` section names (default: Optuna 5's TPE defaults). The simulation decides only how "
            "the samplers compare on this space; its absolute numbers are the model's.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.samplers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="dip_sbd")
    parser.add_argument("--trials", type=int, default=64, help="trials per simulated sweep (the sweep's budget)")
    parser.add_argument("--concurrent", type=int, default=16, help="trials running at once")
    parser.add_argument("--seeds", type=int, default=20, help="sampler seeds per setting")
    parser.add_argument("--size", type=int, default=32, help="data.size the simulated trials are judged at")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sweep = load_sweep(args.sweep, overrides=[("data.size", args.size)])
    constraint_max = next(c.max for c in sweep.spec.constraints if c.metric == "prior_kl_dim_max")
    reference = reference_best(sweep, constraint_max)
    samplers = {}
    for name, make in SAMPLERS.items():
        started = time.perf_counter()
        runs = [run_sweep(sweep, make(seed), args.trials, args.concurrent, seed, constraint_max)
                for seed in range(args.seeds)]
        samplers[name] = summarise(runs, args.trials, reference) | {"runs": runs,
                                                                     "seconds": time.perf_counter() - started}
        print(f"{name}: {samplers[name]['best_semantic_mean']}, {time.perf_counter() - started:.0f} s", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": shlex.join(["python", "-m", "bench.samplers", *sys.argv[1:]]), "sweep": sweep.name,
        "trials": args.trials, "concurrent": args.concurrent, "seeds": args.seeds, "size": args.size,
        "reference": reference,
        "samplers": samplers, "reading": reading(samplers),
    }
    publish(HERE, SECTION, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
