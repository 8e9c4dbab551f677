"""Load: a sweep of 64 trials x 2 epochs at 16^3 on local Ray, two trials at a time, finishes with
every trial recorded, and its driver's memory grows by little more than Tune's own record of each trial.

The driver (``python sweeps/run.py``) is sampled once a second: its resident set size
(``VmRSS`` of ``/proc/<pid>/status``) and how many trials have started (run directories).
The growth from the first quarter of the trials to the last is bounded by
:data:`GROWTH_PER_TRIAL_BOUND` per trial in between; the figures are printed (``pytest -s``).
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest

from helpers import BETA, SOUND, finish, load_study, read_csv, start_sweep, write_sweep

TRIALS, EPOCHS = 64, 2
# Tune keeps every trial's record for the life of the experiment: a bare Tuner of 64 trivial trials (two
# reports of 80 metrics each, 2 at a time) grew by 0.29 MiB per trial on this machine. The sweep's driver
# may keep that and the searcher's few entries per trial; 1 MiB per trial leaves room for them and is broken
# by anything of substance kept per trial on top (a result history, a model or dataset, an actor handle).
GROWTH_PER_TRIAL_BOUND = 1 << 20


def resident_bytes(pid: int) -> int | None:
    """The resident set size of process ``pid`` (None once it has ended: gone, or a zombie without memory)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    sizes = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")]  # kB
    return sizes[0] if sizes else None


def sample_memory(pid: int, trials_dir: Path, samples: list[tuple[float, int, int]], stop: threading.Event) -> None:
    """Append ``(seconds, trials started, RSS bytes)`` once a second until ``stop`` or the process ends."""
    began = time.monotonic()
    while not stop.is_set():
        rss = resident_bytes(pid)
        if rss is None:
            return
        started = len(list(trials_dir.iterdir())) if trials_dir.is_dir() else 0
        samples.append((time.monotonic() - began, started, rss))
        stop.wait(1.0)


@pytest.mark.system
def test_64_trials_finish_and_the_driver_keeps_little_per_trial(scratch, sweep_env):
    overrides = {**SOUND, "data.phantom.subjects": 6, "train.image_every": EPOCHS, "train.checkpoint_every": EPOCHS}
    path = write_sweep(scratch, "load", overrides, BETA, {"cpus_per_trial": 1},
                       {"num_samples": TRIALS, "max_epochs": EPOCHS})
    results, log = scratch / "results", scratch / "load.log"
    out_dir = results / "load" / "r1"

    began = time.perf_counter()
    driver = start_sweep(path, results, log, sweep_env(), "--run", "r1")
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(driver.pid, out_dir / "trials", samples, stop))
    sampler.start()
    try:
        text = finish(driver, log, timeout=1800)  # a hang guard: loaded machines are slow
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - began

    study = load_study(out_dir)
    trials = study.get_trials()
    assert len(trials) == TRIALS and {t.state.name for t in trials} == {"COMPLETE"}, text[-3000:]
    rows = read_csv(out_dir / "trials.csv")
    assert sorted(int(r["number"]) for r in rows) == list(range(TRIALS))
    assert {(r["status"], r["state"], r["epochs"]) for r in rows} == {("completed", "COMPLETE", str(EPOCHS))}
    assert len(read_csv(out_dir / "epochs.csv")) == TRIALS * EPOCHS

    quarter = TRIALS // 4
    first = [rss for _, started, rss in samples if 0 < started <= quarter]
    middle = [rss for _, started, rss in samples if 2 * quarter - 2 <= started <= 2 * quarter + 2]
    last = [rss for _, started, rss in samples if started > TRIALS - quarter]
    assert first and middle and last, samples
    mib = lambda b: b / (1 << 20)  # noqa: E731
    growth = statistics.median(last) - statistics.median(first)
    print(f"\nload: {TRIALS} trials x {EPOCHS} epochs, 2 at a time, wall {wall:.0f} s; driver RSS (MiB, median) "
          f"first quarter {mib(statistics.median(first)):.0f}, middle {mib(statistics.median(middle)):.0f}, "
          f"last quarter {mib(statistics.median(last)):.0f}, peak {mib(max(s[2] for s in samples)):.0f}; "
          f"growth {mib(growth):.1f} MiB over {TRIALS - quarter} trials "
          f"({growth / (TRIALS - quarter) / 1024:.0f} kB per trial)")
    assert growth < GROWTH_PER_TRIAL_BOUND * (TRIALS - quarter)
