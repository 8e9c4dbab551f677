"""Sweeps end to end, through ``python sweeps/run.py`` with a real Ray instance and a SQLite study.

1. Five enqueued trials on a 16^3 phantom: two whose objective makes collapse the optimum
   (mean-reduced MSE with a large beta), two sound ones (a Gaussian likelihood with a small
   sigma^2) and one whose sigma^2 overflows the loss. The collapsed ones stop early, exactly
   when the rule fires; the sound ones run to the end; the study holds the same trials with
   matching states and reasons, and no trial is left RUNNING.
2. A sweep whose driver (and its Ray instance) is SIGKILLed while a trial runs, then
   ``--resume``d: it reaches the requested number of trials, runs no configuration twice,
   and the interrupted trial continues from its checkpoint.

Each Ray instance lives in its own short folder under /tmp with its own token file.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from sqlalchemy.exc import OperationalError

from conftest import ray_folder
from sweeps.stopping import HISTORY_KEYS, CollapseRule, ScheduleTargets, collapse_streak, numeric_rows
from vae.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
RULE = {"au_min": 0, "kl_min": 0.5, "patience": 2, "grace_epochs": 0}
SMALL = {
    "data.size": 16, "data.modalities": ["t1c", "t2f"], "data.batch_size": 2, "data.num_workers": 0,
    "data.val_fraction": 0.34, "data.phantom.subjects": 12,
    "model.z_dim": 8, "model.base_filters": 4, "model.depth": 2, "model.norm_groups": 2, "model.broadcast_grid": 4,
    # DIP-II from the start, at full weight from the second epoch on.
    "objective.dip.start_epoch": 0.0, "objective.dip.warmup_epochs": 1.0,
    "optim.lr": 3.0e-3, "train.mixed_precision": False, "train.checkpoint_every": 1, "train.image_every": 10,
}
SPACE = {
    "objective.likelihood": {"choices": ["mse_mean", "gaussian"]},
    "objective.kl.beta": {"low": 0.01, "high": 20.0, "log": True},
    "objective.sigma2": {"low": 1e-38, "high": 1.0, "log": True, "when": {"objective.likelihood": "gaussian"}},
}
POINTS = {  # name: (params, expected status)
    "forced collapse": ({"objective.likelihood": "mse_mean", "objective.kl.beta": 20.0}, "collapsed"),
    "sound": ({"objective.likelihood": "gaussian", "objective.kl.beta": 0.01, "objective.sigma2": 0.001}, "completed"),
    # (x - x_hat)^2 / 2e-38 overflows float32 in the first step
    "overflowing": ({"objective.likelihood": "gaussian", "objective.kl.beta": 0.01, "objective.sigma2": 1e-38}, "diverged"),
    "forced collapse 2": ({"objective.likelihood": "mse_mean", "objective.kl.beta": 10.0}, "collapsed"),
    "sound 2": ({"objective.likelihood": "gaussian", "objective.kl.beta": 0.03, "objective.sigma2": 0.01}, "completed"),
}
STATES = {"completed": "COMPLETE", "collapsed": "PRUNED", "diverged": "FAIL"}


def ray_env(scratch: Path) -> dict[str, str]:
    """The environment of one sweep driver: its own Ray folder and token, the shared data cache."""
    return {**os.environ, **ray_folder(), "COLLAPSE_SWEEP_CACHE": str(scratch / "cache")}


def sweep_command(path: Path, results: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / "run.py"), str(path), "--results", str(results), "--no-dashboard", *args]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load_study(out_dir: Path) -> optuna.Study:
    record = json.loads((out_dir / "sweep.json").read_text())
    return optuna.load_study(study_name=record["study"], storage=f"sqlite:///{out_dir / 'study.db'}")


# --------------------------------------------------------------------------- collapse vs sound


@pytest.fixture(scope="module")
def collapse_sweep(scratch):
    raw = {
        "experiment": "exp2_dipvae_sbd", "overrides": SMALL, "space": SPACE,
        "early_stop": {"mode": "collapse", "collapse": RULE},
        "resources": {"cpus_per_trial": 1}, "budget": {"num_samples": len(POINTS), "max_epochs": EPOCHS},
        "enqueue": [{"name": name, "audited": name == "forced collapse", "params": params}
                    for name, (params, _) in POINTS.items()],
    }
    path = scratch / "collapse_test.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    results = scratch / "results"
    done = subprocess.run(
        sweep_command(path, results, "--run", "r1", "--seed", "0"), env=ray_env(scratch), capture_output=True,
        text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return results / "collapse_test" / "r1", done


def test_collapsed_trials_stop_early_and_sound_ones_run_to_the_end(collapse_sweep):
    out_dir, done = collapse_sweep
    rows = {row["enqueued"]: row for row in read_csv(out_dir / "trials.csv")}
    assert set(rows) == set(POINTS)
    for name, (_, status) in POINTS.items():
        row = rows[name]
        assert row["status"] == status, (name, row)
        epochs = int(row["epochs"])
        if status == "collapsed":
            assert 2 <= epochs < EPOCHS and "AU <= 0 and KL_raw <= 0.5" in row["stop_reason"]
        elif status == "completed":
            assert epochs == EPOCHS
        else:
            assert epochs == 1 and "recon" in row["stop_reason"]
    assert rows["forced collapse"]["audited"] == "true" and rows["forced collapse"]["number"] == "0"
    assert "collapsed" in done.stdout and "trial-0000" in done.stdout  # the live table
    assert "makes collapse the optimum" in done.stderr  # mse_mean with beta up to 20 at 16^3


def test_collapse_rule_fired_exactly_at_the_stop(collapse_sweep):
    """Recomputed from the run's own epochs: the streak reached the patience in the last epoch, not before."""
    out_dir, _ = collapse_sweep
    rule = CollapseRule(**RULE)
    for row in read_csv(out_dir / "trials.csv"):
        if row["status"] != "collapsed":
            continue
        # exp2's constant KL weight at beta, no capacity annealing, DIP-II
        targets = ScheduleTargets(float(row["param/objective.kl.beta"]), None, True)
        history = numeric_rows(read_csv(out_dir / row["run_dir"] / "epochs.csv"), HISTORY_KEYS)
        assert [r["epoch"] for r in history] == list(range(1, int(row["epochs"]) + 1))
        assert history[0]["dip_weight"] < 1  # the first epoch ran before DIP reached full strength
        assert collapse_streak(history, rule, targets) == rule.patience
        assert collapse_streak(history[:-1], rule, targets) < rule.patience


