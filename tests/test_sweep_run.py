"""Sweeps end to end, through ``python sweeps/run.py`` with a real Ray instance and a SQLite study.

1. The fast tier's session sweep (``conftest.session_sweep``): four enqueued trials on a 16^3
   phantom. One whose objective makes collapse the optimum (mean-reduced MSE with a large
   beta) stops early, exactly when the rule fires; one with the same objective whose KL weight
   warms up over the whole run never reaches full strength and is collapsed "at the end"; a
   sound one (a Gaussian likelihood with a small sigma^2) runs to the end; one whose sigma^2
   overflows the loss diverges. The study holds the same trials with matching states and
   reasons, nothing is left RUNNING, and the outputs (tables, report, best.yaml, each trial's
   config.yaml) agree with them.
2. (system) A sweep whose driver (and its Ray instance) is SIGKILLed while a trial runs, then
   ``--resume``d: it reaches the requested number of trials, runs no configuration twice, and
   the interrupted trial continues from its checkpoint.

Each Ray instance lives in its own short folder under /tmp with its own token file.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest
import yaml
from sqlalchemy.exc import OperationalError

from conftest import SESSION_CONSTRAINT, SESSION_EPOCHS, SESSION_RULE
from helpers import SMALL, kill_session, load_study, ray_env, read_csv, sweep_command, write_subject
from sweeps.collapse_rule import HISTORY_KEYS, CollapseRule, ScheduleTargets, collapse_streak, numeric_rows
from vae.config import load_experiment
from vae.run_files import CONFIG_YAML

STATES = {"completed": "COMPLETE", "collapsed": "PRUNED", "diverged": "FAIL"}
# The baseline VAE on SMALL's scale with a likelihood in the right units (no DIP keys: exp1 has no DIP).
SOUND_BASELINE = {**{k: v for k, v in SMALL.items() if not k.startswith("objective.dip")},
                  "objective.likelihood": "gaussian", "objective.sigma2": 0.05}
PICTURES = ("curves.png", "pareto.png", "rate_distortion.png", "params.png", "recon_best.png", "recon_audited.png")


# --------------------------------------------------------------------------- the session sweep


def test_collapsed_trials_stop_early_and_sound_ones_run_to_the_end(session_sweep):
    out_dir, done = session_sweep.out_dir, session_sweep.done
    rows = {row["enqueued"]: row for row in read_csv(out_dir / "trials.csv")}
    assert set(rows) == set(session_sweep.points)
    for name, (_, status) in session_sweep.points.items():
        row = rows[name]
        assert row["status"] == status, (name, row)
        epochs = int(row["epochs"])
        if name == "forced collapse":
            assert epochs == SESSION_RULE["patience"] < SESSION_EPOCHS
            assert row["stop_reason"] == "KL_raw <= 0.5 nats for 2 full-strength epochs up to epoch 2"
        elif name == "collapse at the end":
            assert epochs == SESSION_EPOCHS and row["stop_reason"].startswith("at the end: KL_raw <= 0.5 nats")
        elif name == "predicted collapse":
            assert epochs == 1 and row["stop_reason"].startswith("predicted: sigma^2_eff >= lambda_1")
        elif status == "completed":
            assert epochs == SESSION_EPOCHS
        else:
            assert epochs == 1 and "recon" in row["stop_reason"]
    assert rows["forced collapse"]["audited"] == "true" and rows["forced collapse"]["number"] == "0"
    assert "collapsed" in done.stdout and "trial-0000" in done.stdout  # the live table
    assert "makes collapse the optimum" in done.stderr  # mse_mean with beta up to 20 at 16^3
    # the start-up lines and the stop reason quote the same spectrum, the one recorded in sweep.json
    lambda_1 = json.loads((out_dir / "sweep.json").read_text())["spectrum"]["eigenvalues"][0]
    assert f"data spectrum over 8 training subjects: lambda_1..3 = {lambda_1:.3g}, " in done.stderr
    assert f"sigma^2_eff >= 2 x lambda_1 = {2 * lambda_1:.4g}" in done.stderr
    assert f"vs 2 x lambda_1 {lambda_1:.4g} of the data's spectrum" in rows["predicted collapse"]["stop_reason"]


def test_collapse_rule_fired_exactly_at_the_stop(session_sweep):
    """Recomputed from the run's own epochs: the streak reached the patience in the last epoch, not before."""
    out_dir = session_sweep.out_dir
    rule = CollapseRule(**SESSION_RULE)
    (row,) = [r for r in read_csv(out_dir / "trials.csv") if r["enqueued"] == "forced collapse"]
    targets = ScheduleTargets(float(row["param/objective.kl.beta"]), None, False)  # constant KL weight, no DIP
    history = numeric_rows(read_csv(out_dir / row["run_dir"] / "epochs.csv"), HISTORY_KEYS)
    assert [r["epoch"] for r in history] == list(range(1, int(row["epochs"]) + 1))
    assert collapse_streak(history, rule, targets) == rule.patience
    assert collapse_streak(history[:-1], rule, targets) < rule.patience
    (late,) = [r for r in read_csv(out_dir / "trials.csv") if r["enqueued"] == "collapse at the end"]
    late_history = numeric_rows(read_csv(out_dir / late["run_dir"] / "epochs.csv"), HISTORY_KEYS)
    assert all(r["kl_weight"] < 20.0 for r in late_history)  # never at full strength: no streak to stop it


