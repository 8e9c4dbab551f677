"""Ray side of collapse-sweep: the per-trial trainable wrapping ``vae.training``.

With ``vae/`` free of Ray imports, this package (and ``sweeps/``) are the only places
that import Ray.

A sweep prepares the data once, builds the trial config with its search space and
hands Tune the trainable (after ``ray.init``)::

    resources = TrialResources(workers=2, use_gpu=True, gpus_per_worker=0.5)
    config = trial_config(cfg, prepared_cache(cfg.data), run_root, resources,
                          overrides={"objective.kl.beta": tune.loguniform(0.01, 1.0)})
    tuner = tune.Tuner(
        tune.with_resources(train_trial, trial_resources), param_space=config,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(resources), ...),
        run_config=tune.RunConfig(checkpoint_config=tune.CheckpointConfig(num_to_keep=2), ...),
    )

``collapse-sweep train`` (:mod:`trainables.single_run`) runs one experiment the same way.
"""
from .resources import DRIVER_CPU, ResourceError, TrialResources, max_concurrent_trials
from .trial import TrialSpec, parse_trial_config, train_trial, train_worker, trial_config, trial_resources

__all__ = [
    "DRIVER_CPU", "ResourceError", "TrialResources", "TrialSpec", "max_concurrent_trials", "parse_trial_config",
    "train_trial", "train_worker", "trial_config", "trial_resources",
]
