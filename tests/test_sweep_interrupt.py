"""Ctrl-C on a running sweep, then the same command line again with --resume, as a user does it.

The driver is started in a session of its own and the whole session gets SIGINT, as a terminal
sends it to its foreground job, once two trials each have an epoch written. The sweep must end
with exit status 130, its outputs written, no trial left RUNNING, and its own resume command as
the last thing it prints (never Tune's ``Tuner.restore``). The original command line with
``--resume`` added is accepted (the same values), the interrupted trials continue from their
checkpoints under the same names, every epoch is written once, and the trials are numbered
without gaps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from helpers import (
    SOUND, finish, load_study, read_csv, start_sweep, sweep_command, wait_for, write_sweep,
)
from vae.run_files import read_epochs

pytestmark = pytest.mark.system
SAMPLES, EPOCHS = 3, 6


def two_trials_in_flight(out_dir) -> bool:
    histories = [read_epochs(out_dir / "trials" / name) for name in ("trial-0000", "trial-0001")]
    return all(rows and rows[-1].get("status") == "running" for rows in histories)


def test_ctrl_c_then_resume_with_the_same_command_line(scratch, sweep_env):
    space = {"objective.kl.beta": {"low": 0.01, "high": 0.1, "log": True},
             "objective.sigma2": {"low": 0.001, "high": 0.01, "log": True}}
    overrides = {key: value for key, value in SOUND.items() if key != "objective.sigma2"}
    path = write_sweep(scratch, "interrupted", overrides, space, {"cpus_per_trial": 1},
                       {"num_samples": SAMPLES, "max_epochs": EPOCHS})
    results, log = scratch / "results", scratch / "interrupted.log"
    out_dir = results / "interrupted" / "r1"
    options = ("--run", "r1", "--max-epochs", str(EPOCHS), "data.size=16")  # repeated on --resume

    driver = start_sweep(path, results, log, sweep_env(), *options)
    try:
        wait_for(lambda: two_trials_in_flight(out_dir), driver, log, timeout=400)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground job
    finally:
        text = finish(driver, log, timeout=300, expected=130)

    assert "Tuner.restore" not in text and "Traceback" not in text
    advice = f"python sweeps/run.py interrupted --resume --run r1 --results {results}"
    assert text.rstrip().splitlines()[-1].strip() == advice  # the last thing printed: what to type
    assert "Continue with:" in text
    study = load_study(out_dir)
    assert not [t for t in study.get_trials() if t.state.name == "RUNNING"]
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("status") == "interrupted"]
    assert len(interrupted) >= 2 and all("Ctrl-C" in t.user_attrs["stop_reason"] for t in interrupted)
    rows = {row["trial_id"]: row for row in read_csv(out_dir / "trials.csv")}
    assert {rows[t.user_attrs["run_name"]]["status"] for t in interrupted} == {"interrupted"}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["interrupted"] is True

    # The same command line again, with --resume: identical values are no change.
    done = subprocess.run(sweep_command(path, results, *options, "--resume"), env=sweep_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    continued = {t.user_attrs["run_name"] for t in interrupted}
    assert "continuing interrupted trials" in done.stdout and all(name in done.stdout for name in continued)

    trials = load_study(out_dir).get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    counted = [t for t in trials if t.user_attrs.get("status") != "interrupted"]
    assert len(counted) == SAMPLES and {t.user_attrs["status"] for t in counted} == {"completed"}
    names = sorted(t.user_attrs["run_name"] for t in counted)
    assert names == [f"trial-{i:04d}" for i in range(SAMPLES)]  # no gap, whatever Optuna's numbers
    for trial in interrupted:
        (successor,) = [t for t in counted if t.user_attrs.get("continues") == trial.number]
        assert successor.user_attrs["run_name"] == trial.user_attrs["run_name"] and successor.params == trial.params
        assert successor.user_attrs["first_epoch"] > 1  # from its checkpoint
    for name in names:
        assert [int(r["epoch"]) for r in read_epochs(out_dir / "trials" / name)] == list(range(1, EPOCHS + 1))
    record = json.loads((out_dir / "sweep.json").read_text())
    (resumed,) = record["resumes"]
    assert isinstance(record["seed"], int) and isinstance(resumed["seed"], int) and resumed["seed"] != record["seed"]
    rows = read_csv(out_dir / "trials.csv")
    assert sorted(row["trial_id"] for row in rows) == names and {row["status"] for row in rows} == {"completed"}
