"""The replay of early-termination policies (``bench/stopping.py``).

Pure tests on hand-made curves with answers worked out by hand: the collapse rule stops at the
epoch its streak reaches the patience; ASHA's cutoffs (the quantile of what was recorded before,
in start order); median stopping; the accounting of epochs, false kills and the best trial. Then
the replays against the schedulers they copy: Ray's ``AsyncHyperBandScheduler`` and Optuna's
``MedianPruner``, driven result by result on random curves (neither needs a running Ray). Last,
a real two-trial sweep without early termination, replayed through the command line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from bench.stopping import (
    Curve, account, asha_rungs, asha_stops, best_of, collapse_floor, collapse_stop, collapse_stops, ending_status,
    evaluate, evaluate_curves, false_kill_bound, first_epoch_oracle, front_of, judge, load_json, main, median_stops,
    oracle_stops, parse_args, per_run, predicted_stops, predicted_then_rule, read_csv, sweep_command,
    waiting_for_every_schedule, write_recording_sweep,
)
from helpers import REPO, ray_folder
from sweeps.collapse_rule import CollapseRule, ScheduleTargets
from sweeps.spec import Constraint, load_sweep

DIP = ScheduleTargets(beta=1.0, capacity_max=None, dip_i=True)  # DIP-I: its ramp is waited for
OBJECTIVES = [("au", "max"), ("recon_mu", "min")]


def curve(trial_id: str, number: int, epochs: list[dict], status: str = "completed") -> Curve:
    """A curve of ``len(epochs)`` epochs: each dict overrides a healthy full-strength epoch."""
    rows = tuple(
        {"epoch": float(i), "au": 3.0, "kl_raw": 5.0, "kl_weight": 1.0, "capacity": 0.0, "dip_weight": 1.0,
         "val/loss": 1.0, "recon_mu": 0.3, **values}
        for i, values in enumerate(epochs, start=1)
    )
    last_status = status if status in ("completed", "diverged") else "running"
    last = {"epoch": str(len(rows)), "status": last_status, "diverged_term": "recon" if status == "diverged" else ""}
    return Curve(trial_id, number, {}, DIP, rows, last, status)


def losses(trial_id: str, number: int, values: list[float], metric: str = "val/loss") -> Curve:
    return curve(trial_id, number, [{metric: v} for v in values])


COLLAPSED = {"au": 0.0, "kl_raw": 0.1}
RULE = CollapseRule(au_min=0, kl_min=0.5, patience=2, grace_epochs=0)


# --------------------------------------------------------------------------- the collapse rule


def test_collapse_rule_waits_for_full_strength_then_counts_the_streak():
    # Collapsed from the first epoch; DIP reaches full strength in epoch 3.
    ramp = [{**COLLAPSED, "dip_weight": 0.0}, {**COLLAPSED, "dip_weight": 0.5}] + [COLLAPSED] * 4
    c = curve("t", 0, ramp)
    assert collapse_stop(c, RULE) == 4  # epochs 3 and 4
    assert collapse_stop(c, RULE.model_copy(update={"patience": 1})) == 3
    assert collapse_stop(c, RULE.model_copy(update={"grace_epochs": 1})) == 5  # epoch 3 is the grace
    assert collapse_floor(c, RULE) == 4


def test_a_healthy_epoch_resets_the_streak_and_a_high_kl_is_not_collapse():
    revived = curve("t", 0, [COLLAPSED, {}, COLLAPSED, COLLAPSED, {}])
    assert collapse_stop(revived, RULE) == 4
    au_zero_only = curve("t", 0, [{"au": 0.0, "kl_raw": 3.0}] * 5)  # AU 0 but KL_raw above kl_min
    assert collapse_stop(au_zero_only, RULE) is None
    assert collapse_floor(au_zero_only, RULE) == 2  # were it collapsed: full strength from epoch 1
    assert collapse_stops([revived, au_zero_only], RULE) == {"t": 4}


def test_cyclical_ramps_neither_count_nor_reset():
    ramp = {**COLLAPSED, "kl_weight": 0.5}
    c = curve("t", 0, [COLLAPSED, ramp, ramp, COLLAPSED, {}])
    assert collapse_stop(c, RULE) == 4  # epochs 1 and 4 in a row, the ramp in between skipped


def test_the_rule_as_it_waited_for_every_schedule():
    """DIP-II ramping up over epochs 1-3 and the KL weight warming up over 1-2: today's rule waits for
    neither (they cannot open a collapsed code); the replayed variant waits for both, DIP-I and capacity
    as before."""
    sweep = load_sweep("dip_sbd", smoke=True)
    ramps = [{**COLLAPSED, "kl_weight": 0.5, "dip_weight": 0.0}, {**COLLAPSED, "kl_weight": 0.9, "dip_weight": 0.5},
             {**COLLAPSED, "dip_weight": 0.8}] + [COLLAPSED] * 3
    dip_ii = replace(curve("t", 0, ramps), params={"objective.dip.kind": "ii"},
                     targets=ScheduleTargets(1.0, None, dip_i=False))
    assert collapse_stop(dip_ii, RULE) == 4  # epochs 3 and 4: the KL weight at beta, DIP-II not waited for
    waiting = waiting_for_every_schedule(sweep, dip_ii)
    assert collapse_stop(waiting, RULE) == 5  # epochs 4 and 5: every schedule at full strength
    assert collapse_stop(waiting, RULE.model_copy(update={"grace_epochs": 1})) == 6
    dip_i = replace(dip_ii, params={"objective.dip.kind": "i"}, targets=DIP)
    assert collapse_stop(dip_i, RULE) == collapse_stop(waiting_for_every_schedule(sweep, dip_i), RULE) == 5


def test_ending_status_is_the_sweeps_verdict_on_the_whole_curve():
    assert ending_status(curve("t", 0, [{}, COLLAPSED, COLLAPSED]), RULE) == "collapsed"
    # One collapsed epoch is below the patience, but it is the last: collapsed "at the end".
    assert ending_status(curve("t", 0, [{}, {}, COLLAPSED]), RULE) == "collapsed"
    assert ending_status(curve("t", 0, [{}, COLLAPSED, {}]), RULE) == "completed"
    assert ending_status(curve("t", 0, [COLLAPSED, COLLAPSED, {}, {}]), RULE) == "completed"  # revived for 2
    assert ending_status(curve("t", 0, [{}, {}], status="diverged"), RULE) == "diverged"


# --------------------------------------------------------------------------- ASHA


def test_asha_rungs():
    assert asha_rungs(1, 12, 2) == [8, 4, 2, 1]
    assert asha_rungs(1, 4, 2) == [4, 2, 1]
    assert asha_rungs(2, 12, 3) == [6, 2]


def test_asha_cutoffs_by_hand():
    """Validation loss, min (reward = -loss), grace 1, rf 2 (the median), max_t 4: rungs 1, 2, 4.

    A: never stopped (nothing recorded before it); records -4 at rung 1, -3 at rung 2.
    B: rung 1 holds [-4]: -5 < -4, stopped after epoch 1.
    C: rung 1 [-4, -5], cutoff -4.5: -3 passes; rung 2 [-3]: -2.5 passes.
    D: rung 1 [-4, -5, -3], median -4: -3.5 passes; rung 2 [-3, -2.5], cutoff -2.75: -2.8 stops it after epoch 2.
    """
    a = losses("A", 0, [4, 3, 2, 1])
    b = losses("B", 1, [5, 1, 1, 1])
    c = losses("C", 2, [3, 2.5, 2, 2])
    d = losses("D", 3, [3.5, 2.8, 2.7, 2.6])
    stops = asha_stops([d, c, b, a], "val/loss", "min", 1, 2, 4)  # start order, not list order, counts
    assert stops == {"B": 1, "D": 2}
    # Order matters: D started before C sees only A at rung 2 (cutoff -3) and survives; C then passes too.
    swapped = [a, b, replace(d, number=2), replace(c, number=3)]
    assert asha_stops(swapped, "val/loss", "min", 1, 2, 4) == {"B": 1}
    # Maximised instead: B passes rung 1 (5 >= 4) but not rung 2 (1 < 3).
    assert asha_stops([a, b], "val/loss", "max", 1, 2, 4) == {"B": 2}


def test_asha_after_a_stopper_and_with_nan():
    a = losses("A", 0, [4, 3, 2, 1])
    b = losses("B", 1, [5, 1, 1, 1])
    # The stopper ended B after epoch 1: ASHA decides nothing there (B is no ASHA stop) but records its -5.
    c = losses("C", 2, [4.4, 1, 1, 1])  # rung 1 [-4, -5]: cutoff -4.5, passes; without B's record: -4, stopped
    assert asha_stops([a, b, c], "val/loss", "min", 1, 2, 4, stopped_first={"B": 1}) == {}
    assert asha_stops([a, c], "val/loss", "min", 1, 2, 4) == {"C": 1}
    nan = losses("N", 1, [math.nan] * 4)  # NaN < cutoff is False: never stopped
    assert asha_stops([a, nan], "val/loss", "min", 1, 2, 4) == {}
    # A decision at a diverged trial's own last epoch is no stop: it ended anyway.
    short = curve("S", 1, [{"val/loss": 9.0}], status="diverged")
    assert asha_stops([a, short], "val/loss", "min", 1, 2, 4) == {}


def ray_asha_stops(curves, metric, mode, grace_period, reduction_factor, max_t, stopped_first=None) -> dict:
    """Ray's own scheduler fed the same results in the same order, as Tune would."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    scheduler = AsyncHyperBandScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=max_t,
                                        grace_period=grace_period, reduction_factor=reduction_factor)
    stops, stopped_first = {}, stopped_first or {}
    for c in sorted(curves, key=lambda c: c.number):
        trial = SimpleNamespace(trial_id=c.trial_id)
        scheduler.on_trial_add(None, trial)
        for row in c.rows:
            result = {"epoch": row["epoch"], metric: row[metric]}
            if row["epoch"] >= stopped_first.get(c.trial_id, math.inf):
                break  # Tune asks the stopper first and skips the scheduler's on_trial_result
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                if row["epoch"] < min(max_t, c.epochs):  # not the budget's end, nor the trial's own
                    stops[c.trial_id] = int(row["epoch"])
                break
        scheduler.on_trial_complete(None, trial, result)
    return stops


