"""Sweep definitions without Ray: the shipped sweeps load, every mistake is one line and exit
status 2 before any compute, the space samples what it says, the collapse rule counts the
right epochs (cyclical annealing included), and the collapse warning quotes the effective
sigma^2.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from dataclasses import replace

import optuna
import pytest
import yaml

from helpers import MINIMAL
from sweeps.outputs import best_trial, param_labels
from sweeps.run import main
from sweeps.spec import Sweep, collapse_warnings, load_sweep, reported_metrics, stopping_notes, sweep_names
from sweeps.space import parse_space
from sweeps.collapse_rule import (
    CollapseRule, ScheduleTargets, at_full_strength, collapse_history, collapse_streak, trial_outcome,
)
from vae.config import ConfigError, load_experiment
from vae.data.spectrum import Spectrum
from vae.objectives import kl_weight

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

def write_sweep(tmp_path: Path, raw: dict, name: str = "mine") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def changed(**sections) -> dict:
    raw = copy.deepcopy(MINIMAL)
    raw.update(sections)
    return raw


# --------------------------------------------------------------------------- the shipped sweeps


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("name", ["dip_sbd", "baseline", "tcvae_sbd"])
def test_shipped_sweeps_load_and_survive_their_record(name, smoke):
    assert name in sweep_names()
    sweep = load_sweep(name, smoke=smoke)
    assert sweep.name == name and len(sweep.space.params) >= 5
    audited = [p for p in sweep.spec.enqueue if p.audited]
    assert len(audited) == 1 and sweep.spec.enqueue[0] is audited[0]  # evaluated first
    if smoke:
        cfg = sweep.experiment
        assert 16 <= cfg.data.size <= 32 and cfg.model.z_dim <= 16 and sweep.epochs <= 5
        assert sweep.spec.budget.num_samples <= 6 and sweep.spec.resources.gpus_per_trial == 0
    again = Sweep.from_record(json.loads(json.dumps(sweep.record())))
    assert again.spec == sweep.spec and again.experiment == sweep.experiment and again.space == sweep.space


def test_dip_sbd_starts_from_the_audited_exp2():
    sweep = load_sweep("dip_sbd")
    audited = sweep.experiment_for(sweep.spec.enqueue[0].params)
    exp2 = load_experiment("exp2_dipvae_sbd")
    assert audited.model == exp2.model
    obj, ref = audited.objective, exp2.objective
    assert (obj.likelihood, obj.kl, obj.free_bits, obj.tc) == (ref.likelihood, ref.kl, ref.free_bits, ref.tc)
    assert (obj.dip.kind, obj.dip.lambda_od, obj.dip.lambda_diag) == ("ii", 10.0, 5.0)
    # The DIP schedule is searched as a fraction of the run: from epoch 0, warming up over 40 of exp2's 200.
    assert obj.dip.start_epoch == 0
    assert obj.dip.warmup_epochs / sweep.epochs == pytest.approx(40 / 200)


@pytest.mark.parametrize("name", ["dip_sbd", "baseline", "tcvae_sbd"])
def test_every_audited_point_carries_the_audited_objective(name):
    sweep = load_sweep(name)
    (audited,) = [p for p in sweep.spec.enqueue if p.audited]
    objective = sweep.experiment_for(audited.params).objective
    assert (objective.likelihood, objective.kl.beta, objective.kl.schedule) == ("mse_mean", 1.0, "constant")
    assert (objective.free_bits.floor, objective.free_bits.mode) == (0.05, "batch_mean")


# --------------------------------------------------------------------------- errors: one line, exit 2


ERRORS = {
    "unknown sweep": (None, "unknown sweep 'no_such_sweep'"),
    "yaml syntax": ("space: [unclosed\n", "YAML syntax error"),
    "unknown top-level key": (changed(budgett={"num_samples": 2}), "budgett: unknown key"),
    "unknown parameter path": (
        changed(space={"objective.kl.betta": {"low": 0.1, "high": 1.0}}), "unknown parameter path: unknown key 'betta'"
    ),
    "empty space": (changed(space={}), "space is empty"),
    "low >= high": (changed(space={"objective.kl.beta": {"low": 2.0, "high": 1.0}}), "low (2) must be below high (1)"),
    "log bound <= 0": (
        changed(space={"objective.kl.beta": {"low": 0.0, "high": 1.0, "log": True}}), "a log range needs bounds > 0"
    ),
    "objective nobody reports": (changed(objectives=[{"metric": "au_typo", "mode": "max"}]), "no trial reports 'au_typo'"),
    "fallback objective nobody reports": (
        changed(objectives=[{"metric": "semantic_r2", "mode": "max", "without_factors": "nats_typo"}]),
        "objectives[0].without_factors: no trial reports 'nats_typo'",
    ),
    "fallback repeats an objective": (
        changed(objectives=[{"metric": "semantic_r2", "mode": "max", "without_factors": "recon_mu"},
                            {"metric": "recon_mu", "mode": "min"}]), "objectives name a metric twice",
    ),
    "constraint on a metric nobody reports": (
        changed(constraints=[{"metric": "prior_typo", "max": 1.0}]), "constraints[0].metric: no trial reports 'prior_typo'"
    ),
    "constraint with two bounds": (
        changed(constraints=[{"metric": "prior_kl_dim_max", "max": 1.0, "min": 0.0}]), "give exactly one of max or min"
    ),
    "asha metric nobody reports": (
        changed(early_stop={"mode": "asha", "asha": {"metric": "loss_typo", "mode": "min"}}),
        "early_stop.asha.metric: no trial reports 'loss_typo'",
    ),
    "invalid choice": (
        changed(space={"objective.likelihood": {"choices": ["gaussian", "mse_sum"]}}), "objective.likelihood='mse_sum'"
    ),
    "when names a later parameter": (
        changed(space={"objective.sigma2": {"low": 0.1, "high": 1.0, "when": {"objective.likelihood": "gaussian"}}}),
        "when names 'objective.likelihood', which is not a parameter listed before this one",
    ),
    "enqueued point outside the space": (
        changed(enqueue=[{"name": "far", "params": {"objective.kl.beta": 100.0}}]), "outside the space"
    ),
    "searched cache key": (
        changed(space={"data.phantom.subjects": {"type": "int", "low": 8, "high": 16}}), "decides the prepared data cache"
    ),
    "group named like a key": (
        changed(space={"objective.kl": {"choices": {"a": {"objective.kl.beta": 1.0}, "b": {}}}}),
        "a group's name may hold no '.'",
    ),
    "group choice read as a boolean": (
        "experiment: exp1_baseline_vae\nspace:\n  capacity: {choices: {on: {}, off: {objective.kl.capacity_max: null}}}\n",
        "group choice True must be named by text",
    ),
    "searched and fixed": (
        changed(overrides={**MINIMAL["overrides"], "objective.kl.beta": 1.0}), "both searched (space.objective.kl.beta) and fixed"
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_mistake_is_one_line_and_exit_2(case, tmp_path, capsys):
    content, message = ERRORS[case]
    if content is None:
        name = "no_such_sweep"
    else:
        path = tmp_path / "mine.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        name = str(path)
    assert main([name, "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "results").exists()  # nothing was started


def test_unknown_sweep_lists_the_available_ones(capsys):
    assert main(["no_such_sweep"]) == 2
    assert "one of baseline, dip_sbd, tcvae_sbd" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["objective.kl.betta=1"], "unknown key 'betta' in objective.kl"),
        (["--resume"], "holds no record of any run"),
        (["--smoke"], "--smoke needs a 'smoke:' section"),
        (["--storage", "not a url"], "is not a database URL"),
    ],
)
def test_command_line_mistakes(argv, message, tmp_path, capsys):
    path = write_sweep(tmp_path, MINIMAL)
    assert main([str(path), "--results", str(tmp_path / "results"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_resume_takes_the_recorded_options_again_and_refuses_other_values(tmp_path, capsys):
    """Repeating a sweep's command line with --resume is fine; only a value that differs from the record is refused."""
    from sweeps.run import parse_args, prepare
    from sweeps.service import _record_start
    from vae.training import derive_seed

    path, results = write_sweep(tmp_path, MINIMAL), tmp_path / "results"
    options = [str(path), "--results", str(results), "--run", "r1", "--max-epochs", "3", "--early-stop", "none",
               "data.batch_size=2"]
    first = prepare(parse_args(options))
    first.out_dir.mkdir(parents=True)
    _record_start(first)
    record = json.loads((first.out_dir / "sweep.json").read_text())
    assert isinstance(record["seed"], int) and record["seed"] == first.seed  # drawn entropy, recorded as an integer

    again = prepare(parse_args([*options, "--resume", "--num-samples", "5"]))
    assert again.resume and again.out_dir == first.out_dir and again.sweep.spec.budget.num_samples == 5
    assert again.seed == derive_seed(first.seed, 1, 1)  # replayable, and not the first start's suggestions again
    assert prepare(parse_args([str(path), "--results", str(results), "--resume", "--seed", "7"])).seed == 7

    different = [str(path), "--results", str(results), "--resume", "--max-epochs", "4", "data.batch_size=2",
                 "data.size=32", "--early-stop", "none"]
    assert main(different) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot change --max-epochs (recorded 3, given 4); data.size (recorded 16, given 32)" in line
    assert "batch_size" not in line and "early-stop" not in line


