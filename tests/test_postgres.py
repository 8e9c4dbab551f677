"""Studies on a real PostgreSQL server (Debian's ``postgresql``, started here as its own user on 127.0.0.1).

A sweep keeps its study on the server; two sweeps share the server without touching each other's
study; a driver SIGKILLed mid-sweep resumes from the server with nothing lost or repeated while
optuna-dashboard reads the study; bad storage input (wrong password, missing database, no server)
is one line and exit 2.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import json
import socket
import subprocess
import sys
import time
import urllib.request
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import psycopg
import pytest

from helpers import (
    BETA, SMALL, SOUND, finish, kill_session, mid_sweep, ray_env, read_csv, start_sweep, wait_for, write_sweep,
)
from sweeps.run import main

pytestmark = pytest.mark.system
USER, DATABASE = "sweeper", "sweeps"
SERVER_TIMEOUT_S = 60


def _server_binaries() -> tuple[str, str]:
    """``initdb`` and ``pg_ctl`` on PATH or in Debian's versioned folder."""
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if not all(found):
        folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        found = [f"{folders[-1]}/initdb", f"{folders[-1]}/pg_ctl"] if folders else found
    if not all(found):
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    return found[0], found[1]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=SERVER_TIMEOUT_S)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server with password authentication and the database ``sweeps``; torn down after."""
    initdb, pg_ctl = _server_binaries()
    root = Path(tempfile.mkdtemp(prefix="collapse-sweep-pg-"))  # in /tmp: the server's user can reach it
    # The server refuses to run as root: as root, run it as Debian's postgres user.
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    password, port = secrets.token_hex(8), _free_port()
    (root / "password").write_text(password)
    if as_server:
        shutil.chown(root, "postgres")
        shutil.chown(root / "password", "postgres")
    data = root / "data"
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    try:
        _run([*as_server, initdb, "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={root / 'password'}"])
        _run([*as_server, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"])
        server = f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}"
        with psycopg.connect(f"host=127.0.0.1 port={port} user={USER} password={password} dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")
        yield SimpleNamespace(url=f"{server}/{DATABASE}", server=server, port=port, password=password)
    finally:
        subprocess.run([*as_server, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=SERVER_TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg-sweep")
    space = {"objective.kl.beta": {"low": 0.01, "high": 0.1, "log": True}}
    return folder, write_sweep(folder, "pg", {**SMALL, "objective.likelihood": "gaussian", "objective.sigma2": 0.1},
                               space, {"cpus_per_trial": 1}, {"num_samples": 2, "max_epochs": 2})


def _study_matches_its_table(url: str, out_dir: Path) -> optuna.Study:
    study_name = f"pg-{out_dir.name}"
    study = optuna.load_study(study_name=study_name, storage=url)
    rows = read_csv(out_dir / "trials.csv")
    assert sorted(t.number for t in study.get_trials()) == sorted(int(r["number"]) for r in rows)
    assert {t.number: t.state.name for t in study.get_trials()} == {int(r["number"]): r["state"] for r in rows}
    return study


def test_a_sweep_keeps_its_study_on_the_server(postgres, sweep_file):
    folder, path = sweep_file
    log = folder / "one.log"
    finish(start_sweep(path, folder / "results", log, ray_env(folder), "--storage", postgres.url, "--run", "one"),
           log, timeout=600)
    out_dir = folder / "results" / "pg" / "one"
    assert len(_study_matches_its_table(postgres.url, out_dir).trials) == 2
    record = (out_dir / "sweep.json").read_text()
    assert postgres.password not in record and "***" in record  # the password is never written down


def test_two_sweeps_at_once_share_the_server_not_their_studies(postgres, sweep_file):
    folder, path = sweep_file
    runs = {name: start_sweep(path, folder / "results", folder / f"{name}.log", ray_env(folder), "--storage",
                              postgres.url, "--run", name) for name in ("left", "right")}
    for name, process in runs.items():
        finish(process, folder / f"{name}.log", timeout=900)
    studies = set(optuna.get_all_study_names(postgres.url))
    assert {"pg-left", "pg-right"} <= studies
    for name in runs:
        study = _study_matches_its_table(postgres.url, folder / "results" / "pg" / name)
        assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)


def _dashboard_studies(port: int, process: subprocess.Popen, timeout: float = 60) -> list[str]:
    """The study names optuna-dashboard lists, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "optuna-dashboard exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                return [s["study_name"] for s in json.loads(response.read())["study_summaries"]]
        except OSError:
            assert time.monotonic() < deadline, "optuna-dashboard did not answer"
            time.sleep(0.5)