def test_study_matches_the_trials_table(session_sweep):
    out_dir = session_sweep.out_dir
    study = load_study(out_dir)
    trials = {t.number: t for t in study.get_trials()}
    rows = read_csv(out_dir / "trials.csv")
    assert sorted(trials) == sorted(int(row["number"]) for row in rows) == list(range(len(session_sweep.points)))
    for row in rows:
        trial = trials[int(row["number"])]
        assert trial.state.name == STATES[row["status"]] == row["state"]
        assert trial.user_attrs["status"] == row["status"] and trial.user_attrs["stop_reason"] == row["stop_reason"]
        params = {"objective.kl.schedule": "constant", "objective.free_bits.floor": 0.0,
                  **session_sweep.points[row["enqueued"]][0]}
        assert trial.user_attrs["run_name"] == row["trial_id"] and trial.params == params
        if row["status"] == "completed":
            # told the last epoch's objectives: the semantic probe (max; the phantom has factors) and recon(mu) (min)
            assert trial.values == [float(row["final/semantic_r2"]), float(row["final/recon_mu"])]
        else:
            assert trial.values is None
        if row["status"] == "collapsed":  # breaks every constraint: TPE must never prefer it
            assert trial.constraints == {"prior_kl_dim_max": math.inf} and row["feasible"] == "false"
        elif row["state"] in ("COMPLETE", "PRUNED"):  # TPE models both: both carry the constraint
            excess = float(row["final/prior_kl_dim_max"]) - SESSION_CONSTRAINT["max"]
            assert trial.constraints == {"prior_kl_dim_max": pytest.approx(excess)}
            assert row["feasible"] == ("true" if excess <= 0 else "false")
        else:
            assert trial.constraints == {} and row["feasible"] == ""
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_outputs_of_a_sweep(session_sweep):
    out_dir = session_sweep.out_dir
    rows = read_csv(out_dir / "trials.csv")
    epochs = read_csv(out_dir / "epochs.csv")
    assert len(epochs) == sum(int(row["epochs"]) for row in rows)
    assert {e["trial_id"] for e in epochs} == {row["trial_id"] for row in rows}
    assert sorted(row["trial_id"] for row in rows) == [f"trial-{i:04d}" for i in range(len(rows))]  # no gaps
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status_counts"] == {"collapsed": 3, "completed": 1, "diverged": 1}
    assert summary["optuna_states"] == {"PRUNED": 3, "COMPLETE": 1, "FAIL": 1}
    assert summary["interrupted"] is False and summary["seed"] == 0
    best = summary["best"]
    assert best["trial_id"] == next(row["trial_id"] for row in rows if row["enqueued"] == "sound")
    cfg = load_experiment(out_dir / "best.yaml")  # ready for python -m trainables.single_run
    assert cfg.objective.likelihood == "gaussian" and cfg.objective.kl.beta == best["params"]["objective.kl.beta"]
    assert cfg.train.epochs == SESSION_EPOCHS and cfg.data.size == 16
    record = json.loads((out_dir / "sweep.json").read_text())
    assert record["seed"] == 0 and "resumes" not in record


def test_every_trial_folder_holds_its_experiment(session_sweep):
    """config.yaml is written before the first epoch (the diverged trial has one) and loads as that trial's experiment."""
    from sweeps.spec import Sweep

    out_dir = session_sweep.out_dir
    sweep = Sweep.from_record(json.loads((out_dir / "sweep.json").read_text()))
    for trial in load_study(out_dir).get_trials():
        path = out_dir / "trials" / trial.user_attrs["run_name"] / CONFIG_YAML
        assert load_experiment(path) == sweep.experiment_for(trial.params), path


def test_the_report_shows_the_sweep(session_sweep):
    report = session_sweep.out_dir / "report"
    page = (report / "index.html").read_text()
    for name in PICTURES:
        assert (report / name).read_bytes().startswith(b"\x89PNG"), name
        assert f'src="{name}"' in page
    assert "importances.png: semantic_r2: 1 completed trial(s) in the study; importances need 2 or more" in page
    best = page[page.index("Best trial (best.yaml)"):]
    best = best[:best.index("<h2>", 4)]
    sound = next(r for r in read_csv(session_sweep.out_dir / "trials.csv") if r["enqueued"] == "sound")
    assert f"<td>{sound['trial_id']}</td>" in best  # the trial best.yaml names


