"""Run one experiment through the sweep's trainable, on a local Ray instance or a cluster.

    collapse-sweep train exp2_dipvae_sbd data.size=32 --epochs 20 --workers 2
    python -m trainables.single_run exp2_dipvae_sbd --epochs 20 data.size=32     # the same

Prints one line per epoch and, at the end, where the run's files are. Everything of a
run lives under ``RESULTS/NAME/`` (``NAME`` defaults to the experiment's name)::

    run/         epochs.csv, recon_latest.png, checkpoint/, split.json
    tune/        the Tune experiment
    ray_train/   the Ray Train run of a multi-worker trial (its checkpoints)

Running the same command again resumes from the last checkpoint, so a killed run loses
at most ``train.checkpoint_every`` epochs; a new ``--name`` starts afresh.

With ``--address`` (an existing cluster) RESULTS and the data cache must be on storage
that every node mounts at the same path.

Exit status: 0 completed; 3 diverged (a NaN or infinite loss ended the run: a result,
not a crash); 1 the trial failed with an error; 2 bad configuration, data or resources.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from vae.config import ConfigError, ExperimentConfig, load_experiment
from vae.panels import LATEST_PANEL
from vae.run_files import EPOCHS_CSV, check_writable, read_epochs
from vae.training import progress_line

from .session import BAD_INPUT_ERRORS, line_printer, start_ray
from .resources import TrialResources

EXIT_COMPLETED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3
RUN_NAME = "run"  # the run's directory under RESULTS/NAME, fixed so that a re-run resumes it


def parse_args(argv: Sequence[str] | None = None, prog: str = "collapse-sweep train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment name (vae/configs) or YAML path")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.kl.beta=0.5"
    )
    parser.add_argument("--workers", type=int, default=1, help="DDP workers (one process when 1)")
    parser.add_argument("--epochs", type=int, help="sets train.epochs")
    parser.add_argument("--size", type=int, help="sets data.size")
    parser.add_argument("--data", help="sets data.root: a NIfTI tree or prepared cache (default: the phantom)")
    parser.add_argument("--results", default="results", help="where runs go (default: ./results)")
    parser.add_argument("--name", help="run name under RESULTS (default: the experiment's name)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local instance)")
    parser.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker, fractions allowed (default 0: CPU)"
    )
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-failures", type=int, default=0, help="restarts from the last checkpoint after a crash")
    parser.add_argument("--worker-logs", action="store_true", help="show the Ray processes' own log lines")
    parser.add_argument(
        "--no-dashboard", action="store_true",
        help="start the local Ray instance without its dashboard (tests only: a stopped or crashed "
        "multi-worker trial then leaks its workers' resources)",
    )
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


def experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment with the command line's overrides; the named flags win over ``key=value``."""
    flags = {"train.epochs": args.epochs, "data.size": args.size, "data.root": args.data}
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_experiment(args.config, overrides)


def resources_from_args(args: argparse.Namespace) -> TrialResources:
    try:
        return TrialResources(
            workers=args.workers, use_gpu=args.gpus_per_worker > 0, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker or 1.0, max_failures=args.max_failures,
        )
    except ValueError as err:
        raise ConfigError(f"command line: {err}") from None


def run(args: argparse.Namespace) -> int:
    cfg = experiment_from_args(args)
    resources = resources_from_args(args)
    run_root = Path(args.results).resolve() / (args.name or cfg.name)

    import ray

    from vae.data.sources import prepared_cache, validation_warnings

    from .resources import max_concurrent_trials
    from .trial import trial_config

    check_writable(run_root, "--results")  # now, rather than from inside Ray
    cache = prepared_cache(cfg.data, progress=True)  # once, before any worker starts
    for line in validation_warnings(cfg.data, cache):
        print(line, file=sys.stderr, flush=True)
    config = trial_config(cfg, cache, run_root, resources, run_name=RUN_NAME)
    run_dir = run_root / RUN_NAME
    start_ray(args.address, resources, dashboard=not args.no_dashboard, worker_logs=args.worker_logs)
    try:
        max_concurrent_trials(resources)  # a clear error now instead of a trial waiting forever
        print(f"{cfg.name}: {cfg.train.epochs} epochs at {cfg.data.size}^3 on {resources.workers} worker(s)")
        result = _tuner(config, resources, cfg, run_root).fit()[0]
    finally:
        ray.shutdown()
    if result.error is not None:
        print(f"trial failed: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    return summarise(run_dir, cfg)


def summarise(run_dir: Path, cfg: ExperimentConfig) -> int:
    """Print where the run's files are and how it ended (from its own ``epochs.csv``, which also
    covers a re-run of a finished run that had nothing left to report); the exit status."""
    rows = read_epochs(run_dir)
    if not rows:
        raise RuntimeError(f"{run_dir / EPOCHS_CSV} holds no epoch")
    last = rows[-1]
    print(f"run:    {run_dir}\nepochs: {run_dir / EPOCHS_CSV}")
    if (run_dir / LATEST_PANEL).is_file():
        print(f"images: {run_dir / LATEST_PANEL}")
    if last["status"] == "diverged":
        print(f"DIVERGED in epoch {last['epoch']}: the {last['diverged_term']} term became NaN or infinite")
        return EXIT_DIVERGED
    au, kl, epochs = float(last["au"]), float(last["kl_raw"]), f"{last['epoch']}/{cfg.train.epochs}"
    print(f"{last['status']} after {epochs} epochs: AU {au:.0f}/{cfg.model.z_dim}, KL_raw {kl:.3g}")
    return EXIT_COMPLETED


def _tuner(config: dict, resources: TrialResources, cfg: ExperimentConfig, run_root: Path):
    """A Tuner running the one trial of ``config``; its experiment goes to ``run_root/tune``."""
    from ray import tune

    from .trial import train_trial, trial_resources

    def progress(trial, result: dict) -> str:
        return progress_line(result, cfg.train.epochs, cfg.model.z_dim)

    return tune.Tuner(
        tune.with_resources(train_trial, trial_resources),
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(run_root),
            callbacks=[line_printer(progress)],
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


def main(argv: Sequence[str] | None = None, prog: str = "collapse-sweep train") -> int:
    args = parse_args(argv, prog)
    try:
        return run(args)
    except BAD_INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
