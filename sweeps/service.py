"""One start of a sweep: prepare the data, open the study, run the trials through Tune, write the outputs.

A sweep run lives in ``results/<sweep>/<run>/`` with its own study, named
``<sweep>-<run>`` (the default name of ``OptunaSearch`` would silently merge sweeps that
share a storage). ``--resume`` starts a *new* Tuner on the same study rather than
``Tuner.restore``: restoring Tune's snapshot of an Optuna searcher after a kill crashed
on trials the snapshot thought unfinished, lost trials asked after it, and a restored
seeded sampler suggested finished configurations again. Instead, trials the killed
driver left RUNNING are closed as interrupted and enqueued again with their parameters
and run directory, so they continue from their checkpoints, the finished trials count
towards ``num_samples``, and the sampler starts from fresh entropy unless ``--seed`` says.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import optuna

from vae.config import ConfigError
from vae.data.cache import atomic_write, check_writable
from vae.data.sources import check_data

from .outputs import (
    RECORD_JSON, STUDY_DB, TABLE_HEADER, TRIALS_DIR, format_params, param_labels, table_line, trial_table,
    write_outputs,
)
from .spec import ResourcesSpec, Sweep, collapse_warnings

TUNE_DIR = "tune"


@dataclass(frozen=True)
class SweepRun:
    """A sweep with where it runs: its output folder, its study and the sampler's seed."""

    sweep: Sweep
    out_dir: Path
    study_name: str
    storage_url: str
    seed: int | None = None
    resume: bool = False


def new_run(sweep: Sweep, results: Path, run: str | None, storage_url: str | None, seed: int | None) -> SweepRun:
    """A fresh run of ``sweep`` in ``results/<sweep>/<run>`` (``run``: a time stamp by default)."""
    run = run or datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if sweep.smoke else "")
    out_dir = (results / sweep.name / run).resolve()
    if (out_dir / RECORD_JSON).exists():
        raise ConfigError(f"{out_dir} already holds a sweep run; continue it with --resume or choose another --run")
    # Everything that can be checked fails here, before Ray starts or anything is written.
    check_writable(out_dir, "--results")
    if storage_url is not None:  # the default is created in out_dir, which is writable
        _check_storage(storage_url)
    check_data(sweep.experiment.data)
    return SweepRun(sweep, out_dir, f"{sweep.name}-{run}", storage_url or f"sqlite:///{out_dir / STUDY_DB}", seed)


def resume_run(
    results: Path, name: str, run: str | None, storage_url: str | None, seed: int | None, changes: Mapping[str, Any]
) -> SweepRun:
    """The recorded run ``run`` (default: the latest) of sweep ``name``, with ``changes`` to its spec."""
    out_dir = find_run(results / Path(name).stem, run)
    record = json.loads((out_dir / RECORD_JSON).read_text())
    stored = record["storage"]
    if storage_url is None and "***" in stored:
        raise ConfigError(f"{out_dir}: its study is in {stored}; give the full URL again with --storage")
    sweep = Sweep.from_record(record, changes)
    check_writable(out_dir, "--resume")
    _check_storage(storage_url or stored)
    check_data(sweep.experiment.data)
    return SweepRun(sweep, out_dir, record["study"], storage_url or stored, seed, resume=True)


def find_run(sweep_dir: Path, run: str | None) -> Path:
    runs = sorted(sweep_dir.glob(f"*/{RECORD_JSON}"), key=lambda p: json.loads(p.read_text())["created"])
    if run is not None:
        runs = [p for p in runs if p.parent.name == run]
    if not runs:
        what = f"run '{run}'" if run else "any run"
        raise ConfigError(f"--resume: {sweep_dir} holds no record of {what}; start the sweep without --resume first")
    return runs[-1].parent.resolve()


