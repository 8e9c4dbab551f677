"""Faults, with nothing lost: real processes SIGKILLed at the worst moment, then what is left checked.

1. A trial's training process killed in the middle of an epoch, with one worker (Tune
   retries the trial) and with two DDP workers (Ray Train restarts its worker group):
   the trial continues from its last checkpoint, ends with all its epochs, each one
   reported and written to ``epochs.csv`` exactly once, and the study holds one trial.
2. The sweep's driver killed while two trials run side by side, then ``--resume``d: the
   requested number of trials ran, none twice and none lost, and ``trials.csv`` says what
   the study says, trial by trial.
3. A new study database opened by several processes at once (the driver creating it while
   a report or a dashboard opens it) opens for all of them.
4. ``python -m vae.data prepare`` killed half-way: no manifest, no half-written array; a
   re-run reuses what was finished, clears the leftovers and leaves a valid cache.

The single-run CLI killed with its trial is covered by
``test_trainables.py::test_cli_run_resumes_after_its_trial_and_then_itself_are_killed``,
a killed driver with one trial at a time by ``test_sweep_run.py``. Every sweep runs on its
own Ray instance (short folder under /tmp, own token) on the 16^3 phantom.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from bench.chaos import DDP_WORKER, TRIAL_PROCESS, session_members
from sweeps.outputs import TABLE_HEADER
from sweeps.service import PROCESS_DIED, failure_reason, open_storage
from helpers import (
    BETA, CHANNELS, SOUND, brain, finish, kill_session, load_study, mid_sweep, read_csv, start_sweep,
    sweep_command, wait_for, write_subject, write_sweep,
)
from vae.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE
from vae.data import CachedVolumes, PreprocessParams
from vae.data.cache import MANIFEST
from vae.run_files import EPOCHS_CSV, read_epochs

REPO = Path(__file__).resolve().parents[1]
PARAM_COLUMN = "param/"


def live_epochs(log: str, trial_id: str) -> list[int]:
    """The epochs of ``trial_id`` in the live table, in the order Tune received them (the table
    printed at the end, after the second header, is left out)."""
    live = (log.split(TABLE_HEADER) + ["", ""])[1]
    return [int(line.split()[1].split("/")[0]) for line in live.splitlines()
            if line.startswith(f"{trial_id} ") and line.split()[5] != "restarting"]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_mid_epoch(driver: subprocess.Popen, run_dir: Path, log: Path, title: str) -> list[int]:
    """SIGKILL the newest process titled ``title`` in the middle of an epoch, once Tune holds a checkpoint.

    Waits until Tune has received an epoch (with its checkpoint) and the next epoch after it has
    been written, then until the process has computed for a third of an epoch's time since that
    row: evidence that it is inside the next epoch. Returns the epochs Tune had received.
    """
    rows = lambda: len(read_epochs(run_dir))  # noqa: E731
    wait_for(lambda: live_epochs(log.read_text(), run_dir.name), driver, log, timeout=400)
    written = rows()
    wait_for(lambda: rows() > written, driver, log, timeout=120)
    written = rows()
    assert (run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    targets = [pid for pid, command in session_members(driver.pid) if re.match(title, command)]
    assert targets, session_members(driver.pid)
    target = max(targets)
    started, epoch_seconds = cpu_seconds(target), float(read_epochs(run_dir)[-1]["epoch_seconds"])
    wait_for(lambda: cpu_seconds(target) - started >= 0.3 * epoch_seconds, driver, log, timeout=120)
    received = live_epochs(log.read_text(), run_dir.name)
    os.kill(target, signal.SIGKILL)
    assert rows() == written, "the kill came after the epoch had ended, not in the middle of it"
    return received


# --------------------------------------------------------------------------- worker death


@pytest.mark.system
@pytest.mark.parametrize("workers, title", [(1, TRIAL_PROCESS), (2, DDP_WORKER)], ids=["one-worker", "ddp-worker"])
def test_a_trial_killed_mid_epoch_continues_from_its_checkpoint(scratch, sweep_env, workers, title):
    epochs = 5  # Tune may receive an epoch while the next one is written: one more to kill in
    name = f"worker_kill_{workers}"
    resources = {"workers_per_trial": workers, "cpus_per_trial": 0.99 * workers, "max_failures": 1}
    path = write_sweep(scratch, name, SOUND, BETA, resources, {"num_samples": 1, "max_epochs": epochs})
    results, log = scratch / "results", scratch / f"{name}.log"
    out_dir = results / name / "r1"
    run_dir = out_dir / "trials" / "trial-0000"

    driver = start_sweep(path, results, log, sweep_env(), "--run", "r1")
    try:
        received = kill_mid_epoch(driver, run_dir, log, title)
    finally:
        text = finish(driver, log, timeout=500)

    assert received[0] == 1 and received[-1] < epochs
    # Continued from the checkpoint Tune held, not started over: every epoch received once, in order.
    assert live_epochs(text, "trial-0000") == list(range(1, epochs + 1)), text[-3000:]
    if workers == 1:  # Tune restarted the trial: one line says so and why, instead of Ray's traceback
        lines = [line for line in text.split(TABLE_HEADER)[1].splitlines() if line.startswith("trial-0000 ")]
        (restart,) = [i for i, line in enumerate(lines) if line.split()[5] == "restarting"]
        checkpoint = int(lines[restart - 1].split()[1].split("/")[0])  # the last epoch Tune received
        assert re.search(rf"its process died \(killed, out of memory or its node lost\); restarted from its "
                         rf"checkpoint of epoch {checkpoint} \(failure 1 of the 1 resources.max_failures allows\)",
                         text), text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    assert [int(r["epoch"]) for r in read_epochs(run_dir)] == list(range(1, epochs + 1))
    (trial,) = load_study(out_dir).get_trials()  # one Optuna trial: the retry is the same trial
    assert trial.state.name == "COMPLETE" and trial.user_attrs["status"] == "completed"
    assert all(math.isfinite(v) for v in trial.values)
    (row,) = read_csv(out_dir / "trials.csv")
    assert (row["status"], int(row["epochs"]), int(row["number"])) == ("completed", epochs, 0)


# --------------------------------------------------------------------------- driver death


@pytest.mark.system
def test_driver_killed_with_two_trials_in_flight_resumes_without_duplicate_or_loss(scratch, sweep_env):
    # A new trial's process takes seconds to start here: with 16 epochs each, the third and fourth
    # trials run side by side for many epochs after the first two have completed.
    samples, epochs = 4, 16
    space = {**BETA, "objective.sigma2": {"low": 0.001, "high": 0.01, "log": True}}
    overrides = {key: value for key, value in SOUND.items() if key != "objective.sigma2"}
    path = write_sweep(scratch, "driver_kill", overrides, space, {"cpus_per_trial": 1},
                       {"num_samples": samples, "max_epochs": epochs})
    results, log = scratch / "results", scratch / "driver_kill.log"
    out_dir = results / "driver_kill" / "r1"

    driver = start_sweep(path, results, log, sweep_env(), "--run", "r1")
    try:
        wait_for(lambda: mid_sweep(out_dir), driver, log, timeout=500)
    finally:
        kill_session(driver.pid)
        driver.wait()
    before = load_study(out_dir).get_trials()
    orphans = [t for t in before if t.state.name == "RUNNING"]
    assert len(orphans) >= 2  # and a third, when a trial's end had not reached the study yet

    done = subprocess.run(sweep_command(path, results, "--resume"), env=sweep_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    trials = load_study(out_dir).get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # Every trial finished before the kill is still there, unchanged.
    for old in before:
        if old.state.name != "RUNNING":
            now = trials[old.number]
            assert (now.state, now.params, now.values, now.user_attrs) == (old.state, old.params, old.values,
                                                                          old.user_attrs)
    # No loss: each interrupted trial is closed and continued by exactly one later trial, in its run directory.
    for orphan in orphans:
        closed = trials[orphan.number]
        assert closed.state.name == "FAIL" and closed.user_attrs["status"] == "interrupted"
        (successor,) = [t for t in trials if t.user_attrs.get("continues") == orphan.number]
        assert successor.params == orphan.params and successor.user_attrs["run_name"] == orphan.user_attrs["run_name"]
        assert successor.state.name == "COMPLETE" and successor.user_attrs["first_epoch"] > 1  # from its checkpoint
    # No duplicate: the trials that count are the requested number, each its own run and configuration.
    counted = [t for t in trials if t.user_attrs.get("status") != "interrupted"]
    assert [t.user_attrs["status"] for t in counted] == ["completed"] * samples
    assert sorted(t.user_attrs["run_name"] for t in counted) == [f"trial-{i:04d}" for i in range(samples)]
    assert len({tuple(sorted(t.params.items())) for t in counted}) == samples
    assert len(trials) == samples + len(orphans)

    # trials.csv agrees with the study, trial by trial, and with each trial's own epochs.
    rows = {row["trial_id"]: row for row in read_csv(out_dir / "trials.csv")}
    assert set(rows) == {t.user_attrs["run_name"] for t in counted}
    for trial in counted:
        row = rows[trial.user_attrs["run_name"]]
        assert (int(row["number"]), row["state"], row["status"]) == (trial.number, trial.state.name,
                                                                    trial.user_attrs["status"])
        params = {key[len(PARAM_COLUMN):]: value for key, value in row.items() if key.startswith(PARAM_COLUMN)}
        assert {k: v for k, v in params.items() if v != ""} == {k: str(v) for k, v in trial.params.items()}
        # the default objectives: the semantic probe (the phantom has factors) and recon(mu)
        assert trial.values == [pytest.approx(float(row["final/semantic_r2"])),
                                pytest.approx(float(row["final/recon_mu"]))]
        history = read_epochs(out_dir / row["run_dir"])
        assert [int(r["epoch"]) for r in history] == list(range(1, epochs + 1)) and int(row["epochs"]) == epochs
    assert len(read_csv(out_dir / EPOCHS_CSV)) == samples * epochs


def test_a_new_study_database_opened_by_many_at_once_opens_for_all(tmp_path):
    """The driver creating a sweep's database while others open it (a report, a dashboard): Optuna
    checks for each table, then creates it, so one opener's table or version row makes another's
    creation fail; without a retry, 8 openers failed in 10 rounds out of 10."""
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'study{round_}.db'}"
        start, failures = threading.Barrier(8), []

        def opener() -> None:
            start.wait()
            try:
                open_storage(url)
            except Exception as err:  # noqa: BLE001 - any failure counts
                failures.append(repr(err))

        threads = [threading.Thread(target=opener) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert optuna.get_all_study_names(storage=url) == []  # a whole, empty schema


# --------------------------------------------------------------------------- interrupted preparation


def prepare_command(raw: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "vae.data", "prepare", str(raw), "--out", str(cache), "--size", "16",
            "--workers", "2", "--quiet"]


@pytest.mark.system
def test_prepare_killed_half_way_leaves_no_partial_cache_and_a_rerun_completes(tmp_path):
    subjects = 40
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    shape = (64, 72, 56)  # big enough that preparing 40 subjects takes seconds
    volumes = {m: brain(shape=shape, channel=c) for c, m in enumerate(CHANNELS)}
    for i in range(subjects):
        write_subject(raw, f"s{i:02d}", volumes=volumes, seg=False)

    first = subprocess.Popen(prepare_command(raw, cache), cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    arrays = lambda: list(cache.glob("s*.npy"))  # noqa: E731
    deadline = time.monotonic() + 120
    while len(arrays()) < subjects // 4:
        assert first.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the command and its worker processes, as a cancelled job is killed
    first.wait()

    written = arrays()
    assert subjects // 4 <= len(written) < subjects, "killed too late to be half-way"
    assert not (cache / MANIFEST).exists()  # no manifest describes a cache that is not whole
    for array in written:  # every array in place is whole: written aside and renamed
        assert np.load(array).shape == (len(CHANNELS), 16, 16, 16)
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in cache.iterdir()
               if p.suffix not in (".npy", ".json"))
    finished = [p.stem for p in cache.glob("s*.json")]  # an entry is written after its array

    again = subprocess.run(prepare_command(raw, cache), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{subjects} subjects in" in again.stdout and f"{len(finished)} reused" in again.stdout
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [MANIFEST] + [f"s{i:02d}{ext}" for i in range(subjects) for ext in (".json", ".npy")]
    )
    manifest = json.loads((cache / MANIFEST).read_text())
    assert len(manifest["subjects"]) == subjects
    assert manifest["params_hash"] == PreprocessParams(size=16).hash
    volumes_read = CachedVolumes(cache)
    assert len(volumes_read) == subjects and volumes_read[subjects - 1].shape == (len(CHANNELS), 16, 16, 16)


# --------------------------------------------------------------------------- what the table says of a failed trial


def error_txt(*errors: BaseException) -> str:
    """A trial's Tune ``error.txt`` after these failures, written as Tune writes it."""
    return "".join(f"Failure # {i} (occurred at 2026-11-29_22-00-00)\n{error}\n" for i, error in enumerate(errors, 1))


def test_a_failure_is_named_by_its_process_death_or_what_the_trial_raised():
    import traceback

    from ray.exceptions import ActorDiedError, RayTaskError

    try:
        raise ValueError("the loss is NaN at epoch 3")
    except ValueError as err:
        raised = RayTaskError("run_trial", traceback.format_exc(), err)
    assert failure_reason(error_txt(ActorDiedError())) == PROCESS_DIED
    assert failure_reason(error_txt(ActorDiedError(), raised)) == "it raised ValueError: the loss is NaN at epoch 3"
    assert failure_reason(error_txt(raised, ActorDiedError())) == PROCESS_DIED  # the newest failure counts
    assert failure_reason("") == "it failed"
