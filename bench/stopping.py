"""Early-termination policies replayed on the whole curves of sweeps run without early termination.

    python -m bench.stopping [--seeds 9 10 11 12 13 14] [--num-samples 12] [--max-epochs N]
                             [--full] [--address ADDRESS] [--results DIR]
    python -m bench.stopping --replay-only RUN_DIR [RUN_DIR ...] [--live LIVE_DIR] [--write]
    python -m bench.stopping --replay-json [bench/stopping.json]

The full run (1) records one seeded sweep per sampler seed with ``--early-stop none``, so every
trial's whole curve lands in its ``epochs.csv``: ``dip_sbd --smoke`` (16^3 phantom, tiny model)
with the Gaussian's sigma^2 searched up to 1e5 and the likelihood between mean-reduced MSE and
the Gaussian, so that collapse is reached through either likelihood (the sigma-VAE's sigma^2_eff,
beta x recon, stays far below lambda_1 on this phantom: its trials never collapse there), on the
sweep's own budget (100 epochs for dip_sbd) with its collapse rule's patience and grace for that
budget and the smoke's thresholds for the tiny model (``--full``: the sweep's own data, model,
rule and resources, for a GPU cluster);
(2) replays each policy on those curves -- the collapse rule at several settings, the collapse
predicted from the data's spectrum (``sweeps.prediction``), both (the sweep's default), ASHA,
median stopping, and two oracles; (3) runs the first seed again with the sweep's default early
stop and sets its real epochs and statuses beside the replay's; (4) writes
``bench/stopping.json`` and its section of ``bench/RESULTS.md``. ``--replay-only`` replays runs
recorded with ``--early-stop none`` (and compares a run with the default early stop, ``--live``)
and prints the tables; with ``--write`` it writes them as the full run does. ``--replay-json``
replays the curves ``stopping.json`` keeps (every column a replay reads) and prints the tables: the
policies, and the rule itself, can be changed and judged again without recording anything.

A trial *ends collapsed* when the sweep's own collapse rule, applied to its whole curve, calls it
collapsed (:func:`sweeps.collapse_rule.trial_outcome`: the status a sweep with that rule would give it
had it run every epoch), or when the rule confirmed its collapse and it did not revive for as many
full-strength epochs by the end (:func:`ending_status`); it is *healthy* when it ends completed. A *false kill*
stops a healthy trial; its rate's 95 % upper bound is Clopper-Pearson's (one-sided) over the healthy
trials. The *best* trial of each recorded sweep is the project's (``sweeps.selection.best_index``):
among the healthy trials a policy lets finish, the one best on the first objective, ties broken
by the next, on the final values Optuna is told. Each seed is its own sweep: a policy keeps
"the same best" when it does so in every one.

The live run tries the same configurations as its recording for TPE's first 10 trials (drawn at
random from the seed, ``n_startup_trials``); after them TPE learns from outcomes, which the policy
changes, so only trials with the same parameters are compared.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from bench.results import RESULTS, machine, publish
from sweeps.collapse_rule import (
    CollapseRule, ScheduleTargets, at_full_strength, collapse_history, collapse_streak, is_collapsed, numeric_rows,
    trial_outcome,
)
from sweeps.outputs import EPOCHS_CSV, RECORD_JSON, STUDY_DB, SUMMARY_JSON, latest_trials, trial_status
from sweeps.prediction import exemption, sigma2_eff
from sweeps.search import PREDICTION_KEYS
from sweeps.selection import best_index, pareto_front
from sweeps.space import RUN_NAME, Scalar
from sweeps.spec import Constraint, Sweep, load_sweep, sweep_path
from vae.config import ConfigError
from vae.data.spectrum import Spectrum

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
JSON_PATH = HERE / "stopping.json"
SECTION = "bench/stopping.py"
LIVE_PREFIX = "live-"
# (patience, grace_epochs) of the collapse rules replayed besides the sweep's own.
RULE_VARIANTS = ((1, 0), (2, 0), (3, 0), (1, 2), (2, 2))
# Ray's ASHAScheduler defaults, what a user gets without choosing (max_t is set to the run's epochs).
RAY_ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 4}
# Optuna's MedianPruner defaults.
MEDIAN_DEFAULTS = {"n_startup_trials": 5, "n_warmup_steps": 0}
VALIDATION_LOSS = "val/loss"
LIKELIHOOD = "objective.likelihood"
CURVE_METRICS = ("au", "kl_raw", "recon_mu")  # compared between the recorded and the live curves
# Each trial's epochs as kept in stopping.json (the semantic probe when the data have factors).
RECORDED_KEYS = ("epoch", "au", "kl_raw", "recon_mu", VALIDATION_LOSS, "kl_weight", "dip_weight", "capacity",
                 "z_sensitivity", "channel_nats", "semantic_r2")
LAST_KEYS = ("epoch", "status", "diverged_term")  # of a trial's last epochs.csv row, as a replay reads them
TARGET_SHARE = 0.25  # the default policy's target: at most this share of none's epochs on collapsed trials
MOONSHOT_SHARE = 0.10
# The recording's search space: dip_sbd's, with collapse reachable through the Gaussian too.
RECORDING_SPACE = {LIKELIHOOD: {"choices": ["mse_mean", "gaussian"]}}
RECORDING_SIGMA2_HIGH = 1.0e5
# Its collapse rule: the smoke thresholds (for the tiny model) with the patience and grace the sweep
# gives its full budget (the smoke's, for 4-epoch trials, kill codes that open after a few epochs).
RULE_TIMING = ("patience", "grace_epochs")
# Checkpoints and panels less often than the smoke's every epoch: they change no curve, and cost time.
RECORDING_OVERRIDES = {"train.checkpoint_every": 10, "train.image_every": 25}

Stops = dict[str, int]  # trial_id -> the epoch after which a policy stops it (absent: it runs every epoch)


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One trial's recorded history: its parameters, schedule targets and one numeric row per epoch."""

    trial_id: str  # <run>/trial-NNNN when several runs are replayed together
    number: int  # Optuna's trial number: the order trials started in
    params: Mapping[str, Scalar]
    targets: ScheduleTargets
    rows: tuple[Mapping[str, float], ...]
    last: Mapping[str, str]  # the last epochs.csv row as written (its status, epoch, diverged term)
    status: str  # the status the sweep recorded
    run: str = ""  # the recorded sweep run (one per sampler seed) it belongs to

    @property
    def epochs(self) -> int:
        return int(self.rows[-1]["epoch"])

    def final(self, metric: str) -> float:
        return self.rows[-1][metric]

    def at(self, epoch: int) -> Mapping[str, float] | None:
        return next((row for row in self.rows if int(row["epoch"]) == epoch), None)


