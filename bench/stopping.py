"""Early-termination policies replayed on the whole curves of a sweep run without early termination.

    python -m bench.stopping [--seed 7] [--num-samples 10] [--max-epochs 12] [--results DIR]
    python -m bench.stopping --replay-only RUN_DIR [--live LIVE_DIR] [--write]

The full run (1) records a seeded sweep (``dip_sbd --smoke``: 16^3 phantom, tiny model) with
``--early-stop none``, so every trial's whole curve lands in its ``epochs.csv``; (2) replays
each policy on those curves; (3) runs the same sweep with the same seed and the collapse rule
on, and sets its real epochs and statuses beside the replay's; (4) writes
``bench/stopping.json`` and its section of ``bench/RESULTS.md``. ``--replay-only`` replays any
run recorded with ``--early-stop none`` (and compares a run with the collapse rule, ``--live``)
and prints the tables; with ``--write`` it writes them as the full run does.

Both runs try the same configurations: TPE samples independently at random from its seed until
``n_startup_trials`` (10) trials have finished, so with at most 10 trials (the enqueued ones
included) no suggestion depends on an outcome. The comparison checks it rather than assume it.

A trial *ends collapsed* when the sweep's own collapse rule, applied to its whole curve, calls it
collapsed (:func:`sweeps.collapse_rule.trial_outcome`: the status a sweep with that rule would give it
had it run every epoch); it is *healthy* when it ends completed and not collapsed. A *false kill*
stops a healthy trial. The *best* trial is the project's (``sweeps.selection.best_index``): among
the healthy trials a policy lets finish, the one best on the first objective, ties broken by the
next, on the final values Optuna is told.
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

from bench.results import RESULTS, machine, publish
from sweeps.collapse_rule import (
    HISTORY_KEYS, CollapseRule, ScheduleTargets, collapse_history, collapse_streak, numeric_rows, trial_outcome,
)
from sweeps.outputs import EPOCHS_CSV, RECORD_JSON, STUDY_DB, SUMMARY_JSON, latest_trials, trial_status
from sweeps.selection import best_index, pareto_front
from sweeps.space import RUN_NAME, Scalar
from sweeps.spec import Sweep
from vae.config import ConfigError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
JSON_PATH = HERE / "stopping.json"
SECTION = "bench/stopping.py"
RECORD_RUN, LIVE_RUN = "record", "live"
# (patience, grace_epochs) of the collapse rules replayed besides the sweep's own.
RULE_VARIANTS = ((1, 0), (2, 0), (3, 0), (1, 2), (2, 2))
# Ray's ASHAScheduler defaults, what a user gets without choosing (max_t is set to the run's epochs).
RAY_ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 4}
# Optuna's MedianPruner defaults.
MEDIAN_DEFAULTS = {"n_startup_trials": 5, "n_warmup_steps": 0}
VALIDATION_LOSS = "val/loss"
LIKELIHOOD = "objective.likelihood"
CURVE_METRICS = ("au", "kl_raw", "recon_mu")  # compared between the recorded and the live curves
TARGET_SHARE = 0.25  # the collapse rule's target: at most this share of none's epochs on collapsed trials

Stops = dict[str, int]  # trial_id -> the epoch after which a policy stops it (absent: it runs every epoch)


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One trial's recorded history: its parameters, schedule targets and one numeric row per epoch."""

    trial_id: str
    number: int  # Optuna's trial number: the order trials started in
    params: Mapping[str, Scalar]
    targets: ScheduleTargets
    rows: tuple[Mapping[str, float], ...]
    last: Mapping[str, str]  # the last epochs.csv row as written (its status, epoch, diverged term)
    status: str  # the status the sweep recorded

    @property
    def epochs(self) -> int:
        return int(self.rows[-1]["epoch"])

    def final(self, metric: str) -> float:
        return self.rows[-1][metric]

    def at(self, epoch: int) -> Mapping[str, float] | None:
        return next((row for row in self.rows if int(row["epoch"]) == epoch), None)


