"""One start of a sweep: prepare the data, open the study, run the trials through Tune, write the outputs.

A sweep run lives in ``results/<sweep>/<run>/`` with its own study, named
``<sweep>-<run>`` (one default name would silently merge sweeps that share a storage).
``--resume`` starts a *new* Tuner on the same study rather than
``Tuner.restore``: restoring Tune's snapshot of an Optuna searcher after a kill crashed
on trials the snapshot thought unfinished, lost trials asked after it, and a restored
seeded sampler suggested finished configurations again. Instead, trials the killed
driver left RUNNING are closed as interrupted and enqueued again with their parameters
and run directory, so they continue from their checkpoints, the finished trials count
towards ``num_samples``, and the sampler's seed derives from the recorded one (a seeded
sampler restarted with the same seed would suggest the same points again).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import optuna

from vae.config import ConfigError
from vae.data.sources import check_data
from vae.run_files import atomic_write, check_writable
from vae.training import derive_seed

from .outputs import (
    RECORD_JSON, STUDY_DB, TABLE_HEADER, TRIALS_DIR, format_params, param_labels, table_line, trial_table,
    write_outputs,
)
from .spec import ResourcesSpec, Sweep, collapse_warnings, stopping_notes

TUNE_DIR = "tune"


@dataclass(frozen=True)
class SweepRun:
    """A sweep with where it runs: its output folder, its study and the sampler's seed."""

    sweep: Sweep
    out_dir: Path
    study_name: str
    storage_url: str
    seed: int
    resume: bool = False

    @property
    def default_storage(self) -> bool:
        return self.storage_url == f"sqlite:///{self.out_dir / STUDY_DB}"


def fresh_seed() -> int:
    """A sampler seed from the system's entropy; it is recorded, so ``--seed`` replays the run."""
    return secrets.randbits(32)


def new_run(sweep: Sweep, results: Path, run: str | None, storage_url: str | None, seed: int | None) -> SweepRun:
    """A fresh run of ``sweep`` in ``results/<sweep>/<run>`` (``run``: a time stamp by default) whose
    sampler starts from ``seed`` (default: fresh entropy, recorded in ``sweep.json``)."""
    run = run or datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if sweep.smoke else "")
    out_dir = (results / sweep.name / run).resolve()
    if (out_dir / RECORD_JSON).exists():
        raise ConfigError(f"{out_dir} already holds a sweep run; continue it with --resume or choose another --run")
    # Everything that can be checked fails here, before Ray starts or anything is written.
    check_writable(out_dir, "--results")
    if storage_url is not None:  # the default is created in out_dir, which is writable
        _check_storage(storage_url)
    check_data(sweep.experiment.data)
    storage_url = storage_url or f"sqlite:///{out_dir / STUDY_DB}"
    return SweepRun(sweep, out_dir, f"{sweep.name}-{run}", storage_url, fresh_seed() if seed is None else seed)


def resume_run(
    results: Path,
    name: str,
    run: str | None,
    storage_url: str | None,
    seed: int | None,
    changes: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
) -> SweepRun:
    """The recorded run ``run`` (default: the latest) of sweep ``name``, with ``changes`` to its spec.

    ``given`` holds what the command line repeats of the recorded sweep (``--data``,
    ``--max-epochs``, ``--early-stop``, ``--smoke`` and experiment keys): the recorded value
    again is fine, another one is refused. The sampler's seed derives from the recorded seed
    and the number of earlier starts, unless ``seed`` is given: a resumed run is replayable,
    and never draws its first suggestions again (a re-seeded sampler repeats them).
    """
    out_dir = find_run(results / Path(name).stem, run)
    record = json.loads((out_dir / RECORD_JSON).read_text())
    changed = _changed(record, given or {})
    if changed:
        raise ConfigError(f"--resume continues the sweep as recorded in {out_dir / RECORD_JSON}; it cannot change "
                          f"{'; '.join(changed)}")
    stored = record["storage"]
    if storage_url is None and "***" in stored:
        raise ConfigError(f"{out_dir}: its study is in {stored}; give the full URL again with --storage")
    sweep = Sweep.from_record(record, changes)
    check_writable(out_dir, "--resume")
    _check_storage(storage_url or stored)
    check_data(sweep.experiment.data)
    if seed is None:
        recorded, starts = record.get("seed"), 1 + len(record.get("resumes", []))
        seed = fresh_seed() if recorded is None else derive_seed(recorded, _RESUME_STREAM, starts)
    return SweepRun(sweep, out_dir, record["study"], storage_url or stored, seed, resume=True)


_RESUME_STREAM = 1  # derive_seed's stream of the seeds of resumed starts
_MISSING = object()