def test_a_killed_driver_resumes_from_the_server_while_a_dashboard_reads_it(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg-kill")
    samples, epochs = 4, 16  # the third and fourth trials run side by side for many epochs
    space = {**BETA, "objective.sigma2": {"low": 0.001, "high": 0.01, "log": True}}
    overrides = {key: value for key, value in SOUND.items() if key != "objective.sigma2"}
    path = write_sweep(folder, "pgkill", overrides, space, {"cpus_per_trial": 1},
                       {"num_samples": samples, "max_epochs": epochs})
    results, log, port = folder / "results", folder / "pgkill.log", _free_port()
    out_dir = results / "pgkill" / "r1"
    driver = start_sweep(path, results, log, ray_env(folder), "--run", "r1", "--storage", postgres.url)
    try:
        wait_for(lambda: mid_sweep(out_dir), driver, log, timeout=500)
    finally:
        kill_session(driver.pid)
        driver.wait()
    study = optuna.load_study(study_name="pgkill-r1", storage=postgres.url)
    before = study.get_trials()
    orphans = [t for t in before if t.state.name == "RUNNING"]
    assert len(orphans) >= 2, [(t.number, t.state.name) for t in before]

    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), postgres.url, "--port",
                                  str(port), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        resumed = start_sweep(path, results, folder / "resume.log", ray_env(folder), "--resume", "--run", "r1",
                              "--storage", postgres.url)
        assert "pgkill-r1" in _dashboard_studies(port, dashboard)  # read while the resumed sweep runs
        assert resumed.poll() is None
        finish(resumed, folder / "resume.log", timeout=900)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)

    trials = study.get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    for old in before:  # nothing finished before the kill changed
        if old.state.name != "RUNNING":
            assert (trials[old.number].state, trials[old.number].values) == (old.state, old.values)
    for orphan in orphans:  # each continued once, in its own run folder, from its checkpoint
        (successor,) = [t for t in trials if t.user_attrs.get("continues") == orphan.number]
        assert successor.user_attrs["run_name"] == orphan.user_attrs["run_name"] and successor.params == orphan.params
        assert successor.state.name == "COMPLETE" and successor.user_attrs["first_epoch"] > 1
    counted = [t for t in trials if t.user_attrs.get("status") != "interrupted"]
    assert sorted(t.user_attrs["run_name"] for t in counted) == [f"trial-{i:04d}" for i in range(samples)]
    rows = {row["trial_id"]: row for row in read_csv(out_dir / "trials.csv")}
    assert {name: int(row["number"]) for name, row in rows.items()} == {
        t.user_attrs["run_name"]: t.number for t in counted}
    assert all(int(row["epochs"]) == epochs for row in rows.values())


def _refused(capsys, *args: str) -> str:
    assert main([*args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.usefixtures("no_ray")
def test_bad_storage_input_is_one_line_and_exit_2(postgres, sweep_file, tmp_path, capsys):
    _, path = sweep_file
    results = str(tmp_path / "results")
    wrong = postgres.url.replace(postgres.password, "not-the-password")
    err = _refused(capsys, str(path), "--storage", wrong, "--results", results)
    assert "password authentication failed" in err and "not-the-password" not in err
    err = _refused(capsys, str(path), "--storage", f"{postgres.server}/no_such_db", "--results", results)
    assert "no_such_db" in err and "does not exist" in err
    down = postgres.url.replace(f":{postgres.port}/", f":{_free_port()}/")
    err = _refused(capsys, str(path), "--storage", down, "--results", results)
    assert "--storage" in err and postgres.password not in err
    assert not (tmp_path / "results").exists()  # nothing half-written