def metric_keys(sweep: Sweep) -> tuple[str, ...]:
    """The numeric columns a replay reads: the collapse rule's, the validation loss and the objectives."""
    return tuple(dict.fromkeys([*HISTORY_KEYS, *CURVE_METRICS, VALIDATION_LOSS, *(m for m, _ in sweep.objectives),
                                sweep.asha_objective[0]]))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load_run(run_dir: Path) -> tuple[Sweep, list[Curve], dict[str, Any]]:
    """The sweep, the curves (in start order) and how the sweep run in ``run_dir`` came about
    (its folder, its command as recorded in ``sweep.json``, its wall time)."""
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
        curves.append(Curve(trial_id, trial.number, trial.params, targets, tuple(numeric_rows(rows, keys)),
                            rows[-1], trial_status(trial)))
    summary = json.loads((run_dir / SUMMARY_JSON).read_text())
    command = record.get("command")
    info = {"run_dir": str(run_dir), "command": display([sys.executable, *command]) if command else None,
            "wall_seconds": summary.get("wall_seconds")}
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


# --------------------------------------------------------------------------- how each trial ends


def ending_status(curve: Curve, rule: CollapseRule) -> str:
    """The status a sweep with ``rule`` gives the trial had it run every epoch (completed, collapsed, diverged)."""
    streak, ends_collapsed = collapse_history(curve.rows, rule, curve.targets)
    return trial_outcome(curve.last, False, streak, rule, stopped_by_asha=False, ends_collapsed=ends_collapsed).status


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


def collapse_floor(curve: Curve, rule: CollapseRule) -> int | None:
    """The earliest epoch ``rule`` could stop ``curve`` were it collapsed in every epoch: the
    schedules' first full-strength epoch, plus the grace, plus the patience."""
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


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # none | collapse | asha | median | collapse+asha
    settings: Mapping[str, Any]
    replay: Callable[[Sequence[Curve]], Stops]


def _no_stops(curves: Sequence[Curve]) -> Stops:
    return {}


def _collapse_then_asha(rule: CollapseRule, asha: Mapping[str, Any], curves: Sequence[Curve]) -> Stops:
    """The sweep's ``collapse+asha`` mode: the stopper first, then ASHA on what is left."""
    collapsed = collapse_stops(curves, rule)
    return {**asha_stops(curves, stopped_first=collapsed, **asha), **collapsed}


def policies(sweep: Sweep) -> list[Policy]:
    """Every policy replayed: none, the collapse rule at several settings, ASHA, median stopping, both."""
    rule = sweep.spec.early_stop.collapse
    objective, objective_mode = sweep.objectives[0]
    spec_asha = sweep.spec.early_stop.asha
    sweep_asha = {"grace_period": min(spec_asha.grace_period, sweep.epochs),
                  "reduction_factor": spec_asha.reduction_factor}
    out = [Policy("none", "none", {}, _no_stops)]
    variants = dict.fromkeys([(rule.patience, rule.grace_epochs), *RULE_VARIANTS])
    for patience, grace in variants:
        variant = rule.model_copy(update={"patience": patience, "grace_epochs": grace})
        own = " (the sweep's)" if (patience, grace) == (rule.patience, rule.grace_epochs) else ""
        out.append(Policy(f"collapse p{patience} g{grace}{own}", "collapse", variant.model_dump(),
                          partial(collapse_stops, rule=variant)))
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
        out.append(Policy(name, "asha", asha, partial(asha_stops, **asha)))
    for metric, mode in ((VALIDATION_LOSS, "min"), (objective, objective_mode)):
        median = {"metric": metric, "mode": mode, **MEDIAN_DEFAULTS}
        out.append(Policy(f"median {metric} {mode} (Optuna's defaults)", "median", median,
                          partial(median_stops, **median)))
    asha = {"metric": objective, "mode": objective_mode, **sweep_asha, "max_t": sweep.epochs}
    out.append(Policy(f"collapse p{rule.patience} g{rule.grace_epochs} + ASHA {objective} {objective_mode} "
                      f"(the sweep's collapse+asha)", "collapse+asha", {"collapse": rule.model_dump(), "asha": asha},
                      partial(_collapse_then_asha, rule, asha)))
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