def test_the_script_itself_exits_2_with_one_line(tmp_path):
    """Through ``python sweeps/run.py`` as a user runs it, from another working directory."""
    bad = write_sweep(tmp_path, changed(space={"objective.kl.beta": {"low": 1.0, "high": 1.0}}))
    for args, message in ([str(bad)], "low (1) must be below high (1)"), (["nope"], "unknown sweep 'nope'"):
        done = subprocess.run(
            [sys.executable, str(REPO / "sweeps" / "run.py"), *args], cwd=tmp_path, capture_output=True, text=True,
        )
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and message in done.stderr


# --------------------------------------------------------------------------- the space


SPACE = {
    "objective.likelihood": {"choices": ["mse_mean", "gaussian"]},
    "objective.sigma2": {"low": 0.01, "high": 1.0, "log": True, "when": {"objective.likelihood": "gaussian"}},
    "objective.kl.beta": {"low": 0.01, "high": 10.0, "log": True},
    "free_bits": {"choices": {"none": {"objective.free_bits.floor": 0.0}, "floor": {}}},
    "objective.free_bits.floor": {"low": 0.05, "high": 1.0, "when": {"free_bits": "floor"}},
    "model.z_dim": {"type": "int", "low": 4, "high": 64, "log": True},
    "objective.dip.start_epoch": {"low": 0.0, "high": 0.25, "of_epochs": True},
}


