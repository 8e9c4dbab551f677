"""Ray overheads through the real trainable: trial start-up, and seconds per epoch of 1 worker vs 2 DDP workers.

    python -m bench.trial_startup [--sizes 16 32] [--epochs 4] [--runs 1x1 1x2 2x1]

Each run is the single-run command line ``python -m trainables.single_run`` on the dip_sbd smoke
model (``sweeps/dip_sbd.yaml`` with ``--smoke``: DIP-VAE-II, SBD, z_dim 8, base 4, depth 2,
batch 2 per worker, a checkpoint every epoch, a panel every 2) and a phantom of ``--subjects``
subjects prepared beforehand: a local Ray instance with its dashboard, one Tune trial of
``trainables.trial.train_trial``, in process for one worker and through a Ray Train
``TorchTrainer`` (gloo DDP) for two. A run ``WxC`` has W workers of C CPUs each; Ray gives an
actor as many torch threads as CPUs, so 1x2 and 2x1 use the same 2 cores.

* start-up: from the command's process start to its first epoch line, minus that epoch's own
  seconds (``epoch_seconds``), split into the part before the trial's trainable started (Python,
  ``ray.init``, Tune, the trial actor) and the part inside it (Tune's ``time_this_iter_s`` of the
  first report minus the epoch: data, model, and for DDP the trainer, its workers and gloo);
* seconds per epoch: the median ``epoch_seconds`` (training + validation) of epochs 2..E, and the
  median time between reports (with checkpoint, panel and reporting).

Every run has its own Ray folder, so other Ray instances on the machine are left alone. Writes
``bench/trial_startup.json`` and this script's section of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from bench.results import machine, publish
from sweeps.spec import load_sweep
from trainables.single_run import RUN_NAME
from vae.config import ConfigError, ExperimentConfig, dump_experiment
from vae.data import DataError
from vae.data.sources import prepared_cache, training_datasets
from vae.run_files import read_epochs

HERE = Path(__file__).resolve().parent
KEY = "bench/trial_startup.py"
REPO = HERE.parent
RUN_TIMEOUT_S = 900


def parse_run(text: str) -> tuple[int, float]:
    """``"2x1"`` -> (2 workers, 1.0 CPU each)."""
    workers, sep, cpus = text.partition("x")
    try:
        parsed = int(workers), float(cpus)
    except ValueError:
        parsed = (0, 0.0)
    if not sep or parsed[0] < 1 or parsed[1] <= 0:
        raise argparse.ArgumentTypeError(f"run '{text}': expected WORKERSxCPUS, e.g. 2x1")
    return parsed


def experiment(size: int, epochs: int, subjects: int, cache_dir: Path) -> ExperimentConfig:
    """The base experiment of the dip_sbd smoke sweep at ``size`` for ``epochs``."""
    overrides = [("data.size", size), ("data.phantom.subjects", subjects), ("data.cache_dir", str(cache_dir))]
    return load_sweep("dip_sbd", smoke=True, changes={"budget.max_epochs": epochs}, overrides=overrides).experiment


def ray_environment(folder: Path) -> dict[str, str]:
    """The environment of a Ray instance of its own in ``folder`` (short: Ray's socket paths must be)."""
    (folder / "token").write_text(secrets.token_hex(32))
    return {"RAY_TMPDIR": str(folder), "RAY_AUTH_TOKEN_PATH": str(folder / "token"), "TMPDIR": str(folder)}


def timed_lines(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``command``; its exit status and each output line with the seconds since the start."""
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # Ray's processes share the command's session: a run that hangs goes with its process group.
    watchdog = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        lines = [(time.perf_counter() - began, line.rstrip("\n")) for line in process.stdout]
        return process.wait(), lines
    finally:
        watchdog.cancel()


def trial_reports(run_root: Path) -> list[dict]:
    """The results Tune recorded for the run's one trial (``result.json``), in order."""
    (result_file,) = run_root.glob("tune/*/result.json")
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


def measure(spec: Path, size: int, workers: int, cpus: float, work: Path) -> dict:
    """One run of the command line with ``workers`` x ``cpus``; its start-up and per-epoch figures."""
    row = {"size": size, "workers": workers, "cpus_per_worker": cpus}
    folder = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    name = f"s{size}-w{workers}-c{cpus:g}"
    command = [sys.executable, "-m", "trainables.single_run", str(spec), "--workers", str(workers),
               "--cpus-per-worker", str(cpus), "--results", str(work / "results"), "--name", name]
    try:
        status, lines = timed_lines(command, ray_environment(folder), RUN_TIMEOUT_S)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    first_epoch = next((t for t, line in lines if line.startswith("epoch ")), None)
    if status != 0 or first_epoch is None:
        tail = [line for _, line in lines if line.strip()][-1:] or ["no output"]
        return row | {"status": "failed", "error": f"exit status {status}: {tail[0]}"}
    epochs = [float(r["epoch_seconds"]) for r in read_epochs(work / "results" / name / RUN_NAME)]
    reports = trial_reports(work / "results" / name)
    startup = first_epoch - epochs[0]
    inside = reports[0]["time_this_iter_s"] - epochs[0]
    return row | {
        "status": "ok", "startup_s": startup, "trial_startup_s": inside, "before_trial_s": startup - inside,
        "epoch_s": statistics.median(epochs[1:]), "epoch_seconds": epochs,
        "report_interval_s": statistics.median(r["time_this_iter_s"] for r in reports[1:]),
    }


def progress(row: dict) -> str:
    """One line about a finished run."""
    ok = row["status"] == "ok"
    shown = f"start-up {row['startup_s']:.1f} s, epoch {row['epoch_s']:.2f} s" if ok else row["error"]
    return f"{row['size']}^3 {row['workers']}x{row['cpus_per_worker']:g}: {shown}"


def same_cores(rows: list[dict]) -> list[str]:
    """Per size, the epoch of 2 DDP workers of 1 CPU against 1 worker of 2 CPUs (the same cores)."""
    ok = {(r["size"], r["workers"], r["cpus_per_worker"]): r for r in rows if r["status"] == "ok"}
    return [f"{ddp['epoch_s'] / ok[size, 1, 2.0]['epoch_s']:.2f}x the epoch time at {size}^3"
            for (size, workers, cpus), ddp in ok.items() if (workers, cpus) == (2, 1.0) and (size, 1, 2.0) in ok]


def markdown(result: dict) -> str:
    """This script's section of ``RESULTS.md``."""
    lines = [
        "## Ray trial overheads (`bench/trial_startup.py`)",
        "",
        f"- Date: {result['date']}; command: `{result['command']}`; machine: {result['machine']}",
        f"- `python -m trainables.single_run` on the dip_sbd smoke model, phantom of {result['subjects']} subjects "
        f"({result['train_volumes']} train / {result['val_volumes']} validation), batch 2 per worker, "
        f"{result['epochs']} epochs, local Ray with its dashboard. WxC: W workers (2: Ray Train + gloo DDP) of C CPUs "
        "(= torch threads) each. Start-up: process start to the first epoch line, minus that epoch; "
        "\"in the trial\": from the trainable's start (Tune's `time_this_iter_s` of the first report). Per epoch: "
        "median `epoch_seconds` (train + validate) of epochs 2..E, min-max in brackets; between reports adds the "
        "checkpoint, panel and report.",
        "",
        "| size | WxC | start-up | before the trial | in the trial | epoch (min-max) | between reports "
        "| epoch speed-up vs 1x1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    single = {r["size"]: r for r in result["rows"]
              if r["status"] == "ok" and (r["workers"], r["cpus_per_worker"]) == (1, 1)}
    for r in result["rows"]:
        run = f"{r['workers']}x{r['cpus_per_worker']:g}"
        if r["status"] != "ok":
            lines.append(f"| {r['size']}^3 | {run} | failed: {r['error']} | | | | | |")
            continue
        base, later = single.get(r["size"]), r["epoch_seconds"][1:]
        speedup = f"{base['epoch_s'] / r['epoch_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['size']}^3 | {run} | {r['startup_s']:.1f} s | {r['before_trial_s']:.1f} s "
            f"| {r['trial_startup_s']:.1f} s | {r['epoch_s']:.2f} s ({min(later):.2f}-{max(later):.2f}) "
            f"| {r['report_interval_s']:.2f} s | {speedup} |"
        )
    compared = same_cores(result["rows"])
    lines += [
        "",
        *([f"2 DDP workers of 1 CPU against 1 worker of 2 CPUs (the same cores): {', '.join(compared)}.", ""]
          if compared else []),
        "Timings are of a 2-core machine shared with other jobs: start-ups vary by tens of seconds from run to run, "
        "and a worker with 2 threads stalls whenever another job holds one of the cores (each parallel region waits "
        "for its slower thread), which a 1-thread worker does not. "
        "The DDP trial's start-up is the Ray Train trainer's (controller, placement group, worker actors, gloo); "
        "its workers also split each epoch's batches, and the losses and diagnostics are reduced across them every "
        "step.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 2: the first holds the start-up)")
    parser.add_argument("--subjects", type=int, default=48, help="phantom subjects (a third validate)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[(1, 1.0), (1, 2.0), (2, 1.0)],
                        metavar="WxC", help="workers x CPUs per worker (default: 1x1 1x2 2x1)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of trial.json and RESULTS.md (default: bench/)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch holds the start-up")
    with tempfile.TemporaryDirectory(prefix="bench-trial-") as tmp:
        work = Path(tmp)
        try:
            configs = {size: experiment(size, args.epochs, args.subjects, work / "cache") for size in args.sizes}
            # Prepared before the runs, so that no run's start-up prepares data.
            splits = {size: training_datasets(cfg.data, prepared_cache(cfg.data)) for size, cfg in configs.items()}
        except (ConfigError, DataError) as err:
            print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        rows = []
        for size, cfg in configs.items():
            spec = work / f"dip_sbd_smoke_{size}.yaml"
            spec.write_text(dump_experiment(cfg))
            for workers, cpus in args.runs:
                rows.append(measure(spec, size, workers, cpus, work))
                print(progress(rows[-1]), flush=True)
    train_set, val_set = next(iter(splits.values()))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": " ".join(["python -m bench.trial_startup", *argv]), "subjects": args.subjects, "epochs": args.epochs,
        "train_volumes": len(train_set), "val_volumes": len(val_set), "rows": rows,
    }
    publish(args.out, KEY, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