def account(
    curves: Sequence[Curve], ends: Mapping[str, str], stops: Stops, objectives: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """What a policy's ``stops`` cost and keep, given how each trial ``ends`` without stopping."""
    ran = {c.trial_id: stops.get(c.trial_id, c.epochs) for c in curves}
    collapsed = [c.trial_id for c in curves if ends[c.trial_id] == "collapsed"]
    healthy = [c.trial_id for c in curves if ends[c.trial_id] == "completed"]
    kept = [c for c in curves if c.trial_id in healthy and c.trial_id not in stops]
    front = front_of(kept, objectives)
    best = best_of(kept, objectives)
    return {
        "epochs": sum(ran.values()),
        "epochs_on_collapsed": sum(ran[t] for t in collapsed),
        "stops": dict(sorted(stops.items())),
        "false_kills": [t for t in healthy if t in stops],
        "collapsed_kept": [t for t in collapsed if t not in stops],
        "front": [c.trial_id for c in front],
        "best": None if best is None else {"trial_id": best.trial_id,
                                           "values": {m: best.final(m) for m, _ in objectives}},
    }


def judge(result: Mapping[str, Any], none: Mapping[str, Any]) -> dict[str, Any]:
    """A policy's figures relative to no stopping, and whether it meets the targets set for the collapse rule."""
    share = result["epochs_on_collapsed"] / none["epochs_on_collapsed"] if none["epochs_on_collapsed"] else None
    same_best = result["best"] == none["best"]
    return {
        "epochs_share": result["epochs"] / none["epochs"],
        "collapsed_share": share,
        "same_best": same_best,
        "same_front": result["front"] == none["front"],
        "targets_met": share is not None and share <= TARGET_SHARE and not result["false_kills"] and same_best,
    }


def replay(sweep: Sweep, curves: Sequence[Curve]) -> dict[str, Any]:
    """Every policy of :func:`policies` replayed on ``curves``, with how each trial ends and the
    collapse rule's floor (:func:`collapse_floor`) for each trial that ends collapsed."""
    rule = sweep.spec.early_stop.collapse
    ends = {c.trial_id: ending_status(c, rule) for c in curves}
    results = [
        {"policy": policy.name, "kind": policy.kind, "settings": policy.settings,
         **account(curves, ends, policy.replay(curves), sweep.objectives)}
        for policy in policies(sweep)
    ]
    floors = {c.trial_id: collapse_floor(c, rule) or c.epochs for c in curves if ends[c.trial_id] == "collapsed"}
    return {"ends": ends, "policies": [r | judge(r, results[0]) for r in results], "collapse_floor": floors}


# --------------------------------------------------------------------------- live confirmation


def compare_live(recorded: Sequence[Curve], live: Sequence[Curve], rule: CollapseRule) -> dict[str, Any]:
    """The live run with ``rule`` beside the replay of ``rule`` on the recorded curves, trial by trial."""
    predicted = collapse_stops(recorded, rule)
    by_id = {c.trial_id: c for c in live}
    trials = []
    for curve in recorded:
        twin = by_id.get(curve.trial_id)
        replay_epochs = predicted.get(curve.trial_id, curve.epochs)
        replay_status = "collapsed" if curve.trial_id in predicted else curve.status
        trials.append({
            "trial_id": curve.trial_id, "same_params": twin is not None and dict(twin.params) == dict(curve.params),
            "replay_epochs": replay_epochs, "live_epochs": twin.epochs if twin else None,
            "replay_status": replay_status, "live_status": twin.status if twin else None,
            "curve_difference": curve_difference(curve, twin) if twin else None,
        })
    return {
        "trials": trials,
        "replay_epochs": sum(t["replay_epochs"] for t in trials),
        "live_epochs": sum(c.epochs for c in live),
        "live_trials": len(live),
        "same_params": all(t["same_params"] for t in trials) and len(live) == len(recorded),
        "agree": all(t["replay_epochs"] == t["live_epochs"] and t["replay_status"] == t["live_status"] for t in trials),
    }


def curve_difference(a: Curve, b: Curve) -> float | None:
    """The largest absolute difference of AU, KL_raw or recon(mu) over the epochs both curves hold."""
    gaps = [abs(row[m] - other[m]) for row in a.rows if (other := b.at(int(row["epoch"]))) for m in CURVE_METRICS]
    return max(gaps, default=None)


# --------------------------------------------------------------------------- running the sweeps


def sweep_command(args: argparse.Namespace, early_stop: str, run: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "sweeps" / "run.py"), args.sweep, "--smoke", "--early-stop", early_stop,
        "--seed", str(args.seed), "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
        "--results", str(args.results), "--run", run,
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


def _best(best: Mapping[str, Any] | None) -> str:
    if best is None:
        return "none"
    values = ", ".join(f"{m} {v:.4g}" for m, v in best["values"].items())
    return f"{best['trial_id'].removeprefix('trial-')} ({values})"


def _run(run: Mapping[str, Any]) -> str:
    """How a sweep run came about: its command and wall time, or its folder."""
    if run["command"] is None:
        return f"`{run['run_dir']}`"
    return f"`{run['command']}` ({run['wall_seconds']:.0f} s)"


def _ids(ids: Sequence[str]) -> str:
    return ", ".join(t.removeprefix("trial-") for t in ids) or "-"


def markdown(result: Mapping[str, Any]) -> str:
    """The section of ``RESULTS.md``: setting, policy table, stop epochs per trial, targets, live check."""
    rec, rep = result["recording"], result["replay"]
    curves, ends = rec["trials"], rep["ends"]
    collapsed = [t for t, end in ends.items() if end == "collapsed"]
    rule = result["rule"]
    lines = [
        "## Stopping policies by replay (`bench/stopping.py`)",
        "",
        f"- Date: {result['date']}; machine: {result['machine']} (shared with other work: wall times are noisy; "
        "epochs are exact)",
        f"- Command: `{result['command']}`",
        f"- Recording: {_run(rec)}: sweep {result['sweep']}, {len(curves)} trials x {rec['epochs']} epochs, "
        f"{result['setting']}, no early termination.",
        f"- A trial *ends collapsed* when the sweep's own rule ({CollapseRule(**rule).criterion()} "
        f"for {rule['patience']} full-strength epochs after a grace of {rule['grace_epochs']}, or in its last epoch) "
        f"calls its whole curve collapsed: {len(collapsed)} of {len(curves)} ({_ids(collapsed)}); a *false kill* "
        "stops a trial that ends healthy; *best*: among the healthy trials a policy lets finish, the Pareto-optimal "
        f"one best on {result['objectives'][0][0]} ({result['objectives'][0][1]}), ties broken by the next objective "
        "(the sweep's `best.yaml` rule), on final values.",
        "",
        "| policy | epochs | vs none | epochs on collapsed trials | vs none | stopped | false kills "
        "| collapsed trials kept | best | none's Pareto front |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rep["policies"]:
        lines.append(
            f"| {p['policy']} | {p['epochs']} | {_percent(p['epochs_share'])} | {p['epochs_on_collapsed']} "
            f"| {_percent(p['collapsed_share'])} | {len(p['stops'])} | {len(p['false_kills'])} "
            f"| {len(p['collapsed_kept'])} of {len(collapsed)} | {_best(p['best'])} "
            f"| {'yes' if p['same_front'] else 'no: ' + (_ids(p['front']) if p['front'] else 'empty')} |"
        )
    ids = list(ends)
    heads = [t.removeprefix("trial-") + ("*" if ends[t] == "collapsed" else "") for t in ids]
    lines += [
        "",
        f"Epoch at which each policy stops each trial (`.`: runs all {rec['epochs']}; `*`: ends collapsed; "
        "the parameters of each trial are in `stopping.json`):",
        "",
        "| policy | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(ids),
    ]
    for p in rep["policies"][1:]:
        lines.append(f"| {p['policy']} | " + " | ".join(str(p["stops"].get(t, ".")) for t in ids) + " |")
    lines += ["", *reading_lines(result), "", *targets_lines(result), "", *live_lines(result), "",
              *approximation_lines()]
    return "\n".join(lines)


def reading_lines(result: Mapping[str, Any]) -> list[str]:
    """Which policies keep collapsed trials while stopping healthy ones, and what the validation loss ranks."""
    rep, trials = result["replay"], result["recording"]["trials"]
    wrong = [p["policy"] for p in rep["policies"] if p["collapsed_kept"] and p["false_kills"]]
    loss = {end: [t["final"][VALIDATION_LOSS] for t in trials if t["ends"] == end]
            for end in ("collapsed", "completed")}
    lines = [f"Policies that keep collapsed trials while stopping healthy ones: {'; '.join(wrong) or 'none'}."]
    if loss["collapsed"] and loss["completed"]:
        why = (" The likelihood is searched, and it sets the scale of the loss: a validation loss ranks "
               "likelihoods, not collapse." if result["likelihood_searched"] else "")
        lines.append(f"Final {VALIDATION_LOSS}, median: {np.median(loss['collapsed']):.4g} for the trials that end "
                     f"collapsed, {np.median(loss['completed']):.4g} for the healthy ones.{why}")
    return lines


def targets_lines(result: Mapping[str, Any]) -> list[str]:
    """Whether the sweep's own collapse rule meets the targets, and why not where it does not."""
    rep = result["replay"]
    none = rep["policies"][0]
    own = next(p for p in rep["policies"] if p["kind"] == "collapse" and p["settings"] == result["rule"])
    met = [p["policy"] for p in rep["policies"] if p["kind"] == "collapse" and p["targets_met"]]
    floors = rep["collapse_floor"]
    floor = sum(floors.values())
    floor_share = _percent(floor / none["epochs_on_collapsed"]) if none["epochs_on_collapsed"] else "-"
    misses = []
    if own["collapsed_share"] is None or own["collapsed_share"] > TARGET_SHARE:
        misses.append(f"it spends {_percent(own['collapsed_share'])} of none's epochs on collapsed trials")
    if own["false_kills"]:
        misses.append(f"it stops healthy trials {_ids(own['false_kills'])}")
    if not own["same_best"]:
        misses.append("its best trial differs from none's")
    lines = [
        f"**Targets** (collapse rule: <= {100 * TARGET_SHARE:.0f} % of none's epochs on collapsed trials, no false "
        f"kill, the same best): {'NOT met' if misses else 'met'} for the sweep's rule "
        f"(patience {own['settings']['patience']}, grace {own['settings']['grace_epochs']})"
        f"{': ' + '; '.join(misses) if misses else ''}. Rules meeting all three: {', '.join(met) or 'none'}.",
    ]
    if floors and none["epochs_on_collapsed"]:
        at = ", ".join(f"{t.removeprefix('trial-')} after epoch {e}" for t, e in floors.items())
        lines.append(
            f"The rule may count an epoch only once the trial's KL and DIP schedules are at full strength, then "
            f"waits out the grace and the patience: were the collapsed trials collapsed in every epoch, the sweep's "
            f"rule would stop them no earlier than {at}, {floor} epochs ({floor_share} of none's). The other "
            f"{own['epochs_on_collapsed'] - floor} epochs pass while they are at full strength but not yet below both "
            "thresholds."
        )
    return lines


def live_lines(result: Mapping[str, Any]) -> list[str]:
    live = result.get("live")
    if live is None:
        return ["No live run was compared."]
    diffs = [t["curve_difference"] for t in live["trials"] if t["curve_difference"] is not None]
    gap = max(diffs, default=math.nan)
    curves = "are identical to the recorded ones" if gap == 0 else f"differ from the recorded ones by at most {gap:.3g}"
    curves += " (AU, KL_raw, recon_mu) over the epochs both ran"
    disagree = [t["trial_id"] for t in live["trials"]
                if (t["replay_epochs"], t["replay_status"]) != (t["live_epochs"], t["live_status"])]
    lines = [
        f"**Live confirmation** with the sweep's rule: {_run(live)}. Same parameters trial by trial: "
        f"{'yes' if live['same_params'] else 'NO'} (TPE draws its first 10 trials at random from the seed). "
        f"Epochs: {live['live_epochs']} live, {live['replay_epochs']} replayed; statuses and stop epochs "
        f"{'agree for every trial' if live['agree'] else 'differ'}; the live curves {curves}.",
        "",
        "| trial | replay: epochs, status | live: epochs, status |",
        "|---|---|---|",
    ]
    for t in live["trials"]:
        lines.append(f"| {t['trial_id']} | {t['replay_epochs']}, {t['replay_status']} "
                     f"| {t['live_epochs']}, {t['live_status']} |")
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


def trial_records(curves: Sequence[Curve], ends: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"trial_id": c.trial_id, "number": c.number, "params": dict(c.params), "ends": ends[c.trial_id],
             "epochs": c.epochs, "final": {m: c.final(m) for m in (*CURVE_METRICS, VALIDATION_LOSS)}} for c in curves]


def evaluate(record_dir: Path, live_dir: Path | None) -> dict[str, Any]:
    """Replay the recording in ``record_dir`` and compare the live run in ``live_dir`` (if any)."""
    print(f"\n== replaying the policies on {record_dir}", flush=True)
    sweep, curves, recording = load_run(record_dir)
    check_recording(record_dir, sweep, curves)
    replayed = replay(sweep, curves)
    rule = sweep.spec.early_stop.collapse
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": shlex.join(["python", "-m", "bench.stopping", *sys.argv[1:]]), "sweep": sweep.name,
        "setting": setting(sweep),
        "objectives": sweep.objectives, "rule": rule.model_dump(),
        "likelihood_searched": LIKELIHOOD in sweep.space.names,
        "recording": {**recording, "epochs": sweep.epochs,
                      "trials": trial_records(curves, replayed["ends"])},
        "replay": replayed,
    }
    if live_dir is not None:
        live_sweep, live, live_run = load_run(live_dir)
        if live_sweep.spec.early_stop.mode != "collapse" or live_sweep.spec.early_stop.collapse != rule:
            raise ConfigError(f"{live_dir}: not the recorded sweep run with its collapse rule (--early-stop collapse); "
                              "compare a run of the same sweep and seed")
        result["live"] = {**live_run, **compare_live(curves, live, rule)}
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stopping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="dip_sbd", help="the sweep, run with --smoke (default: dip_sbd)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the TPE sampler, the same for both runs")
    parser.add_argument("--num-samples", type=int, default=10,
                        help="trials per run; at most 10 keep every suggestion independent of the outcomes")
    parser.add_argument("--max-epochs", type=int, default=12, help="epochs per trial")
    parser.add_argument("--results", type=Path, help="where both runs go (default: a new temporary folder)")
    parser.add_argument("--replay-only", type=Path, metavar="RUN_DIR",
                        help="replay this run (recorded with --early-stop none) and print the tables")
    parser.add_argument("--live", type=Path, metavar="LIVE_DIR", help="with --replay-only: a run of the same "
                        "sweep and seed with the collapse rule on, to compare")
    parser.add_argument("--write", action="store_true", help="with --replay-only: write stopping.json and the "
                        "section of RESULTS.md too (the full run always does)")
    args = parser.parse_args(argv)
    if (args.live or args.write) and not args.replay_only:
        parser.error("--live and --write go with --replay-only")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.replay_only:
            result = evaluate(args.replay_only.resolve(), args.live and args.live.resolve())
        else:
            args.results = (args.results or Path(tempfile.mkdtemp(prefix="stopping-"))).resolve()
            sweep_dir = args.results / Path(args.sweep).stem
            run_sweep(sweep_command(args, "none", RECORD_RUN), "1/2 recording every curve: no early termination")
            run_sweep(sweep_command(args, "collapse", LIVE_RUN), "2/2 the same sweep and seed, collapse rule on")
            result = evaluate(sweep_dir / RECORD_RUN, sweep_dir / LIVE_RUN)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    text = markdown(result)
    if args.replay_only and not args.write:
        print(text)
        return EXIT_OK
    publish(HERE, SECTION, result, text)
    print(f"\n== written to {JSON_PATH.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
