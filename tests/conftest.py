"""Fixtures shared by the test modules (plain helpers are in helpers.py).

Two tiers: plain ``pytest`` runs the fast one; ``pytest -m system`` the system tests (kills and
resumes, DDP trials, the local cluster, the load sweep, the whole bad-input set as
subprocesses, the shipped smoke sweeps and benchmark replays), marked ``system``.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import RAY_FOLDERS, SMALL, ray_env, sweep_command, write_yaml


@pytest.fixture(scope="module")
def scratch():
    """A short module-wide folder under /tmp, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def remove_ray_folders():
    """Every Ray instance's temp folder (logs, sessions) goes when the test session ends."""
    yield
    for folder in RAY_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sweep_env(scratch):
    """Makes the environment of a sweep driver: its own Ray folder, the shared data cache."""
    return lambda: ray_env(scratch)


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything starts (or joins) Ray: bad input must be refused before that."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


# --------------------------------------------------------------------------- one real sweep for the fast tier

SESSION_EPOCHS = 3
SESSION_RULE = {"kl_min": 0.5, "patience": 2, "grace_epochs": 0}
SESSION_OBJECTIVES = [{"metric": "semantic_r2", "mode": "max", "without_factors": "channel_nats"},
                      {"metric": "recon_mu", "mode": "min"}]
SESSION_CONSTRAINT = {"metric": "prior_kl_dim_max", "max": 100.0}
# name: (params, status it ends with). No DIP, so every epoch is at full strength unless the KL warms up.
SESSION_POINTS = {
    # mean-reduced MSE at beta 20: collapsed from the first epoch; the rule stops it after two
    "forced collapse": ({"objective.likelihood": "mse_mean", "objective.kl.beta": 20.0}, "collapsed"),
    "sound": ({"objective.likelihood": "gaussian", "objective.kl.beta": 0.01, "objective.sigma2": 0.001}, "completed"),
    # (x - x_hat)^2 / 2e-38 overflows float32 in the first step
    "overflowing": ({"objective.likelihood": "gaussian", "objective.kl.beta": 0.01, "objective.sigma2": 1e-38},
                    "diverged"),
    # the KL weight warms up over the whole run: never at full strength, collapsed when the budget ends;
    # its free bits (0.1 x 8 dims > kl_min) exempt it from the prediction, so the rule judges it
    "collapse at the end": ({"objective.likelihood": "mse_mean", "objective.kl.beta": 20.0,
                             "objective.kl.schedule": "linear", "objective.free_bits.floor": 0.1}, "collapsed"),
    # as "forced collapse" but not the audited point (other parameters): predicted from the data's spectrum,
    # stopped after epoch 1
    "predicted collapse": ({"objective.likelihood": "mse_mean", "objective.kl.beta": 10.0}, "collapsed"),
}


@dataclass(frozen=True)
class SessionSweep:
    out_dir: Path
    done: subprocess.CompletedProcess
    points: dict


@pytest.fixture(scope="session")
def session_sweep(tmp_path_factory) -> SessionSweep:
    """One real sweep (real Ray, SQLite study, 16^3 phantom) of four enqueued trials x 3 epochs, run once
    through ``python sweeps/run.py``; several fast tests read its outputs."""
    folder = tmp_path_factory.mktemp("session-sweep")
    raw = {
        "experiment": "exp1_baseline_vae",
        "overrides": {**{k: v for k, v in SMALL.items() if not k.startswith("objective.dip")},
                      "objective.kl.warmup_epochs": float(SESSION_EPOCHS)},
        "space": {
            "objective.likelihood": {"choices": ["mse_mean", "gaussian"]},
            "objective.kl.beta": {"low": 0.01, "high": 20.0, "log": True},
            "objective.sigma2": {"low": 1e-38, "high": 1.0, "log": True, "when": {"objective.likelihood": "gaussian"}},
            "objective.kl.schedule": {"choices": ["constant", "linear"]},
            "objective.free_bits.floor": {"choices": [0.0, 0.1]},
        },
        "objectives": SESSION_OBJECTIVES,
        # beta 0.01 at sigma^2 0.001 spreads the "sound" code to ~23 nats from the prior in one dimension:
        # a bound it meets, so that the sweep has a best trial (the selection tests cover one it breaks)
        "constraints": [SESSION_CONSTRAINT],
        "early_stop": {"mode": "collapse", "collapse": SESSION_RULE},
        "resources": {"cpus_per_trial": 1},
        "budget": {"num_samples": len(SESSION_POINTS), "max_epochs": SESSION_EPOCHS},
        "enqueue": [{"name": name, "audited": name == "forced collapse",
                     "params": {"objective.kl.schedule": "constant", "objective.free_bits.floor": 0.0, **params}}
                    for name, (params, _) in SESSION_POINTS.items()],
    }
    path = write_yaml(folder / "session.yaml", raw)
    env = ray_env(folder)
    try:
        done = subprocess.run(sweep_command(path, folder / "results", "--run", "r1", "--seed", "0"), env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return SessionSweep(folder / "results" / "session" / "r1", done, SESSION_POINTS)