@pytest.mark.parametrize("grace_period, reduction_factor, max_t", [(1, 2, 12), (1, 4, 12), (2, 3, 9), (3, 1.5, 12)])
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # Ray's cutoff over a rung holding only NaN
def test_asha_replay_matches_rays_scheduler(grace_period, reduction_factor, max_t):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    bracket = AsyncHyperBandScheduler(max_t=max_t, grace_period=grace_period,
                                      reduction_factor=reduction_factor)._brackets[0]
    assert asha_rungs(grace_period, max_t, reduction_factor) == [m for m, _ in bracket._rungs]
    rng = np.random.default_rng(grace_period * 100 + max_t)
    for _ in range(5):
        curves = []
        for number in range(12):
            values = np.cumsum(rng.normal(0, 1, size=max_t)) + rng.normal(0, 2)
            values[rng.random(max_t) < 0.05] = np.nan
            epochs = max_t if rng.random() > 0.2 else int(rng.integers(1, max_t))
            curves.append(curve(f"t{number}", number, [{"val/loss": float(v)} for v in values[:epochs]],
                                status="completed" if epochs == max_t else "diverged"))
        ids = [c.trial_id for c in curves]
        stopped_first = {t: int(rng.integers(1, max_t + 1)) for t in rng.choice(ids, size=3, replace=False)}
        for mode in ("min", "max"):
            args = ("val/loss", mode, grace_period, reduction_factor, max_t)
            assert asha_stops(curves, *args) == ray_asha_stops(curves, *args)
            assert asha_stops(curves, *args, stopped_first) == ray_asha_stops(curves, *args, stopped_first)