def test_space_turns_values_into_overrides():
    space = parse_space(SPACE, "test")
    values = space.suggest(optuna.trial.FixedTrial({
        "objective.likelihood": "mse_mean", "objective.kl.beta": 0.5, "free_bits": "none", "model.z_dim": 16,
        "objective.dip.start_epoch": 0.1,
    }))
    assert "objective.sigma2" not in values and "objective.free_bits.floor" not in values  # not sampled
    assert space.overrides(values, epochs=40) == {
        "objective.likelihood": "mse_mean", "objective.kl.beta": 0.5, "objective.free_bits.floor": 0.0,
        "model.z_dim": 16, "objective.dip.start_epoch": pytest.approx(4.0),
    }
    values = space.suggest(optuna.trial.FixedTrial({
        "objective.likelihood": "gaussian", "objective.sigma2": 0.1, "objective.kl.beta": 0.5, "free_bits": "floor",
        "objective.free_bits.floor": 0.3, "model.z_dim": 8, "objective.dip.start_epoch": 0.0,
    }))
    overrides = space.overrides(values, epochs=40)
    assert overrides["objective.sigma2"] == 0.1 and overrides["objective.free_bits.floor"] == 0.3


def test_space_samples_conditionally_within_bounds():
    space = parse_space(SPACE, "test")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(300):
        trial = study.ask()
        samples.append(space.suggest(trial))
        study.tell(trial, 0.0)
    for s in samples:
        assert ("objective.sigma2" in s) == (s["objective.likelihood"] == "gaussian")
        assert ("objective.free_bits.floor" in s) == (s["free_bits"] == "floor")
        assert 0.01 <= s["objective.kl.beta"] <= 10 and isinstance(s["model.z_dim"], int) and 4 <= s["model.z_dim"] <= 64
    # Log-uniform on [0.01, 10]: half the mass lies below the geometric mean sqrt(0.1).
    below = sum(s["objective.kl.beta"] < math.sqrt(0.01 * 10) for s in samples) / len(samples)
    assert 0.4 < below < 0.6


def test_enqueued_points_are_checked_against_conditions(tmp_path):
    raw = changed(
        space={k: SPACE[k] for k in ("objective.likelihood", "objective.sigma2")},
        enqueue=[{"name": "p", "params": {"objective.likelihood": "mse_mean", "objective.sigma2": 0.1}}],
    )
    with pytest.raises(ConfigError, match="'objective.sigma2' is not sampled here"):
        load_sweep(str(write_sweep(tmp_path, raw)))