def metric_keys(sweep: Sweep) -> tuple[str, ...]:
    """The numeric columns a replay reads: the collapse rule's and the prediction's, the recorded ones,
    the objectives, the constraints' and ASHA's."""
    return tuple(dict.fromkeys([*PREDICTION_KEYS, *RECORDED_KEYS, *CURVE_METRICS, *(m for m, _ in sweep.objectives),
                                *(c.metric for c in sweep.spec.constraints), sweep.asha_objective[0]]))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load_run(run_dir: Path) -> tuple[Sweep, list[Curve], dict[str, Any]]:
    """The sweep, the curves (in start order, ids ``<run>/trial-NNNN``) and how the sweep run in
    ``run_dir`` came about (its folder, its command as recorded in ``sweep.json``, its seed, its wall time)."""
    import optuna

    for name in (RECORD_JSON, EPOCHS_CSV, STUDY_DB, SUMMARY_JSON):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: no {name}; give the folder of a finished sweep run (results/<sweep>/<run>)")
    record = json.loads((run_dir / RECORD_JSON).read_text())
    sweep = Sweep.from_record(record)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=record["study"], storage=f"sqlite:///{run_dir / STUDY_DB}")
    histories: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in read_csv(run_dir / EPOCHS_CSV):
        histories[row["trial_id"]].append(row)
    keys = metric_keys(sweep)
    curves = []
    for trial in latest_trials(study):
        trial_id = trial.user_attrs[RUN_NAME]
        rows = sorted(histories.get(trial_id, []), key=lambda r: int(r["epoch"]))
        if not rows:
            raise ConfigError(f"{run_dir / EPOCHS_CSV}: no epochs of {trial_id}; it never ran an epoch")
        targets = ScheduleTargets.of(sweep.experiment_for(trial.params))
        curves.append(Curve(f"{run_dir.name}/{trial_id}", trial.number, trial.params, targets,
                            tuple(numeric_rows(rows, keys)), rows[-1], trial_status(trial), run_dir.name))
    summary = json.loads((run_dir / SUMMARY_JSON).read_text())
    command = record.get("command")
    info = {"run": run_dir.name, "run_dir": str(run_dir), "seed": record.get("seed"),
            "command": display([sys.executable, *command]) if command else None,
            "wall_seconds": summary.get("wall_seconds"), "trials": len(curves)}
    return sweep, curves, info


def check_recording(run_dir: Path, sweep: Sweep, curves: Sequence[Curve]) -> None:
    """A replay needs every curve whole: a run without early termination whose trials all ran to their end."""
    mode = sweep.spec.early_stop.mode
    if mode != "none":
        raise ConfigError(f"{run_dir}: the sweep ran with early stop '{mode}'; "
                          "replay a run made with --early-stop none")
    for curve in curves:
        if curve.status not in ("completed", "diverged"):
            raise ConfigError(f"{run_dir}: {curve.trial_id} ended {curve.status}, so its curve is not whole; "
                              "replay a run whose trials all ran to their end")


def spectrum_of(sweep: Sweep) -> Spectrum | None:
    """The data spectrum the sweep recorded, else that of its prepared data (computed once, kept with the cache)."""
    if sweep.spectrum is not None:
        return sweep.spectrum
    from vae.data.sources import prepared_cache, training_spectrum

    return training_spectrum(sweep.experiment.data, prepared_cache(sweep.experiment.data))


def predictor(sweep: Sweep, spectrum: Spectrum | None) -> Sweep:
    """``sweep`` as it predicts collapse by default (``early_stop.predict: stop``), with ``spectrum``."""
    early = sweep.spec.early_stop.model_copy(update={"predict": "stop"})
    return replace(sweep, spec=sweep.spec.model_copy(update={"early_stop": early}), spectrum=spectrum)


def predicted_trials(sweep: Sweep, curves: Sequence[Curve]) -> set[str]:
    """The trials whose collapse the sweep (with its spectrum, :func:`predictor`) predicts after their first epoch."""
    return {c.trial_id for c in curves if sweep.predicted_collapse(c.params, first_epoch=c.rows[0]) is not None}


# --------------------------------------------------------------------------- how each trial ends


def ending_status(curve: Curve, rule: CollapseRule) -> str:
    """How the trial ends had it run every epoch (completed, collapsed, diverged): the status a sweep with
    ``rule`` gives it, except that a collapse the rule confirmed (``patience`` collapsed full-strength
    epochs) is undone only by as many healthy full-strength epochs in a row at the end -- a last epoch
    that crosses a threshold by noise does not make a trial healthy."""
    streak, ends_collapsed = collapse_history(curve.rows, rule, curve.targets)
    status = trial_outcome(curve.last, False, streak, rule, stopped_by_asha=False, ends_collapsed=ends_collapsed).status
    if status == "completed" and collapse_stop(curve, rule) is not None and revival(curve, rule) < rule.patience:
        return "collapsed"
    return status


def revival(curve: Curve, rule: CollapseRule) -> int:
    """Healthy full-strength epochs in a row at the end of the curve (epochs below full strength are skipped)."""
    count = 0
    for row in reversed(curve.rows):
        if not at_full_strength(row, curve.targets):
            continue
        if is_collapsed(row, rule):
            break
        count += 1
    return count


# --------------------------------------------------------------------------- policies


def collapse_stop(curve: Curve, rule: CollapseRule) -> int | None:
    """The epoch after which the sweep's stopper ends ``curve`` (its streak reaches the patience), or None.

    The stopper recomputes the streak from the trial's history after every epoch; so does this.
    """
    for end in range(1, len(curve.rows) + 1):
        if collapse_streak(curve.rows[:end], rule, curve.targets) >= rule.patience:
            return int(curve.rows[end - 1]["epoch"])
    return None


def collapse_stops(curves: Sequence[Curve], rule: CollapseRule) -> Stops:
    return {c.trial_id: stop for c in curves if (stop := collapse_stop(c, rule)) is not None}


def waiting_for_every_schedule(sweep: Sweep, curve: Curve) -> Curve:
    """``curve`` as a collapse rule sees it that waits for every schedule, the KL weight's rise and any DIP
    weight (DIP-II's too), before its grace: each epoch short of that is marked an unsettled DIP-I ramp."""
    dip = sweep.experiment_for(curve.params).objective.dip.kind != "none"
    every = replace(curve.targets, dip_i=dip)
    rows = tuple({**row, "dip_weight": float(at_full_strength(row, every))} for row in curve.rows)
    return replace(curve, rows=rows, targets=replace(curve.targets, dip_i=True))


def predicted_then_waiting_rule(sweep: Sweep, rule: CollapseRule, predicted: set[str],
                                curves: Sequence[Curve]) -> Stops:
    """The sweep's default with a collapse rule that waits for every schedule (:func:`waiting_for_every_schedule`)."""
    return predicted_then_rule(rule, predicted, [waiting_for_every_schedule(sweep, c) for c in curves])