# --------------------------------------------------------------------------- median stopping


def test_median_stopping_by_hand():
    a = losses("A", 0, [4, 3, 2])
    b = losses("B", 1, [5, 4, 3])
    c = losses("C", 2, [6, 2, 1])  # step 1: 6 > median(4, 5) = 4.5
    d = losses("D", 3, [4.6, 4.2, 4.0])  # C, stopped, is no completed trial: step 1: 4.6 > 4.5
    e = losses("E", 4, [4.4, 3.6, 2.4])  # step 1: 4.4 < 4.5; step 2: best 3.6 > median(3, 4) = 3.5
    curves = [a, b, c, d, e]
    assert median_stops(curves, "val/loss", "min", n_startup_trials=2, n_warmup_steps=0) == {"C": 1, "D": 1, "E": 2}
    # Warm-up 2: C's best at step 2 (2) beats median(3, 4) = 3.5 and C completes; then D's best 4.2 and E's 3.6
    # are above median(3, 4, 2) = 3.
    assert median_stops(curves, "val/loss", "min", n_startup_trials=2, n_warmup_steps=2) == {"D": 2, "E": 2}
    # Three completed trials needed: C runs free and joins A and B; D passes step 1 (4.6 < median 5), not step 2.
    assert median_stops(curves, "val/loss", "min", n_startup_trials=3, n_warmup_steps=0) == {"D": 2, "E": 2}
    # Maximised: C's best 6 stays above the medians and it completes; D and E fall below median(4, 5, 6) = 5.
    assert median_stops(curves, "val/loss", "max", n_startup_trials=2, n_warmup_steps=0) == {"D": 1, "E": 1}