# --------------------------------------------------------------------------- the collapse rule


def row(kl_weight=1.0, au=0.0, kl_raw=0.1, dip_weight=1.0, capacity=0.0, z_sensitivity=0.5, channel_nats=5.0):
    return {"kl_weight": kl_weight, "au": au, "kl_raw": kl_raw, "dip_weight": dip_weight, "capacity": capacity,
            "z_sensitivity": z_sensitivity, "channel_nats": channel_nats}


HEALTHY = row(au=3.0, kl_raw=20.0)
RULE = CollapseRule(au_min=0, kl_min=0.5, patience=3, grace_epochs=0)
PLAIN = ScheduleTargets(beta=1.0, capacity_max=None, dip_i=False)
DIP_I = ScheduleTargets(beta=1.0, capacity_max=None, dip_i=True)


@pytest.mark.parametrize(
    "rows, rule, targets, expected",
    [
        # collapsed from the first epoch: every epoch counts
        ([row()] * 4, RULE, PLAIN, 4),
        # a healthy epoch resets the streak
        ([row(), row(), HEALTHY, row()], RULE, PLAIN, 1),
        # AU 0 alone is not collapse while the KL is large (the other way round neither)
        ([row(kl_raw=5.0), row(au=2.0)], RULE, PLAIN, 0),
        # a KL warm-up (weight rising to beta in epoch 3) cannot open a collapsed code: the grace (1 epoch)
        # starts at once, and the warm-up's epochs neither count nor reset the streak
        ([row(kl_weight=0.3), row(kl_weight=0.7), row(), row(), row()], RULE.model_copy(update={"grace_epochs": 1}),
         PLAIN, 3),
        ([row(kl_weight=0.3), HEALTHY | {"kl_weight": 0.7}, row(), row()], RULE, PLAIN, 2),  # a healthy one resets
        # DIP-I ramps up over epochs 1-2 (its diagonal term pulls a constant mu open): the grace starts after
        ([row(dip_weight=0.0), row(dip_weight=0.5), row(), row()], RULE, DIP_I, 2),
        ([row(dip_weight=0.0), row(dip_weight=0.5), row(), row(), row()], RULE.model_copy(update={"grace_epochs": 1}),
         DIP_I, 2),
        # DIP-II's ramp is not waited for: at collapse its covariance is the identity, no cost and no pull
        ([row(dip_weight=0.0), row(dip_weight=0.5), row(), row()], RULE, PLAIN, 4),
        # capacity below C_max is not full strength (a rising C rewards KL: it can open the code)
        ([row(capacity=10.0), row(capacity=25.0), row(capacity=25.0)], RULE, ScheduleTargets(1.0, 25.0, False), 2),
        # beta may be 0: a zero weight is its full value
        ([row(kl_weight=0.0)] * 2, RULE, ScheduleTargets(0.0, None, False), 2),
        # without au_min (the default) a tiny KL is collapse whatever AU says: free bits inflate AU for nothing
        ([row(au=3.0), row(au=5.0), row(au=0.0, kl_raw=0.6)], CollapseRule(kl_min=0.5, patience=3), PLAIN, 0),
        ([row(au=3.0), row(au=5.0)], CollapseRule(kl_min=0.5, patience=3), PLAIN, 2),
        # a decoder that ignores z is collapsed however many nats the code holds; one that reads z is not
        ([HEALTHY | {"z_sensitivity": 0.001}] * 2, CollapseRule(kl_min=0.5, z_sensitivity_min=0.01), PLAIN, 2),
        ([HEALTHY | {"z_sensitivity": 0.02}] * 2, CollapseRule(kl_min=0.5, z_sensitivity_min=0.01), PLAIN, 0),
        ([HEALTHY | {"z_sensitivity": 0.001}] * 2, CollapseRule(kl_min=0.5), PLAIN, 0),  # off unless given
        ([row(z_sensitivity=0.9)] * 2, CollapseRule(kl_min=0.5, z_sensitivity_min=0.01), PLAIN, 2),  # KL still counts
        # free bits: KL_raw 8.7 nats of a constant shift of mu, no channel information (a measured trial)
        ([HEALTHY | {"kl_raw": 8.7, "channel_nats": 0.0}] * 2, CollapseRule(kl_min=2.0, channel_min=0.1), PLAIN, 2),
        ([HEALTHY | {"channel_nats": 0.16}] * 2, CollapseRule(kl_min=2.0, channel_min=0.1), PLAIN, 0),
    ],
)
def test_collapse_streak(rows, rule, targets, expected):
    assert collapse_streak(rows, rule, targets) == expected