def test_data_without_factors_optimises_the_channel_information(scratch):
    """NIfTI subjects without segmentation: semantic_r2 cannot be probed, so the sweep says so and optimises
    its fallback, channel_nats, as recorded in sweep.json and told to the study."""
    data = scratch / "plain"
    for i in range(6):
        write_subject(data, f"BraTS2021_{i:05d}", seed=i, seg=False)
    raw = {"experiment": "exp1_baseline_vae", "overrides": {**SOUND_BASELINE, "data.val_fraction": 0.5},
           "space": {"objective.kl.beta": {"low": 0.01, "high": 0.1, "log": True}},
           "budget": {"num_samples": 1, "max_epochs": 1}, "resources": {"cpus_per_trial": 1}}
    path = scratch / "plain_sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run(sweep_command(path, scratch / "results", "--run", "r1", "--data", str(data)),
                          env=ray_env(scratch), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "objective semantic_r2 (max) is channel_nats instead" in done.stderr
    assert "no validation subject has a segmentation" in done.stderr
    out_dir = scratch / "results" / "plain_sweep" / "r1"
    record = json.loads((out_dir / "sweep.json").read_text())
    assert [o["metric"] for o in record["spec"]["objectives"]] == ["channel_nats", "recon_mu"]
    (trial,) = load_study(out_dir).get_trials()
    (row,) = read_csv(out_dir / "trials.csv")
    assert trial.values == [float(row["final/channel_nats"]), float(row["final/recon_mu"])]
    assert float(row["final/semantic_r2"]) == 0.0 and float(read_csv(out_dir / row["run_dir"] / "epochs.csv")[0][
        "probe_subjects"]) == 0.0


# --------------------------------------------------------------------------- kill and resume (system)


@pytest.mark.system
def test_resume_after_the_driver_is_killed(scratch):
    samples, epochs = 3, 3
    raw = {
        "experiment": "exp2_dipvae_sbd",
        "overrides": {**SMALL, "objective.likelihood": "gaussian"},
        "space": {"objective.kl.beta": {"low": 0.01, "high": 0.1, "log": True},
                  "objective.sigma2": {"low": 0.001, "high": 0.01, "log": True}},
        # one trial at a time: the kill comes while the second one runs
        "resources": {"cpus_per_trial": os.cpu_count() or 2},
        "budget": {"num_samples": samples, "max_epochs": epochs},
    }
    path = scratch / "resume_test.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    results = scratch / "results"
    out_dir = results / "resume_test" / "r1"
    log = scratch / "resume_first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            sweep_command(path, results, "--run", "r1", "--seed", "5"), env=ray_env(scratch), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def mid_trial() -> bool:
        """A trial finished, and another one has run an epoch (its checkpoint is written before its row)."""
        if not (out_dir / "study.db").exists():
            return False
        try:
            trials = load_study(out_dir).get_trials()
        except (FileNotFoundError, KeyError, OperationalError):  # the driver is still creating the study
            return False
        running = [t for t in trials if t.state.name == "RUNNING" and "run_name" in t.user_attrs]
        return any(t.state.name == "COMPLETE" for t in trials) and any(
            (out_dir / "trials" / t.user_attrs["run_name"] / "epochs.csv").exists() for t in running
        )

    try:
        deadline = time.monotonic() + 300
        while not mid_trial():
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
    finally:
        kill_session(driver.pid)
        driver.wait()
    orphans = [t for t in load_study(out_dir).get_trials() if t.state.name == "RUNNING"]
    assert orphans, "the kill left no trial RUNNING"

    done = subprocess.run(
        sweep_command(path, results, "--resume"), env=ray_env(scratch), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "continuing interrupted trials" in done.stdout

    trials = load_study(out_dir).get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    counted = [t for t in trials if t.user_attrs.get("status") != "interrupted"]
    assert len(counted) == samples and all(t.state.name == "COMPLETE" for t in counted)
    params = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(params)) == samples  # no configuration ran twice
    for orphan in orphans:
        closed = next(t for t in trials if t.number == orphan.number)
        assert closed.state.name == "FAIL" and closed.user_attrs["status"] == "interrupted"
        successor = next(t for t in trials if t.user_attrs.get("continues") == orphan.number)
        assert successor.params == orphan.params and successor.user_attrs["run_name"] == orphan.user_attrs["run_name"]
        assert successor.user_attrs["first_epoch"] > 1  # continued from its checkpoint
        history = read_csv(out_dir / "trials" / orphan.user_attrs["run_name"] / "epochs.csv")
        assert [int(r["epoch"]) for r in history] == list(range(1, epochs + 1))
    rows = read_csv(out_dir / "trials.csv")
    assert len(rows) == samples and len({r["trial_id"] for r in rows}) == samples
    assert {r["status"] for r in rows} == {"completed"}