def test_study_matches_the_trials_table(collapse_sweep):
    out_dir, _ = collapse_sweep
    study = load_study(out_dir)
    trials = {t.number: t for t in study.get_trials()}
    rows = read_csv(out_dir / "trials.csv")
    assert sorted(trials) == sorted(int(row["number"]) for row in rows) == list(range(len(POINTS)))
    for row in rows:
        trial = trials[int(row["number"])]
        assert trial.state.name == STATES[row["status"]] == row["state"]
        assert trial.user_attrs["status"] == row["status"] and trial.user_attrs["stop_reason"] == row["stop_reason"]
        assert trial.user_attrs["run_name"] == row["trial_id"] and trial.params == POINTS[row["enqueued"]][0]
        if row["status"] == "completed":
            # told the last epoch's objectives: AU (max) and recon(mu) (min)
            assert trial.values == [float(row["final/au"]), float(row["final/recon_mu"])]
        else:
            assert trial.values is None
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_outputs_of_a_sweep(collapse_sweep):
    out_dir, _ = collapse_sweep
    rows = read_csv(out_dir / "trials.csv")
    epochs = read_csv(out_dir / "epochs.csv")
    assert len(epochs) == sum(int(row["epochs"]) for row in rows)
    assert {e["trial_id"] for e in epochs} == {row["trial_id"] for row in rows}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status_counts"] == {"collapsed": 2, "completed": 2, "diverged": 1}
    assert summary["optuna_states"] == {"PRUNED": 2, "COMPLETE": 2, "FAIL": 1}
    best = summary["best"]
    assert best["trial_id"] in {row["trial_id"] for row in rows if row["status"] == "completed"}
    cfg = load_experiment(out_dir / "best.yaml")  # ready for python -m trainables.train
    assert cfg.objective.likelihood == "gaussian" and cfg.objective.kl.beta == best["params"]["objective.kl.beta"]
    assert cfg.train.epochs == EPOCHS and cfg.data.size == 16


# --------------------------------------------------------------------------- kill and resume


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (the CLI, started with ``start_new_session``, and its Ray instance)."""
    for _ in range(20):
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
                if int(sid) == session and state != "Z":  # a zombie is dead already
                    members.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"processes of session {session} survived SIGKILL")


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
