"""One Tune trial: its config dict, and the trainable that runs it on one or more workers.

A trial's config is a plain dict so that Tune can sample into it and store it::

    {"experiment": {...},                  # ExperimentConfig.model_dump(mode="json")
     "overrides": {"objective.kl.beta": 0.3},   # dotted keys applied on top (the searched values)
     "cache": "/data/prepared/...",       # prepared once by the caller before Tune starts
     "run_root": "/shared/runs",          # the run lives in run_root/<run_name or trial id>
     "run_name": None,                    # fixed name (single runs), else the trial id
     "workers": 1, "use_gpu": False, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0,
     "max_failures": 0}

With one worker the trial trains in its own process. With more, the trial process is a
driver that builds a Ray Train ``TorchTrainer`` whose workers run the same loop under DDP
(gloo on CPU, NCCL on GPU) and forward rank 0's report of every epoch to Tune.

Every rank reads the same ``cache``, writes into the same run directory, and the Train
run keeps its checkpoints under ``run_root/ray_train``: on a cluster of several nodes
``cache`` and ``run_root`` must be on a shared file system mounted at the same path on
every node.

Tune copies every checkpoint a one-worker trial reports into its own trial folder and
keeps them all unless told otherwise: give the Tuner's ``RunConfig`` a
``tune.CheckpointConfig(num_to_keep=2)``. When Tune retries a trial (its
``FailureConfig``), the trial resumes from its last checkpoint, and Tune's
``training_iteration`` starts again at 1: count progress by the reported ``epoch``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from vae.config import ConfigError, ExperimentConfig, set_dotted, validate_experiment

from .resources import TrialResources

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

TRAIN_STORAGE = "ray_train"  # under run_root: the Ray Train runs of multi-worker trials
_REQUIRED = ("experiment", "cache", "run_root")
_OPTIONAL = ("overrides", "run_name") + tuple(f.name for f in fields(TrialResources))


@dataclass(frozen=True)
class TrialSpec:
    """A trial's config dict, validated: the experiment with its overrides applied."""

    experiment: ExperimentConfig
    resources: TrialResources
    cache: Path
    run_root: Path
    run_name: str | None = None

    def run_dir(self, trial_id: str | None = None) -> Path:
        """Where the run writes ``epochs.csv``, its images and checkpoint."""
        name = self.run_name or trial_id
        if not name:
            raise ValueError("a trial without run_name needs its trial id to name its run directory")
        return self.run_root / name


def trial_config(
    cfg: ExperimentConfig,
    cache: str | Path,
    run_root: str | Path,
    resources: TrialResources = TrialResources(),
    overrides: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """The config dict of a trial of ``cfg`` (Tune search spaces may go in ``overrides``)."""
    config = {
        "experiment": cfg.model_dump(mode="json"),
        "overrides": dict(overrides or {}),
        "cache": str(Path(cache).resolve()),
        "run_root": str(Path(run_root).resolve()),
        "run_name": run_name,
        **{f.name: getattr(resources, f.name) for f in fields(TrialResources)},
    }
    if not any(_is_search_space(value) for value in config["overrides"].values()):
        parse_trial_config(config)  # fail now, not inside Ray
    return config


def parse_trial_config(config: Mapping[str, Any]) -> TrialSpec:
    """The validated :class:`TrialSpec` of a (sampled) trial config; :class:`ConfigError` names the bad key."""
    missing = [key for key in _REQUIRED if key not in config]
    unknown = sorted(set(config) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        problems = [f"missing key '{key}'" for key in missing] + [f"unknown key '{key}'" for key in unknown]
        raise ConfigError(f"trial config: {'; '.join(problems)}; expected keys {', '.join(_REQUIRED + _OPTIONAL)}")
    experiment, overrides = config["experiment"], config.get("overrides") or {}
    for key, value in (("experiment", experiment), ("overrides", overrides)):
        if not isinstance(value, Mapping):
            raise ConfigError(f"trial config: '{key}' must be a mapping, got {type(value).__name__}")
    raw = copy.deepcopy(dict(experiment))
    for key, value in overrides.items():
        set_dotted(raw, key, value, schema=ExperimentConfig)
    cfg = validate_experiment(raw, source="trial overrides" if overrides else "trial experiment")
    try:
        resources = TrialResources(**{f.name: config[f.name] for f in fields(TrialResources) if f.name in config})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"trial config: {err}") from None
    return TrialSpec(cfg, resources, Path(config["cache"]), Path(config["run_root"]), config.get("run_name"))


def trial_resources(config: Mapping[str, Any]) -> PlacementGroupFactory:
    """What Tune reserves for the trial of a sampled ``config``.

    Use as ``tune.with_resources(train_trial, trial_resources)``: the resources travel in
    the config, so trials with different worker counts can share one Tuner.
    """
    return parse_trial_config(config).resources.placement()


def _is_search_space(value: Any) -> bool:
    """A value Tune samples per trial (a ``tune.uniform(...)`` or ``{"grid_search": [...]}``)."""
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain) or (isinstance(value, dict) and "grid_search" in value)


def train_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: trains one experiment and reports every epoch to Tune."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = parse_trial_config(config)
    run_dir = spec.run_dir(ray.tune.get_context().get_trial_id())
    res = spec.resources
    if res.workers == 1:
        from .worker import run_experiment, single_process_device, tune_hooks

        run_experiment(spec.experiment, spec.cache, run_dir, tune_hooks(), single_process_device(res))
        return
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**config, "run_name": run_dir.name},  # every rank writes the same run_dir
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=res.worker_bundle
        ),
        run_config=ray.train.RunConfig(
            # A fixed name (no timestamp): a retried trial finds the run's snapshot and resumes.
            name=f"train-{run_dir.name}",
            storage_path=str(spec.run_root / TRAIN_STORAGE),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per report
        ),
    )
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """The loop of one Ray Train worker (one DDP rank) of a multi-worker trial."""
    from .worker import run_experiment, train_hooks, train_worker_device

    spec = parse_trial_config(config)
    run_experiment(spec.experiment, spec.cache, spec.run_dir(), train_hooks(), train_worker_device())
