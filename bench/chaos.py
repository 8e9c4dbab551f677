"""Chaos under load: a sweep, two trials at a time, while a seeded schedule SIGKILLs its trials'
processes and, once, its driver; then ``--resume``. The same sweep without kills gives the wall-time factor.

    python -m bench.chaos [--trials 20] [--epochs 4] [--kills 6] [--seed 0] [--write]

Two sweeps at ``dip_sbd``'s smoke scale (16^3 phantom, tiny model): trials of one worker (1 CPU),
then trials of two gloo DDP workers (0.49 CPU each, so two trials fit on two CPUs); no early stop
(every trial trains all its epochs, so the runs with and without kills do the same work), and as many
Tune and Ray Train restarts as there are kills. The schedule (:func:`kill_schedule`) interleaves kills of

- a trial's own process, the Tune actor (``ray::ImplicitFunc``; a one-worker trial trains in it,
  a DDP trial's waits on its workers there): Tune restarts the trial from its last checkpoint;
- one DDP worker (``ray::RayTrainWorker``): Ray Train restarts the worker group from it;
- the driver with its whole local Ray instance, once, mid-sweep: the sweep goes on with
  ``--resume`` (and so do the kills),

each once a drawn number of epoch rows has been written across the sweep, at a drawn moment after
that, on a process drawn from those alive. Every trial's ``epochs.csv`` is watched while the sweep
runs: a row count that falls is an epoch written twice (a kill between an epoch's row and Tune's
checkpoint of it, or the epochs after the checkpoint a resumed trial continues from); one that falls
to nothing after two epochs would be a trial trained again from scratch. The epoch a kill cuts short
was never written: its cost shows in the wall time only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from bench.results import machine, publish

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
# Ray's process titles: a trial's Tune actor ("ray::ImplicitFunc", with ".train" appended while a call to it
# runs) and the Ray Train workers of a DDP trial.
TRIAL_PROCESS, DDP_WORKER = r"ray::ImplicitFunc\b", r"ray::RayTrainWorker\b"
DRIVER = "driver"
TRIAL_KILLS = {"trial": TRIAL_PROCESS, "ddp_worker": DDP_WORKER}
# CPUs per trial by workers: a DDP trial's actor takes 0.01 more, so 0.98 keeps two trials on two CPUs.
CPUS_PER_TRIAL = {1: 1.0, 2: 0.98}
SWEEP_NAME = "chaos"


# --------------------------------------------------------------------------- processes


def session_members(session: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live processes of ``session`` (a CLI started with ``start_new_session``).

    Ray's own processes stay in the session of the process that started Ray, even those
    that take a process group of their own and rename themselves (``ray::ImplicitFunc.train``).
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if int(fields[3]) == session and fields[0] != "Z":  # a zombie is dead already
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                members.append((int(stat.parent.name), command))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            pass
    return members


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (the CLI, started with ``start_new_session``, and its Ray instance)."""
    for _ in range(20):
        members = session_members(session)
        if not members:
            return
        for pid, _ in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"processes of session {session} survived SIGKILL")


# --------------------------------------------------------------------------- the sweep


def write_chaos_sweep(folder: Path, trials: int, epochs: int, workers: int, restarts: int) -> Path:
    """``folder/chaos.yaml``: ``dip_sbd`` whose smoke section runs ``trials`` trials of ``workers`` workers and
    ``epochs`` epochs each, without early stop, each allowed ``restarts`` restarts by Tune and by Ray Train."""
    sweep = yaml.safe_load((REPO / "sweeps" / "dip_sbd.yaml").read_text())
    sweep["smoke"].update(
        early_stop={"mode": "none"},
        resources={"workers_per_trial": workers, "cpus_per_trial": CPUS_PER_TRIAL[workers], "gpus_per_trial": 0,
                   "max_failures": restarts},
        budget={"num_samples": trials, "max_epochs": epochs},
    )
    path = folder / f"{SWEEP_NAME}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_command(path: Path, results: Path, run: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / "run.py"), str(path), "--smoke", "--results", str(results),
            "--run", run, *extra]


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """The sweep in a session of its own, so that it can be killed with its Ray instance."""
    with log.open("a") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_session(process.pid)
    if process.returncode != 0:
        raise RuntimeError(f"the sweep ended with {process.returncode}:\n{log.read_text()[-5000:]}")


# --------------------------------------------------------------------------- kills


@dataclass
class Kill:
    kind: str  # "trial", "ddp_worker" or "driver"
    after_rows: int  # epoch rows written across the sweep before it came
    pid: int | None = None  # the process killed (the driver's, for "driver")
    at_s: float | None = None  # seconds into the sweep


