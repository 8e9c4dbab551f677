"""What the command lines that run trials on Ray share (one run, ``collapse-sweep train``, and a
sweep, ``python sweeps/run.py``): the errors that mean bad input, starting or joining Ray, and a
Tune callback that prints one line per result.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

from vae.config import ConfigError
from vae.data import DataError

from .resources import ResourceError, TrialResources

if TYPE_CHECKING:
    from ray.tune import Callback
    from ray.tune.experiment import Trial

# Raised before any compute when the configuration, the data or the resources are unusable (exit status 2).
BAD_INPUT_ERRORS = (ConfigError, DataError, ResourceError)


def start_ray(
    address: str | None, resources: TrialResources, dashboard: bool = True, worker_logs: bool = False
) -> None:
    """Join the Ray cluster at ``address`` (``"auto"``: the one running here), or start a local instance.

    A local instance gets at least the CPUs one trial asks for: more logical CPUs than
    cores only oversubscribes them, whereas too few would leave the trial waiting forever.
    Without the dashboard a stopped multi-worker trial leaks its workers' resources (Ray
    Train frees them through the dashboard's State API), so switch it off in tests only.
    """
    import ray

    if address:
        ray.init(address=address, logging_level="warning", log_to_driver=worker_logs)
        return
    needed = math.ceil(sum(bundle["CPU"] for bundle in resources.bundles))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=dashboard,
        logging_level="warning", log_to_driver=worker_logs,
    )


def line_printer(
    on_result: Callable[[Trial, dict], str | None], on_end: Callable[[Trial], str | None] | None = None,
    on_restart: Callable[[Trial], str | None] | None = None,
) -> Callback:
    """A Tune callback printing ``on_result(trial, result)`` for every result, ``on_end(trial)``
    when a trial ends (completed, stopped or errored) and ``on_restart(trial)`` when Tune restarts
    a failed trial from its checkpoint; a ``None`` line is not printed."""
    from ray.tune import Callback

    def emit(line: str | None) -> None:
        if line is not None:
            print(line, flush=True)

    class LinePrinter(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            emit(on_result(trial, result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            if on_end is not None:
                emit(on_end(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            if on_end is not None:
                emit(on_end(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            if on_restart is not None:
                emit(on_restart(trial))

    return LinePrinter()