def _masked(url: str) -> str:
    """The storage URL without its password (it goes into sweep.json and the output)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise ConfigError(f"--storage: '{url}' is not a database URL such as postgresql://user@host/db") from None


def _check_storage(url: str) -> None:
    """:class:`ConfigError` unless the storage at ``url`` can be opened; creates nothing.

    SQLite: the database's folder must exist and be writable. A server database is
    connected to once.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    masked, parsed = _masked(url), make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--storage: {masked}: the folder {folder} does not exist; create it first")
        check_writable(folder, "--storage")  # SQLite writes its journal beside the database
        return
    try:
        with create_engine(url, poolclass=NullPool).connect():  # NullPool: closed on leaving
            pass
    except NoSuchModuleError:
        raise ConfigError(
            f"--storage: {masked}: unknown database '{parsed.drivername}'; use sqlite:///PATH, "
            "postgresql://user@host/db or mysql://user@host/db"
        ) from None
    except ImportError as err:
        raise ConfigError(f"--storage: {masked}: its database driver is missing ({err}); install it") from None
    except SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise ConfigError(
            f"--storage: cannot connect to {masked} ({reason}); check the URL and that the server runs"
        ) from None


def open_storage(url: str, attempts: int = 3) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url``, its schema created when the database is new.

    Optuna creates a schema table by table, each after checking that it is missing, so a
    process opening the new database at the same moment (a report, a dashboard) can make a
    table or the version row in between; the loser of that race tries again and finds them.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError

    # SQLite: wait for a lock rather than fail while a reader (the report, a test) holds it.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


# --------------------------------------------------------------------------- running


def execute(
    run: SweepRun,
    address: str | None = None,
    dashboard: bool = True,
    worker_logs: bool = False,
    trackers: Sequence[str] = (),
    started: float | None = None,
) -> dict:
    """Run the sweep's remaining trials and write its outputs; returns the summary.

    Ray starts first, so that resources no trial can get fail before anything is written
    or prepared. ``trackers`` names optional loggers (``wandb``, ``mlflow``; see
    :mod:`sweeps.monitoring`). ``started`` (``time.perf_counter()``) is when the command
    began, for the wall time it reports.
    """
    from vae.data.sources import prepared_cache

    from .search import finished_count, open_study, requeue_orphans

    started = time.perf_counter() if started is None else started
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = run.sweep
    warnings = collapse_warnings(sweep)
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    with ray_session(sweep, address, dashboard, worker_logs) as concurrent:
        cache = prepared_cache(sweep.experiment.data, progress=True)  # once, before any trial starts
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if not run.resume:
            record = {
                **sweep.record(), "run": run.out_dir.name, "study": run.study_name,
                "storage": _masked(run.storage_url), "seed": run.seed,
                "created": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
            }
            atomic_write(run.out_dir / RECORD_JSON, (json.dumps(record, indent=2) + "\n").encode())
        storage = open_storage(run.storage_url)
        study = open_study(storage, run.study_name, sweep)
        continued = requeue_orphans(study) if run.resume else []
        remaining = sweep.spec.budget.num_samples - finished_count(study)
        print(
            f"{sweep.name}{' (smoke)' if sweep.smoke else ''}: study {run.study_name} in {_masked(run.storage_url)}; "
            f"{remaining} of {sweep.spec.budget.num_samples} trials to run, {concurrent} at a time, {sweep.epochs} "
            f"epochs each at {sweep.experiment.data.size}^3; early stop: {sweep.spec.early_stop.mode}; "
            f"results in {run.out_dir}",
            flush=True,
        )
        if continued:
            print(f"continuing interrupted trials {continued} from their checkpoints", flush=True)
        try:
            if remaining > 0:
                _tune(run, storage, cache, remaining, concurrent, trackers)
        finally:
            info = {
                "sweep": sweep.name, "run": run.out_dir.name, "study": run.study_name,
                "storage": _masked(run.storage_url), "smoke": sweep.smoke, "warnings": warnings,
                "continued_trials": continued, "wall_seconds": round(time.perf_counter() - started, 1),
            }
            summary, rows = write_outputs(run.out_dir, sweep, study, info)
            _write_report(run.out_dir, study, sweep)
    print(trial_table(rows, sweep))
    wall = time.perf_counter() - started
    print(f"{summary['status_counts']}; wall time {wall:.0f} s; outputs in {run.out_dir}", flush=True)
    return summary


@contextmanager
def ray_session(sweep: Sweep, address: str | None, dashboard: bool, worker_logs: bool) -> Iterator[int]:
    """Ray started (or joined) for the sweep; yields how many of its trials run side by side."""
    import ray

    from trainables.cli import start_ray

    start_ray(address, sweep.spec.resources.trial_resources(), dashboard=dashboard, worker_logs=worker_logs)
    try:
        yield trial_concurrency(sweep.spec.resources, joined=address is not None)
    finally:
        ray.shutdown()