def kill_schedule(seed: int, kills: int, trials: int, epochs: int, workers: int) -> list[Kill]:
    """``kills`` trial-process kills (of trial actors; with DDP, half of them of DDP workers) and one driver
    kill among them, at drawn numbers of epoch rows: after the first epochs, before the last trials start."""
    if kills < 2:
        raise ValueError(f"the driver is killed between trial-process kills: kills must be >= 2, got {kills}")
    rng = random.Random(seed)
    kinds = (list(TRIAL_KILLS)[:1 if workers == 1 else None] * kills)[:kills]
    rng.shuffle(kinds)
    kinds.insert(rng.randrange(1, kills), DRIVER)  # never first: the driver dies mid-sweep
    last_point = int(0.85 * trials * epochs)
    points = sorted(rng.sample(range(2, last_point), len(kinds)))
    return [Kill(kind, point) for kind, point in zip(kinds, points)]


def epoch_rows(run_dir: Path) -> int:
    """Whole rows of a trial's ``epochs.csv`` (a row being appended is not counted yet)."""
    try:
        return max((run_dir / "epochs.csv").read_bytes().count(b"\n") - 1, 0)
    except OSError:
        return 0


@dataclass
class RowWatch:
    """Watches every trial's epoch rows: how many are written now, and what was written twice."""

    trials_dir: Path
    rows: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    written_twice: dict[str, int] = field(default_factory=dict)  # trial -> epoch rows dropped, then written again
    from_scratch: set[str] = field(default_factory=set)  # trials whose rows fell to none after two epochs

    def poll(self) -> None:
        for run_dir in self.trials_dir.glob("trial-*"):
            now, before = epoch_rows(run_dir), self.rows.get(run_dir.name, 0)
            if now < before:
                self.written_twice[run_dir.name] = self.written_twice.get(run_dir.name, 0) + before - now
                if now == 0 and self.peak.get(run_dir.name, 0) >= 2:
                    self.from_scratch.add(run_dir.name)
            self.rows[run_dir.name] = now
            self.peak[run_dir.name] = max(self.peak.get(run_dir.name, 0), now)


@dataclass
class ChaosRun:
    out_dir: Path
    wall_s: float  # both starts, kills and restarts included
    kills: list[Kill]
    written_twice: dict[str, int]
    from_scratch: list[str]
    rows_at_driver_kill: dict[str, int]  # each trial's epoch rows when the driver died
    log: Path


def run_sweep(path: Path, results: Path, run: str, seed: int, env: dict[str, str], timeout: float) -> float:
    """Wall seconds of the sweep run to its end without kills."""
    log = results / f"{run}.log"
    began = time.perf_counter()
    finish(start(sweep_command(path, results, run, "--seed", str(seed)), log, env), log, timeout)
    return time.perf_counter() - began


def run_chaos(path: Path, results: Path, run: str, seed: int, schedule: list[Kill], env: dict[str, str],
              timeout: float) -> ChaosRun:
    """The sweep while ``schedule`` is carried out (``seed`` also draws each kill's moment and process)."""
    rng = random.Random(seed + 1)
    out_dir, log = results / SWEEP_NAME / run, results / f"{run}.log"
    watch = RowWatch(out_dir / "trials")
    rows_at_driver_kill: dict[str, int] = {}
    began = time.perf_counter()
    deadline = began + timeout
    driver = start(sweep_command(path, results, run, "--seed", str(seed)), log, env)

    def wait(condition) -> None:
        """Watch the rows until ``condition`` holds; stop everything if the sweep ends or time runs out first."""
        while True:
            watch.poll()
            if condition():
                return
            if time.perf_counter() > deadline or driver.poll() is not None:
                kill_session(driver.pid)
                raise RuntimeError(f"the sweep ended or ran out of time before a kill:\n{log.read_text()[-5000:]}")
            time.sleep(0.05)

    try:
        for kill in schedule:
            wait(lambda: sum(watch.rows.values()) >= kill.after_rows)
            pause_until = time.perf_counter() + rng.uniform(0.0, 2.0)  # a drawn moment within the next epoch
            wait(lambda: time.perf_counter() >= pause_until)
            if kill.kind == DRIVER:
                rows_at_driver_kill = dict(watch.rows)
                kill.pid, kill.at_s = driver.pid, time.perf_counter() - began
                kill_session(driver.pid)
                driver.wait()
                driver = start(sweep_command(path, results, run, "--resume"), log, env)
                continue
            title = re.compile(TRIAL_KILLS[kill.kind])
            alive = lambda: sorted(pid for pid, command in session_members(driver.pid) if title.match(command))  # noqa: E731
            while kill.pid is None:
                wait(lambda: bool(alive()))
                try:
                    target = rng.choice(alive())
                    os.kill(target, signal.SIGKILL)
                except (IndexError, ProcessLookupError):  # it ended between the look and the kill: look again
                    continue
                kill.pid, kill.at_s = target, time.perf_counter() - began
        while driver.poll() is None:
            if time.perf_counter() > deadline:
                break
            watch.poll()
            time.sleep(0.05)
        finish(driver, log, timeout=max(deadline - time.perf_counter(), 1.0))
    finally:
        if driver.poll() is None:
            kill_session(driver.pid)
    watch.poll()
    return ChaosRun(out_dir, time.perf_counter() - began, schedule, watch.written_twice, sorted(watch.from_scratch),
                    rows_at_driver_kill, log)