@pytest.mark.parametrize(
    "overrides, dip_i",
    [
        (["objective.dip.kind=ii"], False),
        (["objective.dip.kind=i"], True),
        (["objective.dip.kind=i", "objective.dip.lambda_d=0"], False),  # no diagonal term, no pull
        (["objective.dip.kind=none"], False),
    ],
)
def test_only_dip_i_is_a_schedule_the_rule_waits_for(overrides, dip_i):
    assert ScheduleTargets.of(load_experiment("exp2_dipvae_sbd", overrides)).dip_i is dip_i


def test_cyclical_annealing_counts_only_the_plateaus():
    """Two cycles over 8 epochs with ratio 0.5: the KL weight of vae.objectives, read where
    validation reads it (after the last of 4 steps), is beta only in epochs 3, 4, 7 and 8."""
    beta, steps = 2.0, 4
    weights = [kl_weight(e + (steps - 1) / steps, beta, "cyclical", 8, cycles=2, cycle_ratio=0.5) for e in range(8)]
    targets = ScheduleTargets(beta, None, False)
    assert [e + 1 for e, w in enumerate(weights) if at_full_strength(row(kl_weight=w), targets)] == [3, 4, 7, 8]
    collapsed_throughout = [row(kl_weight=w) for w in weights]
    # 8 collapsed epochs, but only the 4 on plateaus count; the ramps neither count nor reset
    assert collapse_streak(collapsed_throughout, RULE, targets) == 4
    assert collapse_streak(collapsed_throughout[:6], RULE, targets) == 2  # epochs 5-6 are a ramp
    # reviving on the second ramp (epoch 5) starts again from zero
    revived = collapsed_throughout[:4] + [row(kl_weight=weights[4], au=2.0, kl_raw=9.0)] + collapsed_throughout[5:]
    assert collapse_streak(revived, RULE, targets) == 2


@pytest.mark.parametrize(
    "last, error, streak, asha, status",
    [
        (None, True, 0, False, "failed"),
        ({}, False, 0, False, "interrupted"),  # let go before it ran
        ({"status": "diverged", "diverged_term": "recon", "epoch": 2}, False, 5, False, "diverged"),
        ({"status": "completed", "epoch": 4}, False, 3, False, "collapsed"),  # collapsed at the last epoch
        ({"status": "completed", "epoch": 4}, False, 2, True, "completed"),
        ({"status": "running", "epoch": 2}, False, 0, True, "asha_stopped"),
        ({"status": "running", "epoch": 2}, False, 0, False, "interrupted"),
    ],
)
def test_trial_outcome(last, error, streak, asha, status):
    assert trial_outcome(last, error, streak, RULE, asha).status == status
    if status == "collapsed":
        assert trial_outcome(last, error, streak, None, asha).status == "completed"  # no collapse rule


def test_a_rule_that_cannot_stop_a_trial_early_is_said_at_start_up():
    assert stopping_notes(load_sweep("dip_sbd")) == []  # grace 5 + patience 10 of 100 epochs
    (note,) = stopping_notes(load_sweep("dip_sbd", changes={"budget.max_epochs": 15}))
    assert "grace 5 + patience 10" in note and "15 epochs" in note and "at the end" in note
    assert stopping_notes(load_sweep("dip_sbd", changes={"budget.max_epochs": 15, "early_stop.mode": "none"})) == []


def test_a_budget_that_ends_while_the_trial_is_collapsed_ends_it_collapsed():
    """Grace + patience longer than the run: the last epoch decides (a 16-epoch run once listed the
    audited trial, AU 0 and KL_raw 0.009 nats, as completed)."""
    last = {"status": "completed", "epoch": 16}
    outcome = trial_outcome(last, False, 1, RULE, False, ends_collapsed=True)
    assert outcome.status == "collapsed" and outcome.reason.startswith("at the end: AU <= 0 and KL_raw <= 0.5 nats")
    assert trial_outcome(last, False, 0, RULE, False, ends_collapsed=False).status == "completed"
    assert trial_outcome(last, False, 0, None, False, ends_collapsed=True).status == "completed"  # no rule
    rows = [HEALTHY, row(kl_weight=0.5), row()]  # collapsed in its last epoch, not yet at full strength before
    assert collapse_history(rows, RULE, PLAIN) == (1, True)
    assert collapse_history([row(), HEALTHY], RULE, PLAIN) == (0, False)