def _recorded(record: Mapping[str, Any], key: str) -> Any:
    """The recorded value of a command-line flag or a dotted experiment key."""
    flags = {
        "--smoke": record.get("smoke", False), "--data": record["experiment"]["data"]["root"],
        "--max-epochs": record["experiment"]["train"]["epochs"], "--early-stop": record["spec"]["early_stop"]["mode"],
    }
    if key in flags:
        return flags[key]
    node: Any = record["experiment"]
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same(recorded: Any, given: Any, key: str) -> bool:
    if key in ("--data", "data.root") and recorded is not None and given is not None:
        return Path(recorded).expanduser().resolve() == Path(given).expanduser().resolve()
    return recorded == given and isinstance(recorded, bool) == isinstance(given, bool)


def _changed(record: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """What ``given`` sets to another value than the record holds, one phrase each."""
    out = []
    for key, value in given.items():
        recorded = _recorded(record, key)
        if recorded is _MISSING:
            out.append(f"{key} (not a key of the recorded experiment)")
        elif not _same(recorded, value, key):
            out.append(f"{key} (recorded {recorded!r}, given {value!r})")
    return out


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


def _masked_command(argv: Sequence[str]) -> list[str]:
    """The command line as recorded: a storage URL's password is never written down."""
    return [_masked(arg) if "://" in arg else arg for arg in argv]


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
    from vae.data.sources import prepared_cache, training_spectrum, validation_has_factors, validation_warnings

    from .search import continuations, finished_count, open_study, requeue_orphans

    started = time.perf_counter() if started is None else started
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = run.sweep
    warnings = stopping_notes(sweep)
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    with ray_session(sweep, address, dashboard, worker_logs) as concurrent:
        data = sweep.experiment.data
        cache = prepared_cache(data, progress=True)  # once, before any trial starts
        sweep, notes = sweep.for_data(validation_has_factors(data, cache))
        sweep = replace(sweep, spectrum=training_spectrum(data, cache, progress=True))
        run = replace(run, sweep=sweep)
        print(sweep.spectrum.describe() if sweep.spectrum else "note: fewer than 2 training subjects: no data "
              "spectrum, so no collapse is predicted", file=sys.stderr, flush=True)
        for line in collapse_warnings(sweep) + validation_warnings(data, cache) + notes:
            print(line, file=sys.stderr, flush=True)
            warnings.append(line)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        _record_start(run)
        storage = open_storage(run.storage_url)
        study = open_study(storage, run.study_name, sweep)
        if run.resume:
            requeue_orphans(study, storage)  # a killed driver's; Ctrl-C requeues its own before it ends
        continued = continuations(study)
        remaining = sweep.spec.budget.num_samples - finished_count(study)
        print(
            f"{sweep.name}{' (smoke)' if sweep.smoke else ''}: study {run.study_name} in {_masked(run.storage_url)}; "
            f"{remaining} of {sweep.spec.budget.num_samples} trials to run, {concurrent} at a time, {sweep.epochs} "
            f"epochs each at {sweep.experiment.data.size}^3; early stop: {_early_stop(sweep)}; "
            f"sampler seed {run.seed}; results in {run.out_dir}",
            flush=True,
        )
        if continued:
            print(f"continuing interrupted trials {', '.join(continued)} from their checkpoints", flush=True)
        interruption = TuneInterruption()
        try:
            if remaining > 0:
                with interruption.watched(), _filtering(DeadProcessTraceback(), DeadProcessTraceback.LOGGERS):
                    _tune(run, storage, cache, remaining, concurrent, trackers)
        finally:
            if interruption.seen:  # Tune lets go of its running trials without a word to the searcher
                requeue_orphans(study, storage, "interrupted: the sweep was stopped (Ctrl-C) while it ran; continued "
                                                "by a later trial when the sweep is resumed")
            info = {
                "sweep": sweep.name, "run": run.out_dir.name, "study": run.study_name,
                "storage": _masked(run.storage_url), "smoke": sweep.smoke, "seed": run.seed, "warnings": warnings,
                "continued_trials": continued, "interrupted": interruption.seen,
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
            summary, rows = write_outputs(run.out_dir, sweep, study, info)
            _write_report(run.out_dir, study, sweep)
    print(trial_table(rows, sweep))
    wall = time.perf_counter() - started
    print(f"{summary['status_counts']}; wall time {wall:.0f} s; outputs in {run.out_dir}", flush=True)
    if summary["no_best"]:
        print(f"no best.yaml: {summary['no_best']}", flush=True)
    if interruption.seen:
        print(resume_advice(run, finished_count(study)), flush=True)
    return summary


def _early_stop(sweep: Sweep) -> str:
    """The early termination in force, for the start-up line."""
    early = sweep.spec.early_stop
    prediction = "predicted collapse stops after epoch 1" if early.stops_predicted else (
        "predicted collapse warned only" if early.predict == "warn" and early.mode != "none" else "")
    return early.mode + (f" ({prediction})" if prediction else "")


def _record_start(run: SweepRun) -> None:
    """``sweep.json``: the sweep as run, its study and seed; a resumed start adds its own seed and command."""
    path = run.out_dir / RECORD_JSON
    now = datetime.now(timezone.utc).isoformat()
    if run.resume:
        record = json.loads(path.read_text())
        record.setdefault("resumes", []).append({"started": now, "seed": run.seed, "command": _masked_command(sys.argv)})
    else:
        record = {
            **run.sweep.record(), "run": run.out_dir.name, "study": run.study_name,
            "storage": _masked(run.storage_url), "seed": run.seed, "created": now, "command": _masked_command(sys.argv),
        }
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())


def resume_advice(run: SweepRun, finished: int) -> str:
    """What to type to continue an interrupted run (the sweep's own command, not Tune's)."""
    storage = "" if run.default_storage else " --storage URL"
    return (
        f"interrupted with {finished} of {run.sweep.spec.budget.num_samples} trials finished; nothing is lost "
        f"(unfinished trials continue from their checkpoints). Continue with:\n"
        f"  python sweeps/run.py {run.sweep.name} --resume --run {run.out_dir.name} "
        f"--results {run.out_dir.parent.parent}{storage}"
    )


class TuneInterruption(logging.Filter):
    """Notices that Tune caught Ctrl-C (SIGINT), and keeps Tune's advice to resume with
    ``Tuner.restore`` (which a sweep never uses: see the module docstring) and its complaints
    about the trials it let go from the user: the sweep says what happened and what to type."""

    _TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")
    _AFTERWARDS = ("Tuner.restore", "Trials did not complete", "Failed to fetch metrics")

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Stop signal received" in message:
            self.seen = True
            print("interrupted: ending the running trials and writing the results (Ctrl-C again to skip that)",
                  file=sys.stderr, flush=True)
            return False
        return not (self.seen and any(words in message for words in self._AFTERWARDS))

    @contextmanager
    def watched(self) -> Iterator[None]:
        with _filtering(self, self._TUNE_LOGGERS):
            yield


class DeadProcessTraceback(logging.Filter):
    """Keeps from the user Tune's traceback of a trial whose process died (killed, out of memory, its
    node lost): it shows Ray's internals only; the live table says which trial and how it goes on
    (:func:`failure_reason`). A trial that raised keeps its traceback."""

    LOGGERS = ("ray.tune.execution.tune_controller",)

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import RayActorError

        return not (record.exc_info and isinstance(record.exc_info[1], RayActorError))


@contextmanager
def _filtering(log_filter: logging.Filter, names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(log_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(log_filter)


PROCESS_DIED = "its process died (killed, out of memory or its node lost)"


def failure_reason(error_text: str) -> str:
    """Why a trial failed, from its Tune ``error.txt`` (a block per failure, the newest last): its
    process died, or the last line of what it raised."""
    newest = error_text.rsplit("Failure # ", 1)[-1]
    if "RayActorError" in newest or "ActorDiedError" in newest or "actor died unexpectedly" in newest:
        return PROCESS_DIED
    lines = [line.strip() for line in newest.splitlines()[1:] if line.strip()]
    return f"it raised {lines[-1]}" if lines else "it failed"


@contextmanager
def ray_session(sweep: Sweep, address: str | None, dashboard: bool, worker_logs: bool) -> Iterator[int]:
    """Ray started (or joined) for the sweep; yields how many of its trials run side by side."""
    import ray

    from trainables.session import start_ray

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
    early = sweep.spec.early_stop
    stopper = CollapseStopper(sweep, run_root) if early.collapse_rule or early.stops_predicted else None
    attempt = len(list((run.out_dir / TUNE_DIR).glob("start-*"))) + 1
    tuner = tune.Tuner(
        trainable(sweep, trial_config(sweep.experiment, cache, run_root, resources)),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=asha, num_samples=remaining, max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"start-{attempt}", storage_path=str(run.out_dir / TUNE_DIR), stop=stopper,
            callbacks=[
                _printer(sweep, searcher), metrics_exporter(run.study_name, searcher.outcomes),
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
    from trainables.session import line_printer

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
        reason = outcome.reason
        if outcome.status == "failed":  # what Tune's traceback said, or that the process died
            reason = f"{failed(trial)}, with no restart left (resources.max_failures); its Tune folder holds error.txt"
        return line(trial, trial.last_result, outcome.status) + (f"\n    {reason}" if reason else "")

    def failed(trial) -> str:
        error_file = Path(trial.error_file) if trial.error_file else None
        return failure_reason(error_file.read_text()) if error_file and error_file.is_file() else "it failed"

    def on_restart(trial):
        """Why a failed trial goes on, and from which epoch."""
        why = failed(trial)
        checkpoint = trial.latest_checkpoint_result
        epoch = checkpoint.metrics.get("epoch") if checkpoint else None
        since = f"its checkpoint of epoch {epoch}" if epoch else "its start (no checkpoint yet)"
        return (line(trial, trial.last_result, "restarting")
                + f"\n    {why}; restarted from {since} (failure {trial.num_failures} of the {trial.max_failures} "
                   "resources.max_failures allows)")

    return line_printer(on_result, on_end, on_restart)