def trial_concurrency(spec: ResourcesSpec, joined: bool) -> int:
    """How many trials the sweep runs at once on the Ray instance it started or ``joined``.

    By default, as many as the live nodes hold, and a clear error now when not one fits
    (rather than trials waiting forever). A cluster that autoscales holds more than its live
    nodes: there ``max_concurrent`` replaces the count, and Tune's pending trials make the
    autoscaler add nodes. A local instance never grows, so there it only caps the count.
    """
    from trainables import ResourceError, max_concurrent_trials

    try:
        fits_now = max_concurrent_trials(spec.trial_resources())
    except ResourceError as err:
        if not (joined and spec.max_concurrent):
            raise
        print(f"note: {err}; the trials wait for the autoscaler to add a node that holds them", flush=True)
        return spec.max_concurrent
    if spec.max_concurrent is None:
        return fits_now
    return spec.max_concurrent if joined else min(spec.max_concurrent, fits_now)


def _write_report(out_dir: Path, study: optuna.Study, sweep: Sweep) -> None:
    """The report's pictures and page; a failure there must never cost the sweep's results."""
    try:
        from .report import write_report

        write_report(out_dir, study, sweep.objectives)
    except Exception as err:  # noqa: BLE001 - any failure of the report is only a warning
        print(f"warning: the report was not written: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _tune(
    run: SweepRun, storage: optuna.storages.BaseStorage, cache: Path, remaining: int, concurrent: int,
    trackers: Sequence[str],
) -> None:
    # The sweep prints its own table, and Tune's experiment snapshots only serve Tuner.restore,
    # which a sweep never uses: neither Tune's banner nor its snapshot-frequency warning helps.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune warns when a callback (a tracker writing its database) takes over 0.5 s per result;
    # next to epochs of seconds to hours that is no bottleneck.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")
    from ray import tune

    from trainables import trial_config

    from .monitoring import metrics_exporter, tracker_callbacks
    from .search import CollapseStopper, RecordingASHA, SweepSearch, trainable

    sweep = run.sweep
    resources = sweep.spec.resources.trial_resources()
    run_root = run.out_dir / TRIALS_DIR
    asha = RecordingASHA(sweep) if sweep.spec.early_stop.uses_asha else None
    searcher = SweepSearch(sweep, run.study_name, storage, run_root, run.seed, asha)
    stopper = CollapseStopper(sweep, run_root) if sweep.spec.early_stop.collapse_rule else None
    attempt = len(list((run.out_dir / TUNE_DIR).glob("start-*"))) + 1
    tuner = tune.Tuner(
        trainable(sweep, trial_config(sweep.experiment, cache, run_root, resources)),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=asha, num_samples=remaining, max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"start-{attempt}", storage_path=str(run.out_dir / TUNE_DIR), stop=stopper,
            callbacks=[
                _printer(sweep, searcher), metrics_exporter(run.study_name),
                *tracker_callbacks(trackers, run.out_dir, run.study_name),
            ],
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=0,
        ),
    )
    print(TABLE_HEADER, flush=True)
    tuner.fit()


def _printer(sweep: Sweep, searcher):
    """The live table: a line per trial-epoch, and one with the outcome when a trial ends."""
    from trainables.cli import line_printer

    from .search import params_of
    from .space import RUN_NAME

    labels = param_labels(sweep.space.names)

    def line(trial, result: Mapping[str, Any], status: str) -> str:
        return table_line(
            trial.config[RUN_NAME], result.get("epoch", 0), sweep.epochs, result.get("au"), result.get("kl_raw"),
            result.get("recon_mu"), status, format_params(params_of(trial.config), labels),
        )

    def on_result(trial, result):
        return line(trial, result, result.get("status", ""))

    def on_end(trial):
        """The outcome, unless the trial's last line already said it (a completed trial)."""
        outcome = searcher.outcomes.get(trial.trial_id)
        if outcome is None or (outcome.status == trial.last_result.get("status") and not outcome.reason):
            return None
        return line(trial, trial.last_result, outcome.status) + (f"\n    {outcome.reason}" if outcome.reason else "")

    return line_printer(on_result, on_end)