# --------------------------------------------------------------------------- warnings and small pieces


def test_collapse_warning_quotes_the_spectrum_and_the_threshold(tmp_path):
    raw = changed(
        space={"objective.likelihood": {"choices": ["mse_mean", "gaussian"]},
               "objective.kl.beta": {"low": 0.1, "high": 10.0, "log": True}},
        enqueue=[{"name": "audited", "audited": True,
                  "params": {"objective.likelihood": "mse_mean", "objective.kl.beta": 1.0}},
                 {"name": "other", "params": {"objective.likelihood": "mse_mean", "objective.kl.beta": 0.5}},
                 {"name": "sound", "params": {"objective.likelihood": "gaussian", "objective.kl.beta": 1.0}}],
    )
    voxels = 4 * 16**3  # four modalities at 16^3
    spectrum = Spectrum((900.0, 400.0), total_variance=5000.0, subjects=10, dim=voxels)
    sweep = replace(load_sweep(str(write_sweep(tmp_path, raw))), spectrum=spectrum)
    assert collapse_warnings(replace(sweep, spectrum=None)) == []  # before the data are prepared
    lines = collapse_warnings(sweep)
    # mse_mean in the space and both its enqueued points; gaussian (sigma2 1, beta <= 10) stays below 1800
    assert len(lines) == 3, lines
    assert "likelihood mse_mean (in the space, beta up to 10)" in lines[0]
    assert f"from beta {1800 / (voxels / 2):.3g} on" in lines[0] and "2 x lambda_1 = 1800" in lines[0]
    assert "stop after their first epoch" in lines[0]
    assert "'audited'" in lines[1] and f"{voxels / 2:.4g} >= 2 x lambda_1 = 1800" in lines[1]
    assert "runs all its epochs" in lines[1]
    assert "'other'" in lines[2] and "it stops after its first epoch" in lines[2]
    warn = sweep.spec.model_copy(update={"early_stop": sweep.spec.early_stop.model_copy(update={"predict": "warn"})})
    assert "they run on" in collapse_warnings(replace(sweep, spec=warn))[0]
    off = sweep.spec.model_copy(update={"early_stop": sweep.spec.early_stop.model_copy(update={"predict": "off"})})
    assert collapse_warnings(replace(sweep, spec=off)) == []
    sound = changed(overrides={**MINIMAL["overrides"], "objective.likelihood": "gaussian"})
    assert collapse_warnings(replace(load_sweep(str(write_sweep(tmp_path, sound, "sound"))), spectrum=spectrum)) == []


def test_reported_metrics_come_from_the_training_loop():
    names = reported_metrics(["t1c", "t2f"])
    assert names[:4] == ("epoch", "au", "kl_raw", "recon_mu")
    assert {"mi", "val/loss", "kl_weight", "dip_weight", "ssim/t2f"} <= set(names)
    assert "status" not in names and "diverged_term" not in names and "ssim/t2w" not in names


def test_without_factors_the_semantic_objective_becomes_the_channel_information(tmp_path):
    sweep = load_sweep(str(write_sweep(tmp_path, MINIMAL)))
    assert sweep.objectives == [("semantic_r2", "max"), ("recon_mu", "min")]  # the defaults
    assert [c.describe() for c in sweep.spec.constraints] == ["prior_kl_dim_max <= 1"]
    assert sweep.for_data(has_factors=True) == (sweep, [])
    plain, (note,) = sweep.for_data(has_factors=False)
    assert plain.objectives == [("channel_nats", "max"), ("recon_mu", "min")]
    assert "no segmentation or factor table" in note and "semantic_r2 (max) is channel_nats" in note
    assert plain.for_data(has_factors=False) == (plain, [])  # recorded as resolved, a resumed run keeps it
    assert Sweep.from_record(plain.record()).objectives == plain.objectives


def test_param_labels_are_short_and_unique():
    names = ["objective.kl.warmup_epochs", "objective.dip.warmup_epochs", "objective.kl.beta", "free_bits"]
    assert param_labels(names) == {
        "objective.kl.warmup_epochs": "kl.warmup_epochs", "objective.dip.warmup_epochs": "dip.warmup_epochs",
        "objective.kl.beta": "beta", "free_bits": "free_bits",
    }