# --------------------------------------------------------------------------- the benchmark


@contextmanager
def sweep_env(folder: Path) -> Iterator[dict[str, str]]:
    """One sweep's environment: its own Ray temp folder and token (removed afterwards), the phantom cache
    of ``folder`` shared by the sweeps."""
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must be short
    try:
        (ray_dir / "token").write_text(os.urandom(32).hex())
        yield {**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_AUTH_TOKEN_PATH": str(ray_dir / "token"),
               "TMPDIR": str(ray_dir), "COLLAPSE_SWEEP_CACHE": str(folder / "cache")}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def measure(folder: Path, trials: int, epochs: int, workers: int, kills: int, seed: int, timeout: float,
            calm: bool = True) -> tuple[float | None, ChaosRun]:
    """The sweep of ``workers``-worker trials without kills (unless not ``calm``), then under
    :func:`kill_schedule`: the first's wall seconds and the second's run. Sweeps of ``folder`` share its
    phantom cache."""
    results = folder / f"{workers}-worker"
    results.mkdir(parents=True, exist_ok=True)
    path = write_chaos_sweep(results, trials, epochs, workers, restarts=kills + 1)
    calm_s = None
    if calm:
        with sweep_env(folder) as env:
            calm_s = run_sweep(path, results, "calm", seed, env, timeout)
    with sweep_env(folder) as env:
        return calm_s, run_chaos(path, results, "chaos", seed, kill_schedule(seed, kills, trials, epochs, workers),
                                 env, timeout)


def figures(calm_s: float, chaos: ChaosRun, trials: int, epochs: int, workers: int) -> dict:
    return {
        "trials": trials, "epochs": epochs, "workers_per_trial": workers,
        "kills": [asdict(k) for k in chaos.kills],
        "kills_survived": {kind: sum(k.kind == kind and k.pid is not None for k in chaos.kills)
                           for kind in (*TRIAL_KILLS, DRIVER)},
        "epochs_written_twice": sum(chaos.written_twice.values()), "trials_rewound": len(chaos.written_twice),
        "trained_again_from_scratch": chaos.from_scratch,
        "wall_s_without_kills": round(calm_s, 1), "wall_s_with_kills": round(chaos.wall_s, 1),
        "wall_factor": round(chaos.wall_s / calm_s, 2),
    }


def section(runs: list[dict], command: str) -> str:
    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(str(cell(run)) for run in runs) + " |"

    return "\n".join([
        "## Chaos under load (`bench/chaos.py`)", "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.", "",
        "dip_sbd at smoke scale (16^3 phantom), no early stop, two trials at a time on local Ray; SIGKILLs of "
        "trial actors, DDP workers and once the driver with its Ray instance (then `--resume`) on a seeded "
        "schedule. Epochs written twice: rows of a trial's `epochs.csv` dropped when it went back to its "
        "checkpoint, then written again; an epoch a kill cut short was never written and costs wall time only.", "",
        "| | " + " | ".join(f"{r['workers_per_trial']} worker(s) per trial" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
        row("trials x epochs", lambda r: f"{r['trials']} x {r['epochs']}"),
        row("trial actors killed (Tune restarts the trial)", lambda r: r["kills_survived"]["trial"]),
        row("DDP workers killed (Ray Train restarts the group)", lambda r: r["kills_survived"]["ddp_worker"]),
        row("driver + Ray killed, then `--resume`", lambda r: r["kills_survived"][DRIVER]),
        row("epochs written twice", lambda r: f"{r['epochs_written_twice']} in {r['trials_rewound']} trials"),
        row("trials trained again from scratch", lambda r: len(r["trained_again_from_scratch"])),
        row("wall time without kills", lambda r: f"{r['wall_s_without_kills']} s"),
        row("wall time with kills", lambda r: f"{r['wall_s_with_kills']} s (x{r['wall_factor']})"),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kills", type=int, default=6, help="trial-process kills (the driver is killed once more)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=sorted(CPUS_PER_TRIAL))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each sweep may take")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md and bench/chaos.json")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="chaos") as folder:
        for workers in args.workers:
            calm_s, chaos = measure(Path(folder), args.trials, args.epochs, workers, args.kills, args.seed,
                                    args.timeout)
            runs.append(figures(calm_s, chaos, args.trials, args.epochs, workers))
            print(json.dumps(runs[-1], indent=1), flush=True)
    if args.write:
        command = " ".join(["python -m bench.chaos", *(argv if argv is not None else sys.argv[1:])])
        publish(HERE, "bench/chaos.py", {"runs": runs}, section(runs, command))


if __name__ == "__main__":
    main()