def test_median_stopping_nan_and_diverged():
    a, b = losses("A", 0, [4, 3, 2]), losses("B", 1, [5, 4, 3])
    diverged = curve("X", 2, [{"val/loss": 1.0}, {"val/loss": 1.0}], status="diverged")  # never a completed trial
    nan = losses("N", 3, [math.nan, 1.0, 1.0])  # a NaN best stops the trial
    late = losses("L", 4, [4.6, 3.0, 2.0])
    assert median_stops([a, b, diverged, nan, late], "val/loss", "min", 2, 0) == {"N": 1, "L": 1}
    assert median_stops([a, diverged, late], "val/loss", "min", 2, 0) == {}  # one completed trial: below the startup


def optuna_median_stops(curves, metric, mode, n_startup_trials, n_warmup_steps) -> dict:
    """Optuna's own MedianPruner, each curve reported step by step in start order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", pruner=pruner)
    stops = {}
    for c in sorted(curves, key=lambda c: c.number):
        trial = study.ask()
        for row in c.rows:
            trial.report(row[metric], step=int(row["epoch"]))
            if trial.should_prune():
                stops[c.trial_id] = int(row["epoch"])
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            done = c.status == "completed"
            study.tell(trial, c.final(metric) if done else None, state=TrialState.COMPLETE if done else TrialState.FAIL)
    return stops


@pytest.mark.parametrize("n_startup_trials, n_warmup_steps", [(5, 0), (2, 3), (0, 1)])
def test_median_replay_matches_optunas_pruner(n_startup_trials, n_warmup_steps):
    rng = np.random.default_rng(n_startup_trials * 10 + n_warmup_steps)
    for _ in range(5):
        curves = []
        for number in range(12):
            values = np.cumsum(rng.normal(0, 1, size=8)) + rng.normal(0, 2)
            epochs = 8 if rng.random() > 0.2 else int(rng.integers(1, 8))
            curves.append(curve(f"t{number}", number, [{"val/loss": float(v)} for v in values[:epochs]],
                                status="completed" if epochs == 8 else "diverged"))
        for mode in ("min", "max"):
            args = ("val/loss", mode, n_startup_trials, n_warmup_steps)
            assert median_stops(curves, *args) == optuna_median_stops(curves, *args)


# --------------------------------------------------------------------------- accounting


def test_accounting_of_epochs_false_kills_and_the_best():
    def final(au: float, recon: float) -> dict:
        return {"au": au, "recon_mu": recon}

    curves = [
        curve("C0", 0, [COLLAPSED] * 6),  # ends collapsed
        curve("H1", 1, [{}] * 5 + [final(4.0, 0.30)]),  # best: most active units
        curve("H2", 2, [{}] * 5 + [final(2.0, 0.20)]),  # on the front: the lowest recon
        curve("H3", 3, [{}] * 5 + [final(1.0, 0.40)]),  # dominated by both
        curve("D4", 4, [{}] * 2, status="diverged"),
    ]
    ends = {c.trial_id: ending_status(c, RULE) for c in curves}
    assert ends == {"C0": "collapsed", "H1": "completed", "H2": "completed", "H3": "completed", "D4": "diverged"}
    none = account(curves, ends, {}, OBJECTIVES)
    assert none["epochs"] == 6 * 4 + 2 and none["epochs_on_collapsed"] == 6 and none["healthy_trials"] == 3
    assert none["front"] == {"": ["H1", "H2"]}
    assert none["best"] == {"": {"trial_id": "H1", "values": {"au": 4.0, "recon_mu": 0.30}}}
    assert none["collapsed_kept"] == ["C0"] and none["false_kills"] == []
    # a constraint the best breaks: best.yaml names the next one
    au_at_most_3 = Constraint(metric="au", max=3.0)
    assert account(curves, ends, {}, OBJECTIVES, [au_at_most_3])["best"][""]["trial_id"] == "H2"

    rule = account(curves, ends, collapse_stops(curves, RULE), OBJECTIVES)
    assert rule["stops"] == {"C0": 2} and rule["epochs_on_collapsed"] == 2 and rule["epochs"] == 22
    assert judge(rule, none) == {"epochs_share": 22 / 26, "collapsed_share": 2 / 6,
                                 "false_kill_upper_95": pytest.approx(1 - 0.05 ** (1 / 3)), "same_best": True,
                                 "same_front": True, "targets_met": False}  # 2/6 of the epochs: above 25 %
    kills = account(curves, ends, {"C0": 1, "H1": 3, "H3": 2, "D4": 1}, OBJECTIVES)
    assert kills["false_kills"] == ["H1", "H3"] and kills["epochs"] == 1 + 3 + 6 + 2 + 1
    assert kills["front"] == {"": ["H2"]} and kills["best"][""]["trial_id"] == "H2"
    assert judge(kills, none)["same_best"] is False and judge(kills, none)["collapsed_share"] == 1 / 6
    quick = account(curves, ends, {"C0": 1}, OBJECTIVES)
    assert judge(quick, none)["targets_met"] is True  # 1/6 <= 25 %, no false kill, the same best
    assert best_of(front_of([], OBJECTIVES), OBJECTIVES) is None


def test_false_kill_bound_is_clopper_pearson():
    assert false_kill_bound(0, 7) == pytest.approx(1 - 0.05 ** (1 / 7))  # 0 of 7: below 35 % only
    assert false_kill_bound(0, 30) == pytest.approx(0.0950, abs=1e-4)
    # 1 of 20: the 95 % quantile of Beta(2, 19), by its CDF 1 - (1 - p)^20 - 20 p (1 - p)^19
    bound = false_kill_bound(1, 20)
    assert 1 - (1 - bound) ** 20 - 20 * bound * (1 - bound) ** 19 == pytest.approx(0.95)
    assert false_kill_bound(0, 0) is None and false_kill_bound(3, 3) == 1.0


def test_a_confirmed_collapse_is_undone_only_by_as_many_healthy_epochs():
    """A last epoch that crosses the threshold by noise does not make a collapsed trial healthy."""
    assert ending_status(curve("t", 0, [{}, COLLAPSED, COLLAPSED, {}]), RULE) == "collapsed"
    assert ending_status(curve("t", 0, [{}, COLLAPSED, COLLAPSED, {}, {}]), RULE) == "completed"  # revived for 2
    assert ending_status(curve("t", 0, [{}, COLLAPSED, {}, {}]), RULE) == "completed"  # never confirmed


def test_prediction_and_oracles_stop_after_the_first_epoch_or_the_last_healthy_one():
    curves = [
        curve("P0", 0, [COLLAPSED] * 5),  # predicted
        curve("L1", 1, [{}, {}, COLLAPSED, {}, COLLAPSED, COLLAPSED]),  # collapses late, not predicted
        curve("H2", 2, [{}] * 6),
    ]
    ends = {c.trial_id: ending_status(c, RULE) for c in curves}
    assert predicted_stops(curves, {"P0"}) == {"P0": 1}
    assert predicted_then_rule(RULE, {"P0"}, curves) == {"P0": 1, "L1": 6}
    assert oracle_stops(curves, ends, RULE) == {"P0": 1, "L1": 5}  # from epoch 5 on it stays collapsed
    assert first_epoch_oracle(curves, ends) == {"P0": 1, "L1": 1}
    other_run = replace(curves[2], trial_id="r2/H2", run="r2")
    assert per_run(lambda group: {c.trial_id: len(group) for c in group}, [*curves, other_run]) == {
        "P0": 3, "L1": 3, "H2": 3, "r2/H2": 1}  # each run replayed on its own


def test_the_recording_sweep_reaches_collapse_through_the_gaussian(tmp_path):
    path = write_recording_sweep("dip_sbd", tmp_path)
    sweep = load_sweep(str(path), smoke=True)
    likelihood = next(p for p in sweep.space.params if p.name == "objective.likelihood")
    sigma2 = next(p for p in sweep.space.params if p.name == "objective.sigma2")
    assert list(likelihood.choices) == ["mse_mean", "gaussian"] and sigma2.high == 1e5
    rule, full_rule = sweep.spec.early_stop.collapse, load_sweep("dip_sbd").spec.early_stop.collapse
    assert (rule.patience, rule.grace_epochs) == (full_rule.patience, full_rule.grace_epochs)  # the full budget's
    assert rule.kl_min == load_sweep("dip_sbd", smoke=True).spec.early_stop.collapse.kl_min  # the smoke threshold
    assert sweep.experiment.train.checkpoint_every == 10  # checkpoints change no curve
    smoke = parse_args(["--seeds", "3"])
    assert "--smoke" in sweep_command(smoke, path, 3, "none", "seed-3")
    assert "--address" not in sweep_command(smoke, path, 3, "none", "seed-3")
    full = sweep_command(parse_args(["--full", "--address", "auto"]), path, 9, "none", "seed-9")
    assert "--smoke" not in full and full[-2:] == ["--address", "auto"]
    assert load_sweep(str(path)).spec.early_stop.collapse == load_sweep("dip_sbd").spec.early_stop.collapse
    assert sweep.spec.enqueue == load_sweep("dip_sbd", smoke=True).spec.enqueue  # the audited point first


# --------------------------------------------------------------------------- a real recording


@pytest.fixture(scope="module")
def recording(scratch):
    """Two trials of dip_sbd's smoke settings, 3 epochs each, without early termination."""
    env = {**os.environ, **ray_folder(), "COLLAPSE_SWEEP_CACHE": str(scratch / "cache")}
    command = [sys.executable, str(REPO / "sweeps" / "run.py"), "dip_sbd", "--smoke", "--early-stop", "none",
               "--seed", "3", "--num-samples", "2", "--max-epochs", "3", "--results", str(scratch / "results"),
               "--run", "record", "--no-dashboard"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return scratch / "results" / "dip_sbd" / "record"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.stopping", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def written() -> float | None:
    """When ``bench/stopping.json`` was last written (None: never)."""
    path = REPO / "bench" / "stopping.json"
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.system
def test_replay_of_a_recorded_sweep(recording):
    before = written()
    done = bench("--replay-only", recording)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = read_csv(recording / "epochs.csv")
    assert len(epochs) == 6
    assert f"| none | {len(epochs)} | 100 % |" in done.stdout
    assert "| collapse p2 g0 (the sweep's) |" in done.stdout and "ASHA val/loss min" in done.stdout
    assert "| prediction + collapse p2 g0 (the sweep's default) |" in done.stdout
    assert "- Data spectrum (training subjects): lambda_1..3 = " in done.stdout
    assert written() == before  # --replay-only writes nothing without --write


@pytest.mark.system
def test_stopping_json_replays_as_its_runs_do(recording, tmp_path):
    """What stopping.json keeps of each curve is enough to replay every policy again, figure for figure."""
    result = evaluate([recording], None)
    path = tmp_path / "stopping.json"
    path.write_text(json.dumps(result))
    again = evaluate_curves(*load_json(path))
    assert again["replay"] == json.loads(json.dumps(result["replay"]))
    assert again["recording"]["trials"] == json.loads(json.dumps(result["recording"]["trials"]))
    done = bench("--replay-json", path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| prediction + collapse p2 g0 (the sweep's default) |" in done.stdout


def test_the_committed_figures_are_what_the_code_replays():
    """bench/stopping.json's curves, replayed by today's rule and policies, give the figures it states."""
    path = REPO / "bench" / "stopping.json"
    stored = json.loads(path.read_text())
    again = evaluate_curves(*load_json(path))
    assert len(again["recording"]["trials"]) >= 40
    assert json.loads(json.dumps(again["policies"])) == stored["policies"]
    assert again["replay"]["ends"] == stored["replay"]["ends"]


def refused(capsys, *args: str) -> str:
    """The one error line of ``bench/stopping.py``'s main, which must exit 2."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_folder_without_a_sweep_is_one_line_and_exit_2(tmp_path, capsys):
    assert "no sweep.json" in refused(capsys, "--replay-only", tmp_path / "nowhere")
    (tmp_path / "old.json").write_text(json.dumps({"recording": {"runs": [], "trials": []}}))
    old = refused(capsys, "--replay-json", tmp_path / "old.json")
    assert "old.json: not a stopping.json this benchmark can replay" in old
    assert "nowhere.json: not a stopping.json" in refused(capsys, "--replay-json", tmp_path / "nowhere.json")


@pytest.mark.system
def test_bad_input_is_one_line_and_exit_2(recording, scratch, capsys):
    stopped = scratch / "stopped"
    shutil.copytree(recording, stopped, ignore=shutil.ignore_patterns("trials", "tune", "report"))
    record = json.loads((stopped / "sweep.json").read_text())
    record["spec"]["early_stop"]["mode"] = "collapse"
    (stopped / "sweep.json").write_text(json.dumps(record))
    assert "--early-stop none" in refused(capsys, "--replay-only", stopped)
    # --live must be the sweep run with its default early stop, not another recording.
    assert "default early stop" in refused(capsys, "--replay-only", recording, "--live", recording)
    assert "distinct names" in refused(capsys, "--replay-only", recording, recording)