def collapse_floor(curve: Curve, rule: CollapseRule) -> int | None:
    """The earliest epoch ``rule`` could stop ``curve`` were it collapsed in every epoch: the first epoch
    its opening schedules are settled, plus the grace, plus ``patience`` epochs at full strength."""
    collapsed = tuple({**row, "au": rule.au_min or 0.0, "kl_raw": rule.kl_min} for row in curve.rows)
    return collapse_stop(replace(curve, rows=collapsed), rule)


def asha_rungs(grace_period: float, max_t: float, reduction_factor: float) -> list[float]:
    """The milestones of Ray's one ASHA bracket, highest first (``_Bracket.__init__`` with s = 0)."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)  # Ray's expression, float for float
    return [grace_period * reduction_factor**k for k in reversed(range(count))]


def asha_stops(
    curves: Sequence[Curve],
    metric: str,
    mode: str,
    grace_period: float,
    reduction_factor: float,
    max_t: float,
    stopped_first: Stops | None = None,
) -> Stops:
    """Ray's ``AsyncHyperBandScheduler`` (one bracket) replayed on the curves, trials in start order.

    At each result, the highest milestone the trial has reached but not yet recorded compares
    its reward (the metric, negated for "min") with the ``1 - 1/reduction_factor`` quantile
    (numpy's linear interpolation, NaN left out) of the rewards recorded there so far; below
    it, the trial stops. The reward is recorded either way, so the cutoffs depend on the
    order results arrive in: here each trial's whole curve, one trial after another. The
    result at ``max_t`` stops the trial without a decision; Ray's ``on_trial_complete`` then
    records it at a milestone it has not recorded. ``stopped_first`` holds the stops of a
    stopper, which Tune asks before the scheduler: the stopped result is only recorded.
    A decision at a trial's own last epoch (a diverged trial) changes nothing and is no stop.
    """
    rungs = asha_rungs(grace_period, max_t, reduction_factor)
    recorded: dict[float, list[float]] = {rung: [] for rung in rungs}
    sign = 1.0 if mode == "max" else -1.0
    quantile = (1 - 1 / reduction_factor) * 100
    stopped_first = stopped_first or {}
    stops: Stops = {}
    for curve in sorted(curves, key=lambda c: c.number):
        reached: set[float] = set()
        for row in curve.rows:
            epoch, reward = row["epoch"], sign * row[metric]
            rung = next((r for r in rungs if epoch >= r and r not in reached), None)
            ended = epoch >= max_t or epoch >= stopped_first.get(curve.trial_id, math.inf)
            if rung is not None:
                seen = [value for value in recorded[rung] if not math.isnan(value)]
                # NaN < cutoff is False in Ray too: a NaN reward never stops a trial.
                stop = not ended and bool(seen) and reward < np.percentile(seen, quantile)
                recorded[rung].append(reward)
                reached.add(rung)
                if stop and epoch < curve.epochs:
                    stops[curve.trial_id] = int(epoch)
                    break
            if ended:
                break
    return stops


def median_stops(
    curves: Sequence[Curve], metric: str, mode: str, n_startup_trials: int = 5, n_warmup_steps: int = 0
) -> Stops:
    """Optuna's ``MedianPruner`` replayed on the curves, trials in start order (every epoch a step).

    After ``n_warmup_steps``, and once ``n_startup_trials`` trials have completed, a trial stops
    at the first step where its best value so far is worse than the median of the completed
    trials' values at that step. Completed trials are those that ran to their end (not
    stopped, not diverged) before it started; a best value that is NaN stops it.
    """
    completed: list[Curve] = []
    stops: Stops = {}
    for curve in sorted(curves, key=lambda c: c.number):
        stop = median_stop(curve, completed, metric, mode, n_startup_trials, n_warmup_steps)
        if stop is not None:
            stops[curve.trial_id] = stop
        elif curve.last.get("status") == "completed":
            completed.append(curve)
    return stops


def median_stop(
    curve: Curve, completed: Sequence[Curve], metric: str, mode: str, n_startup_trials: int, n_warmup_steps: int
) -> int | None:
    """The step at which :func:`median_stops` stops ``curve``, given the ``completed`` trials, or None."""
    if not completed or len(completed) < n_startup_trials:
        return None
    so_far: list[float] = []
    for row in curve.rows:
        step = int(row["epoch"])
        so_far.append(row[metric])
        if step < n_warmup_steps:
            continue
        finite = [v for v in so_far if not math.isnan(v)]
        if not finite:
            return step
        best = max(finite) if mode == "max" else min(finite)
        others = [r[metric] for c in completed if (r := c.at(step)) is not None and not math.isnan(r[metric])]
        if not others:
            continue
        median = float(np.percentile(others, 50))
        if (best < median) if mode == "max" else (best > median):
            return step
    return None


def predicted_stops(curves: Sequence[Curve], predicted: set[str]) -> Stops:
    """The prediction alone: each predicted trial stops after its first epoch."""
    return {c.trial_id: int(c.rows[0]["epoch"]) for c in curves if c.trial_id in predicted}


def predicted_then_rule(rule: CollapseRule, predicted: set[str], curves: Sequence[Curve]) -> Stops:
    """The sweep's default: the prediction after the first epoch, the collapse rule for the rest."""
    return {**collapse_stops(curves, rule), **predicted_stops(curves, predicted)}


def oracle_stops(curves: Sequence[Curve], ends: Mapping[str, str], rule: CollapseRule) -> Stops:
    """Hindsight: each trial that ends collapsed stops at the first epoch from which every epoch meets the
    rule's criterion -- what no rule that must *see* collapse can beat."""
    stops: Stops = {}
    for curve in curves:
        if ends[curve.trial_id] != "collapsed":
            continue
        stays = len(curve.rows)
        while stays > 0 and is_collapsed(curve.rows[stays - 1], rule):
            stays -= 1
        stops[curve.trial_id] = int(curve.rows[min(stays, len(curve.rows) - 1)]["epoch"])
    return stops


def first_epoch_oracle(curves: Sequence[Curve], ends: Mapping[str, str]) -> Stops:
    """Perfect foresight after one epoch: every trial that ends collapsed stops after its first -- the
    floor of a prediction made from the first epoch."""
    return {c.trial_id: int(c.rows[0]["epoch"]) for c in curves if ends[c.trial_id] == "collapsed"}


def per_run(replay: Callable[[Sequence[Curve]], Stops], curves: Sequence[Curve]) -> Stops:
    """``replay`` on each recorded sweep run apart (ASHA and median stopping compare a run's own trials)."""
    runs: dict[str, list[Curve]] = defaultdict(list)
    for curve in curves:
        runs[curve.run].append(curve)
    return {trial: epoch for group in runs.values() for trial, epoch in replay(group).items()}


@dataclass(frozen=True)
class Policy:
    name: str
    # none | collapse | predict | predict+collapse(-waiting) | oracle | asha | median | collapse+asha
    kind: str
    settings: Mapping[str, Any]
    replay: Callable[[Sequence[Curve]], Stops]


def _no_stops(curves: Sequence[Curve]) -> Stops:
    return {}


