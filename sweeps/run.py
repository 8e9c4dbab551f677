"""Run a sweep: Optuna (TPE) through Ray Tune, with collapse-aware early termination.

    python sweeps/run.py dip_sbd --smoke          # or: collapse-sweep run dip_sbd --smoke
    python sweeps/run.py dip_sbd --data /data/brats --num-samples 64 --gpus-per-trial 1 --address auto
    python sweeps/run.py dip_sbd --resume

NAME is a sweep in sweeps/ (the file stem) or a YAML path. Without --data the trials train
on the phantom. Outputs go to RESULTS/NAME/RUN/ (see sweeps/outputs.py); --resume continues
the latest run of NAME (or --run RUN) after an interruption: finished trials count towards
the number of samples, and the trials that were running continue from their checkpoints.

Exit status: 0 the sweep ran (whatever its trials' outcomes); 2 bad sweep, configuration,
data or resources, reported in one line before any compute; 130 interrupted by Ctrl-C, with
the command that continues it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

STARTED = time.perf_counter()  # the wall time printed at the end includes the imports below

from sweeps.monitoring import TRACKERS, check_trackers  # noqa: E402
from sweeps.spec import EARLY_STOP_MODES, load_sweep  # noqa: E402
from trainables.session import BAD_INPUT_ERRORS  # noqa: E402
from vae.config import parse_override  # noqa: E402

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130  # 130: ended by Ctrl-C (128 + SIGINT)
# Command-line flags that set keys of the sweep file (flag attribute -> dotted key).
SPEC_FLAGS = {
    "num_samples": "budget.num_samples",
    "max_epochs": "budget.max_epochs",
    "early_stop": "early_stop.mode",
    "workers_per_trial": "resources.workers_per_trial",
    "cpus_per_trial": "resources.cpus_per_trial",
    "gpus_per_trial": "resources.gpus_per_trial",
    "max_concurrent": "resources.max_concurrent",
}
# What a resumed sweep may change: how many trials in all, and where they run. The options that
# define the sweep (--smoke, --data, --max-epochs, --early-stop, key=value) may be repeated with
# their recorded values, nothing else.
RESUMABLE_FLAGS = ("num_samples", "workers_per_trial", "cpus_per_trial", "gpus_per_trial", "max_concurrent")


def parse_args(argv: Sequence[str] | None = None, prog: str = "python sweeps/run.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("name", metavar="NAME", help="sweep name (sweeps/NAME.yaml) or a sweep YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="experiment keys fixed for every trial, e.g. data.batch_size=4")
    parser.add_argument("--smoke", action="store_true", help="merge the sweep's smoke section: a few tiny trials")
    parser.add_argument("--data", help="a NIfTI tree or prepared cache (default: the phantom)")
    parser.add_argument("--num-samples", type=int, help="trials in all, the enqueued ones included")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (sets train.epochs)")
    parser.add_argument("--early-stop", choices=EARLY_STOP_MODES, help="early termination (default: the sweep's)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in the run's folder)")
    parser.add_argument("--resume", action="store_true", help="continue the latest (or --run) run of NAME")
    parser.add_argument("--run", help="the run's folder name under RESULTS/NAME (default: a time stamp)")
    parser.add_argument("--results", default="results", help="where sweeps go (default: ./results)")
    parser.add_argument("--address", help="join this Ray cluster ('auto': the one running here)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, shared by its workers")
    parser.add_argument("--workers-per-trial", type=int, help="DDP workers per trial")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, shared by its workers")
    parser.add_argument(
        "--max-concurrent", type=int,
        help="trials at once (default: what the live nodes hold; on an autoscaling cluster, what it holds at full size)",
    )
    parser.add_argument(
        "--seed", type=int,
        help="seed of the TPE sampler (default: fresh entropy; sweep.json records it, so --seed replays a run)",
    )
    parser.add_argument(
        "--log", action="append", default=[], choices=sorted(TRACKERS), metavar="TRACKER",
        help="also log every trial to wandb (offline unless WANDB_MODE is set) or mlflow; repeatable",
    )
    parser.add_argument("--worker-logs", action="store_true", help="show the Ray processes' own log lines")
    parser.add_argument(
        "--no-dashboard", action="store_true",
        help="start the local Ray instance without its dashboard (tests only: a stopped multi-worker "
        "trial then leaks its workers' resources)",
    )
    return parser.parse_intermixed_args(argv)  # key=value may follow the flags


def spec_changes(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, flag) for flag, key in SPEC_FLAGS.items() if getattr(args, flag) is not None}


def data_root(args: argparse.Namespace) -> str | None:
    """``--data`` as an absolute path: trials, the record and a resume from elsewhere all find it."""
    return str(Path(args.data).expanduser().resolve()) if args.data else None


def experiment_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    overrides = [parse_override(item) for item in args.overrides]
    return overrides + ([("data.root", data_root(args))] if args.data else [])


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a resumed command line that a sweep records, and the values given for them."""
    given = {"--smoke": args.smoke or None, "--data": data_root(args), "--max-epochs": args.max_epochs,
             "--early-stop": args.early_stop}
    overrides = dict(parse_override(item) for item in args.overrides)
    return {flag: value for flag, value in given.items() if value is not None} | overrides


def prepare(args: argparse.Namespace):
    """The :class:`~sweeps.service.SweepRun` the arguments ask for; :class:`ConfigError` on bad input."""
    from sweeps.service import new_run, resume_run

    results = Path(args.results)
    if not args.resume:
        sweep = load_sweep(args.name, args.smoke, spec_changes(args), experiment_overrides(args))
        return new_run(sweep, results, args.run, args.storage, args.seed)
    changes = {SPEC_FLAGS[flag]: getattr(args, flag) for flag in RESUMABLE_FLAGS if getattr(args, flag) is not None}
    return resume_run(results, args.name, args.run, args.storage, args.seed, changes, recorded_options(args))


def main(argv: Sequence[str] | None = None, prog: str = "python sweeps/run.py") -> int:
    args = parse_args(argv, prog)
    try:
        check_trackers(args.log)
        run = prepare(args)
        from sweeps.service import execute

        summary = execute(
            run, args.address, dashboard=not args.no_dashboard, worker_logs=args.worker_logs, trackers=args.log,
            started=STARTED,
        )
    except BAD_INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_INTERRUPTED if summary["interrupted"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