def test_best_trial_is_pareto_optimal_and_best_on_the_first_objective():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for au, recon in [(5, 0.3), (8, 0.5), (8, 0.4), (2, 0.1), (1, 0.9)]:
        study.add_trial(optuna.trial.create_trial(values=[au, recon]))
    assert best_trial(study, [("au", "max"), ("recon_mu", "min")]).values == [8, 0.4]
    assert best_trial(optuna.create_study(), [("au", "max")]) is None


def test_collapsed_trials_break_every_constraint_so_tpe_never_prefers_them():
    """A collapsed code sits at the prior and would meet a prior constraint; told so, TPE would rank it
    above every healthy trial that breaks the constraint (pinned below). Told infinitely infeasible, it
    ranks last; a healthy trial is told its excess, an ASHA-stopped one too."""
    from optuna.samplers._tpe.sampler import _split_trials

    from sweeps.collapse_rule import Outcome
    from sweeps.search import constraint_value
    from sweeps.spec import Constraint

    bound = Constraint(metric="prior_kl_dim_max", max=1.0)
    assert constraint_value(bound, Outcome("collapsed", ""), {"prior_kl_dim_max": 0.03}) == math.inf
    assert constraint_value(bound, Outcome("completed", ""), {"prior_kl_dim_max": 7.5}) == pytest.approx(6.5)
    assert constraint_value(bound, Outcome("asha_stopped", ""), {"prior_kl_dim_max": 0.5}) == pytest.approx(-0.5)
    assert constraint_value(bound, Outcome("completed", ""), {}) == math.inf
    assert constraint_value(Constraint(metric="semantic_r2", min=0.2), Outcome("completed", ""),
                            {"semantic_r2": 0.5}) == pytest.approx(-0.3)

    study = optuna.create_study(directions=["maximize", "minimize"])
    beta = optuna.distributions.FloatDistribution(0.0, 1.0)
    for i, excess in enumerate([6.5, 16.7, 7.8]):  # healthy, all beyond the bound
        study.add_trial(optuna.trial.create_trial(params={"b": i / 10}, distributions={"b": beta},
                                                  values=[0.4, 0.1], system_attrs={"constraints:c": excess}))
    collapsed = {"state": optuna.trial.TrialState.PRUNED, "params": {"b": 0.9}, "distributions": {"b": beta}}
    study.add_trial(optuna.trial.create_trial(**collapsed, system_attrs={"constraints:c": -0.97}))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    good, _ = _split_trials(study, trials, 1)
    assert [t.number for t in good] == [3]  # the pinned hazard: a feasible collapsed trial is "good"
    study.add_trial(optuna.trial.create_trial(**collapsed, system_attrs={"constraints:c": math.inf}))
    trials = [t for t in study.get_trials() if t.number != 3]
    good, _ = _split_trials(study, trials, 2)
    assert [t.number for t in good] == [0, 2]  # the smallest excesses; the collapsed trial last


def test_tpe_ranks_pruned_trials_after_every_completed_one():
    """Collapsed trials are told PRUNED: Optuna 5's TPE must count them as bad, not ignore them.

    Pins the behaviour of Optuna's ``_split_trials`` (private; optuna is pinned below 6): the
    good group takes COMPLETE trials first and PRUNED ones only when too few trials completed.
    """
    from optuna.samplers._tpe.sampler import _split_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    beta = optuna.distributions.FloatDistribution(0.0, 1.0)
    for i in range(6):
        study.add_trial(optuna.trial.create_trial(params={"b": i / 10}, distributions={"b": beta}, values=[i, 1 - i / 10]))
    for i in range(4):
        study.add_trial(optuna.trial.create_trial(
            params={"b": 0.9 + i / 100}, distributions={"b": beta}, state=optuna.trial.TrialState.PRUNED,
        ))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(trials) == 10  # PRUNED trials are part of what TPE models
    good, bad = _split_trials(study, trials, 3)
    assert [t.number for t in good] == [3, 4, 5] and {t.number for t in bad} == {0, 1, 2, 6, 7, 8, 9}
    good, _ = _split_trials(study, trials, 7)  # more good slots than completed trials: one pruned joins
    assert [t.state.name for t in good].count("PRUNED") == 1