def _collapse_then_asha(rule: CollapseRule, asha: Mapping[str, Any], curves: Sequence[Curve]) -> Stops:
    """The sweep's ``collapse+asha`` mode: the stopper first, then ASHA on what is left."""
    collapsed = collapse_stops(curves, rule)
    return {**asha_stops(curves, stopped_first=collapsed, **asha), **collapsed}


DEFAULT_POLICY = "prediction + collapse p{patience} g{grace} (the sweep's default)"


def default_policy_name(rule: CollapseRule) -> str:
    return DEFAULT_POLICY.format(patience=rule.patience, grace=rule.grace_epochs)


def policies(sweep: Sweep, predicted: set[str], ends: Mapping[str, str]) -> list[Policy]:
    """Every policy replayed: none, the collapse rule at several settings, the prediction alone and with the
    sweep's rule (its default), two oracles, ASHA, median stopping, collapse + ASHA."""
    rule = sweep.spec.early_stop.collapse
    objective, objective_mode = sweep.objectives[0]
    spec_asha = sweep.spec.early_stop.asha
    sweep_asha = {"grace_period": min(spec_asha.grace_period, sweep.epochs),
                  "reduction_factor": spec_asha.reduction_factor}
    prediction = {"margin": sweep.spec.early_stop.predict_margin, "audited_exempt": True}
    out = [
        Policy("none", "none", {}, _no_stops),
        Policy(default_policy_name(rule), "predict+collapse", {**prediction, "collapse": rule.model_dump()},
               partial(predicted_then_rule, rule, predicted)),
        Policy(f"{default_policy_name(rule).split(' (')[0]}, waiting for the KL warm-up and DIP-II too",
               "predict+collapse-waiting", {**prediction, "collapse": rule.model_dump()},
               partial(predicted_then_waiting_rule, sweep, rule, predicted)),
        Policy("prediction alone (stop after epoch 1)", "predict", prediction, partial(predicted_stops, predicted=predicted)),
    ]
    variants = dict.fromkeys([(rule.patience, rule.grace_epochs), *RULE_VARIANTS])
    for patience, grace in variants:
        variant = rule.model_copy(update={"patience": patience, "grace_epochs": grace})
        own = " (the sweep's)" if (patience, grace) == (rule.patience, rule.grace_epochs) else ""
        out.append(Policy(f"collapse p{patience} g{grace}{own}", "collapse", variant.model_dump(),
                          partial(collapse_stops, rule=variant)))
    out += [
        Policy("oracle: from the epoch it stays collapsed", "oracle", {}, partial(oracle_stops, ends=ends, rule=rule)),
        Policy("oracle: every collapsing trial after epoch 1", "oracle", {}, partial(first_epoch_oracle, ends=ends)),
    ]
    asha_runs = [
        (VALIDATION_LOSS, "min", RAY_ASHA_DEFAULTS, "Ray's defaults"),
        (VALIDATION_LOSS, "min", sweep_asha, "the sweep's"),
        (objective, objective_mode, sweep_asha, "the sweep's"),
    ]
    if len(sweep.objectives) > 1:
        asha_runs.append((*sweep.objectives[1], sweep_asha, "the sweep's"))
    for metric, mode, settings, whose in asha_runs:
        asha = {"metric": metric, "mode": mode, **settings, "max_t": sweep.epochs}
        name = f"ASHA {metric} {mode}, grace {settings['grace_period']:g} rf {settings['reduction_factor']:g} ({whose})"
        out.append(Policy(name, "asha", asha, partial(per_run, partial(asha_stops, **asha))))
    for metric, mode in ((VALIDATION_LOSS, "min"), (objective, objective_mode)):
        median = {"metric": metric, "mode": mode, **MEDIAN_DEFAULTS}
        out.append(Policy(f"median {metric} {mode} (Optuna's defaults)", "median", median,
                          partial(per_run, partial(median_stops, **median))))
    asha = {"metric": objective, "mode": objective_mode, **sweep_asha, "max_t": sweep.epochs}
    out.append(Policy(f"collapse p{rule.patience} g{rule.grace_epochs} + ASHA {objective} {objective_mode} "
                      f"(the sweep's collapse+asha)", "collapse+asha", {"collapse": rule.model_dump(), "asha": asha},
                      partial(per_run, partial(_collapse_then_asha, rule, asha))))
    return out


# --------------------------------------------------------------------------- accounting


def front_of(curves: Sequence[Curve], objectives: Sequence[tuple[str, str]]) -> list[Curve]:
    """The curves on the Pareto front of their final objective values."""
    points = np.array([[c.final(metric) for metric, _ in objectives] for c in curves], dtype=float)
    return [curves[i] for i in pareto_front(points.reshape(len(curves), len(objectives)), [m for _, m in objectives])]


def best_of(curves: Sequence[Curve], objectives: Sequence[tuple[str, str]]) -> Curve | None:
    """The sweep's best trial among ``curves`` (:func:`sweeps.selection.best_index`, as ``best.yaml``)."""
    best = best_index([[c.final(m) for m, _ in objectives] for c in curves], [mode for _, mode in objectives])
    return None if best is None else curves[best]




def false_kill_bound(kills: int, healthy: int, confidence: float = 0.95) -> float | None:
    """Clopper-Pearson's one-sided upper bound on the false-kill rate from ``kills`` of ``healthy`` trials."""
    if healthy == 0:
        return None
    if kills >= healthy:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, kills + 1, healthy - kills))


def meets(curve: Curve, constraints: Sequence[Constraint]) -> bool:
    """Whether the trial's final values meet every constraint (``best.yaml`` takes only such trials)."""
    return all(c.violation(curve.final(c.metric)) <= 0 for c in constraints)


def account(
    curves: Sequence[Curve],
    ends: Mapping[str, str],
    stops: Stops,
    objectives: Sequence[tuple[str, str]],
    constraints: Sequence[Constraint] = (),
) -> dict[str, Any]:
    """What a policy's ``stops`` cost and keep, given how each trial ``ends`` without stopping; the Pareto
    front and the best trial (among those meeting the ``constraints``) of each recorded run."""
    ran = {c.trial_id: stops.get(c.trial_id, c.epochs) for c in curves}
    collapsed = [c.trial_id for c in curves if ends[c.trial_id] == "collapsed"]
    healthy = [c.trial_id for c in curves if ends[c.trial_id] == "completed"]
    fronts, bests = {}, {}
    for run in dict.fromkeys(c.run for c in curves):
        kept = [c for c in curves if c.run == run and c.trial_id in healthy and c.trial_id not in stops]
        fronts[run] = [c.trial_id for c in front_of(kept, objectives)]
        best = best_of([c for c in kept if meets(c, constraints)], objectives)
        bests[run] = None if best is None else {"trial_id": best.trial_id,
                                                "values": {m: best.final(m) for m, _ in objectives}}
    return {
        "epochs": sum(ran.values()),
        "epochs_on_collapsed": sum(ran[t] for t in collapsed),
        "stops": dict(sorted(stops.items())),
        "false_kills": [t for t in healthy if t in stops],
        "healthy_trials": len(healthy),
        "collapsed_kept": [t for t in collapsed if t not in stops],
        "front": fronts,
        "best": bests,
    }


def judge(result: Mapping[str, Any], none: Mapping[str, Any]) -> dict[str, Any]:
    """A policy's figures relative to no stopping, and whether it meets the targets set for early stopping."""
    share = result["epochs_on_collapsed"] / none["epochs_on_collapsed"] if none["epochs_on_collapsed"] else None
    same_best = result["best"] == none["best"]
    return {
        "epochs_share": result["epochs"] / none["epochs"],
        "collapsed_share": share,
        "false_kill_upper_95": false_kill_bound(len(result["false_kills"]), result["healthy_trials"]),
        "same_best": same_best,
        "same_front": result["front"] == none["front"],
        "targets_met": share is not None and share <= TARGET_SHARE and not result["false_kills"] and same_best,
    }


def replay(sweep: Sweep, curves: Sequence[Curve], spectrum: Spectrum | None) -> dict[str, Any]:
    """Every policy of :func:`policies` replayed on ``curves``, with how each trial ends, which are
    predicted, and the collapse rule's floor (:func:`collapse_floor`) for each trial that ends collapsed."""
    rule = sweep.spec.early_stop.collapse
    ends = {c.trial_id: ending_status(c, rule) for c in curves}
    predicted = predicted_trials(predictor(sweep, spectrum), curves)
    results = [
        {"policy": policy.name, "kind": policy.kind, "settings": policy.settings,
         **account(curves, ends, policy.replay(curves), sweep.objectives, sweep.spec.constraints)}
        for policy in policies(sweep, predicted, ends)
    ]
    floors = {c.trial_id: collapse_floor(c, rule) or c.epochs for c in curves if ends[c.trial_id] == "collapsed"}
    return {"ends": ends, "predicted": sorted(predicted), "policies": [r | judge(r, results[0]) for r in results],
            "collapse_floor": floors}


def policy_summary(replayed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The machine-readable line of each policy: ``name``, ``share_collapsed_epochs``, ``false_kills``,
    ``trials``, ``collapsed_trials`` and the rest of what the table shows."""
    ends = replayed["ends"]
    collapsed = sum(1 for end in ends.values() if end == "collapsed")
    return [{"name": p["policy"], "kind": p["kind"], "share_collapsed_epochs": p["collapsed_share"],
             "false_kills": len(p["false_kills"]), "false_kill_upper_95": p["false_kill_upper_95"],
             "healthy_trials": p["healthy_trials"], "trials": len(ends), "collapsed_trials": collapsed,
             "epochs": p["epochs"], "epochs_share": p["epochs_share"], "same_best": p["same_best"],
             "targets_met": p["targets_met"]} for p in replayed["policies"]]


# --------------------------------------------------------------------------- live confirmation


def compare_live(recorded: Sequence[Curve], live: Sequence[Curve], stops: Stops, predicted: set[str],
                 rule: CollapseRule) -> dict[str, Any]:
    """The live run with the sweep's default early stop beside the replay of the same policy (``stops``) on
    the recorded curves of its seed, trial by trial where both tried the same parameters."""
    by_name = {c.trial_id.split("/")[-1]: c for c in live}
    trials = []
    for curve in recorded:
        twin = by_name.get(curve.trial_id.split("/")[-1])
        if twin is None or dict(twin.params) != dict(curve.params):
            continue
        stopped = curve.trial_id in stops
        trials.append({
            "trial_id": curve.trial_id, "replay_epochs": stops.get(curve.trial_id, curve.epochs),
            "live_epochs": twin.epochs,
            "replay_status": "collapsed" if stopped or ending_status(curve, rule) == "collapsed" else curve.status,
            "live_status": twin.status, "predicted": curve.trial_id in predicted,
            "curve_difference": curve_difference(curve, twin),
        })
    return {
        "trials": trials, "compared": len(trials), "recorded": len(recorded), "live_trials": len(live),
        "replay_epochs": sum(t["replay_epochs"] for t in trials),
        "live_epochs": sum(t["live_epochs"] for t in trials),
        "agree": all(t["replay_epochs"] == t["live_epochs"] and t["replay_status"] == t["live_status"] for t in trials),
    }


def curve_difference(a: Curve, b: Curve) -> float | None:
    """The largest absolute difference of AU, KL_raw or recon(mu) over the epochs both curves hold."""
    gaps = [abs(row[m] - other[m]) for row in a.rows if (other := b.at(int(row["epoch"]))) for m in CURVE_METRICS]
    return max(gaps, default=None)



# --------------------------------------------------------------------------- running the sweeps


def write_recording_sweep(sweep_name: str, folder: Path) -> Path:
    """The sweep the benchmark records: ``sweep_name``'s file with :data:`RECORDING_SPACE`, the
    Gaussian's sigma^2 up to :data:`RECORDING_SIGMA2_HIGH`, the smoke collapse rule with the full
    rule's patience and grace, and :data:`RECORDING_OVERRIDES`, as ``<folder>/<name>_recording.yaml``."""
    source = sweep_path(sweep_name)
    raw = yaml.safe_load(source.read_text())
    space = raw.get("space") or {}
    if "objective.sigma2" not in space:
        raise ConfigError(f"{source}: space has no objective.sigma2 to widen; record a sweep that searches it")
    space.update(RECORDING_SPACE)
    space["objective.sigma2"] = {**space["objective.sigma2"], "high": RECORDING_SIGMA2_HIGH}
    smoke = raw.setdefault("smoke", {})
    smoke_stop = smoke.setdefault("early_stop", {})
    full_rule = (raw.get("early_stop") or {}).get("collapse") or {}
    timing = {key: full_rule[key] for key in RULE_TIMING if key in full_rule}
    smoke_stop["collapse"] = {**smoke_stop.get("collapse", {}), **timing}
    smoke["overrides"] = {**(smoke.get("overrides") or {}), **RECORDING_OVERRIDES}
    raw["description"] = f"{source.stem} with collapse reachable through the Gaussian (bench/stopping.py)"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source.stem}_recording.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_command(args: argparse.Namespace, sweep_file: Path, seed: int, early_stop: str | None, run: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "sweeps" / "run.py"), str(sweep_file), *([] if args.full else ["--smoke"]),
        *(["--early-stop", early_stop] if early_stop else []),
        "--seed", str(seed), "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
        "--results", str(args.results), "--run", run, "--no-dashboard",
        *(["--address", args.address] if args.address else []),
    ]


def run_sweep(command: Sequence[str], step: str) -> None:
    """Run one sweep, its output shown as it comes; a sweep that refuses its input is bad input here too."""
    print(f"\n== {step}\n$ {shlex.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status == EXIT_BAD_INPUT:
        raise ConfigError(f"the sweep refused its input (its reason is above): {shlex.join(command)}")
    if status != 0:
        raise RuntimeError(f"the sweep exited with status {status}: {shlex.join(command)}")


def display(command: Sequence[str]) -> str:
    """A command as a person types it: ``python`` and repository-relative paths."""
    return shlex.join(["python" if part == sys.executable else part.replace(f"{ROOT}/", "") for part in command])



# --------------------------------------------------------------------------- reporting


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _run(run: Mapping[str, Any]) -> str:
    """How a sweep run came about: its command and wall time, or its folder."""
    if run["command"] is None:
        return f"`{run['run_dir']}`"
    return f"`{run['command']}` ({run['wall_seconds']:.0f} s)"


def _ids(ids: Sequence[str]) -> str:
    return ", ".join(ids) or "-"


def _same_best(p: Mapping[str, Any], none: Mapping[str, Any]) -> str:
    runs = list(none["best"])
    same = sum(1 for run in runs if p["best"].get(run) == none["best"][run])
    return f"{'yes' if same == len(runs) else 'NO'} ({same} of {len(runs)})"


def markdown(result: Mapping[str, Any]) -> str:
    """The section of ``RESULTS.md``: setting, spectrum, policy table, targets, the prediction's margin, live check."""
    rec, rep = result["recording"], result["replay"]
    trials = rec["trials"]
    collapsed = [t for t in trials if t["ends"] == "collapsed"]
    rule = result["rule"]
    none = rep["policies"][0]
    by_likelihood = defaultdict(lambda: [0, 0])
    for t in trials:
        by_likelihood[t["likelihood"]][0] += 1
        by_likelihood[t["likelihood"]][1] += t["ends"] == "collapsed"
    endings = ", ".join(f"{name} {c} of {n}" for name, (n, c) in by_likelihood.items())
    spectrum = result["spectrum"]
    lines = [
        "## Stopping policies by replay (`bench/stopping.py`)",
        "",
        f"- Date: {result['date']}; machine: {result['machine']} (epochs are exact; wall times are noisy)",
        f"- Command: `{result['command']}`; every table below again from the curves this benchmark keeps: "
        f"`python -m bench.stopping --replay-json`",
        f"- Recording: {len(rec['runs'])} sweeps (sampler seeds {', '.join(str(r['seed']) for r in rec['runs'])}) of "
        f"{result['sweep']}, {len(trials)} trials x {rec['epochs']} epochs, {result['setting']}, no early "
        f"termination; e.g. {_run(rec['runs'][0])}.",
        f"- Data spectrum (training subjects): lambda_1..3 = {', '.join(f'{v:.4g}' for v in spectrum['eigenvalues'][:3])}"
        f" of a total variance {spectrum['total_variance']:.4g} (D = {spectrum['dim']}); collapse is predicted at "
        f"sigma^2_eff >= {result['margin']:g} x lambda_1 = {result['margin'] * spectrum['eigenvalues'][0]:.4g}.",
        f"- A trial *ends collapsed* when the sweep's own rule ({CollapseRule(**rule).criterion()} for "
        f"{rule['patience']} full-strength epochs after a grace of {rule['grace_epochs']}, or in its last epoch) calls "
        "its whole curve collapsed, or confirmed its collapse and it did not revive for as many full-strength "
        f"epochs by the end: {len(collapsed)} of {len(trials)} ({endings}); "
        f"{none['healthy_trials']} end healthy; {len(rep['predicted'])} are predicted. A *false kill* stops a "
        "healthy trial (bound: one-sided 95 % Clopper-Pearson on its rate); *same best*: the best trial of every "
        "recorded sweep (`best.yaml`'s rule, among the healthy trials a policy lets finish) is none's.",
        "",
        "| policy | epochs | vs none | epochs on collapsed trials | vs none | stopped | false kills (rate <= , 95 %) "
        "| collapsed trials kept | same best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rep["policies"]:
        bound = p["false_kill_upper_95"]
        lines.append(
            f"| {p['policy']} | {p['epochs']} | {_percent(p['epochs_share'])} | {p['epochs_on_collapsed']} "
            f"| {_percent(p['collapsed_share'])} | {len(p['stops'])} | {len(p['false_kills'])} of "
            f"{p['healthy_trials']} ({_percent(bound)}) | {len(p['collapsed_kept'])} of {len(collapsed)} "
            f"| {_same_best(p, none)} |"
        )
    lines += ["", *targets_lines(result), "", *prediction_lines(result), "", *live_lines(result), "",
              *approximation_lines()]
    return "\n".join(lines)


def targets_lines(result: Mapping[str, Any]) -> list[str]:
    """Whether the sweep's default policy meets the targets, and what the oracles and the rule alone reach."""
    rep = result["replay"]
    policies_by_kind = {p["kind"]: p for p in rep["policies"]}
    default = policies_by_kind["predict+collapse"]
    rule_alone = next(p for p in rep["policies"] if p["kind"] == "collapse" and p["settings"] == result["rule"])
    waiting = policies_by_kind["predict+collapse-waiting"]
    oracles = [p for p in rep["policies"] if p["kind"] == "oracle"]
    misses = []
    if default["collapsed_share"] is None or default["collapsed_share"] > TARGET_SHARE:
        misses.append(f"it spends {_percent(default['collapsed_share'])} of none's epochs on collapsed trials")
    if default["false_kills"]:
        misses.append(f"it stops healthy trials {_ids(default['false_kills'])}")
    if not default["same_best"]:
        misses.append("its best trial differs from none's")
    moonshot = default["collapsed_share"] is not None and default["collapsed_share"] <= MOONSHOT_SHARE
    return [
        f"**Target** (the default policy: <= {100 * TARGET_SHARE:.0f} % of none's epochs on collapsed trials, no "
        f"false kill, the same best): **{'NOT met' if misses else 'met'}** for {default['policy']}"
        f"{': ' + '; '.join(misses) if misses else ''}: {_percent(default['collapsed_share'])} of the epochs, "
        f"{len(default['false_kills'])} false kills of {default['healthy_trials']} healthy trials (rate <= "
        f"{_percent(default['false_kill_upper_95'])} at 95 %); moonshot <= {100 * MOONSHOT_SHARE:.0f} %: "
        f"{'met' if moonshot else 'not met'}. Waiting for the KL warm-up and DIP-II too (which cannot open a "
        f"collapsed code) it would spend {_percent(waiting['collapsed_share'])} with {len(waiting['false_kills'])} "
        f"false kills. The rule alone spends {_percent(rule_alone['collapsed_share'])}; "
        + "; ".join(f"{p['policy']}: {_percent(p['collapsed_share'])}" for p in oracles) + ".",
    ]


def prediction_lines(result: Mapping[str, Any]) -> list[str]:
    """How far the prediction's margin sits from the healthy trials, per likelihood."""
    trials = result["recording"]["trials"]
    margin = result["margin"]
    judged = [t for t in trials if t["exempt"] is None and t["ratio"] is not None]
    healthy = [t["ratio"] for t in trials if t["ends"] == "completed" and t["ratio"] is not None]
    healthy_judged = [t["ratio"] for t in judged if t["ends"] == "completed"]
    missed = [t for t in trials if t["ends"] == "collapsed" and not t["predicted"]]
    why = defaultdict(int)
    for t in missed:
        if t["exempt"]:
            why["exempt: a KL floor"] += 1
        else:
            why[f"sigma^2_eff below {margin:g} x lambda_1" if t["ratio"] is not None else "no sigma^2_eff"] += 1
    return [
        f"**The prediction** (sigma^2_eff / lambda_1 >= {margin:g}, trials not exempt): the healthy trials reach "
        f"sigma^2_eff / lambda_1 <= {max(healthy, default=math.nan):.3g} ({len(healthy)} trials), those not exempt "
        f"<= {max(healthy_judged, default=math.nan):.3g} ({len(healthy_judged)}); "
        f"{sum(1 for t in judged if t['predicted'] and t['ends'] == 'collapsed')} of the "
        f"{sum(1 for t in judged if t['predicted'])} predicted end collapsed. The collapsed trials it leaves to the "
        f"rule: {', '.join(f'{n} ({w})' for w, n in why.items()) or 'none'}. Picture: `bench/stopping.png` "
        "(each trial's final channel nats against sigma^2_eff / lambda_1).",
    ]


def live_lines(result: Mapping[str, Any]) -> list[str]:
    live = result.get("live")
    if live is None:
        return ["No live run was compared."]
    diffs = [t["curve_difference"] for t in live["trials"] if t["curve_difference"] is not None]
    gap = max(diffs, default=math.nan)
    curves = "are identical to the recorded ones" if gap == 0 else f"differ from the recorded ones by at most {gap:.3g}"
    disagree = [t["trial_id"] for t in live["trials"]
                if (t["replay_epochs"], t["replay_status"]) != (t["live_epochs"], t["live_status"])]
    lines = [
        f"**Live confirmation** with the sweep's default early stop: {_run(live)}. {live['compared']} of its "
        f"{live['live_trials']} trials tried the parameters of the recording (TPE's random start); over them "
        f"{live['live_epochs']} epochs live, {live['replay_epochs']} replayed; statuses and stop epochs "
        f"{'agree for every trial' if live['agree'] else 'differ'}; the live curves {curves} (AU, KL_raw, recon_mu).",
        "",
        "| trial | predicted | replay: epochs, status | live: epochs, status |",
        "|---|---|---|---|",
    ]
    for t in live["trials"]:
        lines.append(f"| {t['trial_id']} | {'yes' if t['predicted'] else ''} | {t['replay_epochs']}, "
                     f"{t['replay_status']} | {t['live_epochs']}, {t['live_status']} |")
    if disagree:
        lines.append(f"\nDisagreements: {_ids(disagree)}.")
    return lines


def approximation_lines() -> list[str]:
    return [
        "**What the replay approximates**: the collapse rule is exact (the same `sweeps.collapse_rule` functions over "
        "the same `epochs.csv` rows; each trial is judged alone). ASHA (one bracket, Ray's milestones, cutoff = "
        "numpy's linear-interpolated `1 - 1/rf` quantile of the rewards recorded at the milestone, stop when "
        "strictly below, the `max_t` result recorded on completion) and median stopping (Optuna's MedianPruner: "
        "best-so-far against the median of completed trials at the same step) depend on the order results "
        "arrive in; the replay feeds each trial's whole curve in start order, as with one trial at a time, "
        "while the recording ran two trials side by side. With more than 10 trials a policy would also change "
        "what TPE suggests next; the replay cannot show that.",
    ]



# --------------------------------------------------------------------------- main


def setting(sweep: Sweep) -> str:
    data, model = sweep.experiment.data, sweep.experiment.model
    source = "phantom" if data.root is None else data.root
    smoke = " (the sweep's smoke settings)" if sweep.smoke else ""
    return (f"{data.size}^3 {source} ({len(data.modalities)} modalities), z_dim {model.z_dim}, "
            f"base filters {model.base_filters}, depth {model.depth}{smoke}")


def _number(value: float) -> float | None:
    """A JSON number: NaN (a metric an epoch does not have) is null. Ten significant digits keep a replay
    from the JSON exact: a schedule weight is at full strength within 1e-9 of its target."""
    return None if math.isnan(value) else float(f"{value:.10g}")


def trial_records(sweep: Sweep, spectrum: Spectrum | None, curves: Sequence[Curve],
                  replayed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each trial: its parameters, how it ends, its sigma^2_eff against lambda_1 and every epoch's row (the
    columns any replay reads, so :func:`load_json` can replay them again)."""
    rule, predicted = sweep.spec.early_stop.collapse, set(replayed["predicted"])
    keys = list(dict.fromkeys([*RECORDED_KEYS, *metric_keys(sweep)]))
    out = []
    for c in curves:
        cfg = sweep.experiment_for(c.params)
        s2 = sigma2_eff(cfg, c.rows[0])
        out.append({
            "trial_id": c.trial_id, "run": c.run, "number": c.number, "params": dict(c.params),
            "likelihood": cfg.objective.likelihood, "audited": sweep.is_audited(c.params),
            "ends": replayed["ends"][c.trial_id], "epochs": c.epochs,
            "sigma2_eff": s2, "ratio": None if s2 is None or spectrum is None else s2 / spectrum.top,
            "exempt": exemption(cfg, rule), "predicted": c.trial_id in predicted,
            "status": c.status, "last": {key: c.last.get(key, "") for key in LAST_KEYS},
            "rows": [{key: _number(row.get(key, math.nan)) for key in keys} for row in c.rows],
        })
    return out


def figure(result: Mapping[str, Any], path: Path) -> None:
    """Each trial's final channel nats against its sigma^2_eff / lambda_1, by how it ends, with the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"mse_mean": "o", "gaussian": "s", "sigma_vae": "^"}
    colours = {"collapsed": "tab:red", "completed": "tab:blue", "diverged": "tab:gray"}
    seen = set()
    for t in result["recording"]["trials"]:
        if t["ratio"] is None:
            continue
        channel = t["rows"][-1]["channel_nats"] or 0.0
        label = f"{t['likelihood']}, ends {t['ends']}"
        ax.scatter(t["ratio"], max(channel, 1e-4), marker=markers.get(t["likelihood"], "o"),
                   facecolors="none" if t["exempt"] else colours[t["ends"]], edgecolors=colours[t["ends"]],
                   label=None if label in seen else label, s=36)
        seen.add(label)
    ax.axvline(result["margin"], color="k", ls="--", lw=1, label=f"predicted: sigma^2_eff >= {result['margin']:g} lambda_1")
    ax.set(xscale="log", yscale="log", xlabel="sigma^2_eff / lambda_1", ylabel="channel nats, last epoch",
           title="Predicted collapse against the recorded endings (hollow: exempt)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_curves(sweep: Sweep, curves: Sequence[Curve], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every policy replayed on ``curves`` of the recorded ``runs`` of ``sweep``: what stopping.json holds."""
    spectrum = spectrum_of(sweep)
    replayed = replay(sweep, curves, spectrum)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": shlex.join(["python", "-m", "bench.stopping", *sys.argv[1:]]), "sweep": sweep.name,
        "setting": setting(sweep), "objectives": sweep.objectives, "rule": sweep.spec.early_stop.collapse.model_dump(),
        "margin": sweep.spec.early_stop.predict_margin,
        "spectrum": None if spectrum is None else spectrum.to_json(),
        "policies": policy_summary(replayed),
        "recording": {"runs": list(runs), "epochs": sweep.epochs, "sweep_record": sweep.record(),
                      "trials": trial_records(sweep, spectrum, curves, replayed)},
        "replay": replayed,
    }


def load_json(path: Path) -> tuple[Sweep, list[Curve], list[dict[str, Any]]]:
    """The recorded sweep, its curves and runs as ``stopping.json`` at ``path`` keeps them (:func:`trial_records`)."""
    try:
        recording = json.loads(path.read_text())["recording"]
        sweep = Sweep.from_record(recording["sweep_record"])
        curves = [Curve(t["trial_id"], t["number"], t["params"], ScheduleTargets.of(sweep.experiment_for(t["params"])),
                        tuple({k: math.nan if v is None else v for k, v in row.items()} for row in t["rows"]),
                        t["last"], t["status"], t["run"])
                  for t in recording["trials"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a stopping.json this benchmark can replay ({type(err).__name__}: {err}); "
                          "record the sweeps again (python -m bench.stopping)") from None
    return sweep, curves, recording["runs"]


def evaluate(record_dirs: Sequence[Path], live_dir: Path | None) -> dict[str, Any]:
    """Replay the recordings in ``record_dirs`` together and compare the live run in ``live_dir`` (if any)."""
    print(f"\n== replaying the policies on {', '.join(map(str, record_dirs))}", flush=True)
    runs = [load_run(d) for d in record_dirs]
    sweep = runs[0][0]
    for (other, curves, info), run_dir in zip(runs, record_dirs):
        check_recording(run_dir, other, curves)
        if other.spec.model_copy(update={"enqueue": []}) != sweep.spec.model_copy(update={"enqueue": []}) \
                or other.experiment != sweep.experiment:
            raise ConfigError(f"{run_dir}: not the same sweep as {record_dirs[0]}; replay runs of one sweep together")
    curves = [c for _, run_curves, _ in runs for c in run_curves]
    if len({c.trial_id for c in curves}) < len(curves):
        raise ConfigError("two recorded runs share a folder name; give runs with distinct names")
    result = evaluate_curves(sweep, curves, [info for _, _, info in runs])
    rule, replayed = sweep.spec.early_stop.collapse, result["replay"]
    if live_dir is not None:
        live_sweep, live, live_run = load_run(live_dir)
        early = live_sweep.spec.early_stop
        if early.mode != "collapse" or early.collapse != rule or not early.stops_predicted:
            raise ConfigError(f"{live_dir}: not the recorded sweep run with its default early stop (collapse rule "
                              "and predict: stop); compare a run of the same sweep and seed")
        seed_runs = [c for c in curves if c.run == next((i["run"] for _, _, i in runs if i["seed"] == live_run["seed"]),
                                                       None)]
        default = next(p for p in replayed["policies"] if p["kind"] == "predict+collapse")
        result["live"] = {**live_run, **compare_live(seed_runs, live, default["stops"], set(replayed["predicted"]), rule)}
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stopping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="dip_sbd", help="the sweep recorded (default: dip_sbd)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[9, 10, 11, 12, 13, 14],
                        help="one recorded sweep per TPE sampler seed; the first is also run live")
    parser.add_argument("--num-samples", type=int, default=12, help="trials per recorded sweep")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (default: the sweep's budget)")
    parser.add_argument("--full", action="store_true", help="record the sweep at its full settings (data, model, "
                        "resources: a GPU cluster) instead of its smoke settings")
    parser.add_argument("--address", help="the Ray cluster the sweeps join ('auto': the one running here; "
                        "default: a local Ray of their own)")
    parser.add_argument("--results", type=Path, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--replay-only", type=Path, nargs="+", metavar="RUN_DIR",
                        help="replay these runs (recorded with --early-stop none) and print the tables")
    parser.add_argument("--live", type=Path, metavar="LIVE_DIR", help="with --replay-only: a run of the same "
                        "sweep and a recorded seed with the default early stop, to compare")
    parser.add_argument("--write", action="store_true", help="with --replay-only: write stopping.json, "
                        "stopping.png and the section of RESULTS.md too (the full run always does)")
    parser.add_argument("--replay-json", type=Path, nargs="?", const=JSON_PATH, metavar="JSON",
                        help=f"replay the curves a stopping.json keeps (default {JSON_PATH.relative_to(ROOT)}) and "
                             "print the tables")
    args = parser.parse_args(argv)
    if args.replay_json and args.replay_only:
        parser.error("give --replay-json or --replay-only, not both")
    if (args.live or args.write) and not args.replay_only:
        parser.error("--live and --write go with --replay-only")
    return args


def record(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """Record one sweep per seed without early termination, then the first seed live; their folders."""
    args.results = (args.results or Path(tempfile.mkdtemp(prefix="stopping-"))).resolve()
    sweep_file = write_recording_sweep(args.sweep, args.results)
    args.max_epochs = args.max_epochs or load_sweep(args.sweep).epochs
    sweep_dir = args.results / sweep_file.stem
    steps = len(args.seeds) + 1
    for i, seed in enumerate(args.seeds, start=1):
        run_sweep(sweep_command(args, sweep_file, seed, "none", f"seed-{seed}"),
                  f"{i}/{steps} seed {seed}: every curve whole (no early termination)")
    live = f"{LIVE_PREFIX}seed-{args.seeds[0]}"
    run_sweep(sweep_command(args, sweep_file, args.seeds[0], None, live),
              f"{steps}/{steps} seed {args.seeds[0]} again with the sweep's default early stop")
    return [sweep_dir / f"seed-{seed}" for seed in args.seeds], sweep_dir / live


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.replay_json:
            result = evaluate_curves(*load_json(args.replay_json))
        elif args.replay_only:
            result = evaluate([d.resolve() for d in args.replay_only], args.live and args.live.resolve())
        else:
            result = evaluate(*record(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    text = markdown(result)
    if args.replay_json or (args.replay_only and not args.write):
        print(text)
        return EXIT_OK
    publish(HERE, SECTION, result, text)
    figure(result, HERE / "stopping.png")
    print(f"\n== written to {JSON_PATH.relative_to(ROOT)}, bench/stopping.png and {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
