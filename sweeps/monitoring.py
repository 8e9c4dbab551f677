"""Watching a sweep from outside its terminal: Ray custom metrics and optional experiment trackers.

Every trial-epoch the sweep's driver sets Ray custom metrics (``ray.util.metrics`` gauges)
to the trial's latest AU, KL_raw, recon(μ), semantic probe, ... (:data:`EXPORTED_METRICS`), tagged
with the sweep (its study name) and the trial (``trial-NNNN``), and, as trials start and end, the
number of the sweep's trials in each status (``collapse_sweep_trials``, tagged with the status).
Ray exports them, prefixed ``ray_``, on each node's metrics port (``ray start
--metrics-export-port``), where Prometheus scraping the cluster and the Grafana dashboard shipped in
``sweeps/grafana/collapse_sweep.json`` chart them::

    ray_collapse_sweep_au{sweep="dip_sbd-20261124-101500",trial="trial-0003",...} 7.0
    ray_collapse_sweep_trials{sweep="dip_sbd-20261124-101500",status="collapsed",...} 3.0

Tune's own TensorBoard event files stay on (``results/<sweep>/<run>/tune``); W&B (offline
unless ``WANDB_MODE`` says otherwise) and MLflow are opt-in through Ray's logger callbacks.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, get_args

from vae.config import ConfigError

from .collapse_rule import Status

if TYPE_CHECKING:
    from ray.tune import Callback

METRIC_PREFIX = "collapse_sweep_"
# Reported key -> what its gauge says; the dashboard shows the description.
EXPORTED_METRICS = {
    "au": "active units of the trial's latest epoch",
    "kl_raw": "KL(q(z|x) || p(z)) of the latest epoch in nats, summed over latent dimensions",
    "recon_mu": "reconstruction error of the latest epoch, decoding the posterior means",
    "semantic_r2": "through-channel probe R^2 of the tumour's location and size (latest epoch, validation subjects)",
    "channel_nats": "Gaussian channel information of the code in nats, summed over latent dimensions",
    "prior_kl_dim_max": "largest KL of one latent dimension's aggregate posterior from N(0, 1), nats",
    "z_sensitivity": "how far z moves the decoder output, relative to the data's variance",
    "epoch": "epochs the trial has finished",
}
TAG_KEYS = ("sweep", "trial")
TRIALS_METRIC = "trials"  # the number of the sweep's trials in each status
STATUS_TAG_KEYS = ("sweep", "status")
STATUSES = ("running", *get_args(Status))
TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}  # --log choice -> the package it needs
MLFLOW_DB = "mlflow.db"


def status_counts(trials: Sequence, outcomes: Mapping[str, Any]) -> dict[str, int]:
    """Every status of :data:`STATUSES` with the number of ``trials`` (Tune's) in it: how each ended
    (``outcomes``, Tune trial id -> the searcher's ``Outcome``), else running if Tune runs it."""
    counts = dict.fromkeys(STATUSES, 0)
    for trial in trials:
        outcome = outcomes.get(trial.trial_id)
        if outcome is not None:
            counts[outcome.status] += 1
        elif trial.status == "RUNNING":
            counts["running"] += 1
    return counts


def metrics_exporter(sweep: str, outcomes: Mapping[str, Any]) -> Callback:
    """A Tune callback setting one gauge per :data:`EXPORTED_METRICS` key on every result, and the
    trials-by-status gauge whenever a trial starts, reports or ends.

    ``sweep`` tags every value; a trial is tagged with the run name in its config (the
    sweep's ``trial-NNNN``), else with its Tune trial id. ``outcomes`` is the searcher's record
    of how each trial ended (Tune tells the searcher before its callbacks).
    """
    from ray.tune import Callback
    from ray.util.metrics import Gauge

    from .space import RUN_NAME

    gauges = {
        key: Gauge(METRIC_PREFIX + key, description=text, tag_keys=TAG_KEYS)
        for key, text in EXPORTED_METRICS.items()
    }
    by_status = Gauge(METRIC_PREFIX + TRIALS_METRIC, description="trials of the sweep in each status",
                      tag_keys=STATUS_TAG_KEYS)

    def count(trials: Sequence) -> None:
        for status, number in status_counts(trials, outcomes).items():
            by_status.set(float(number), tags={"sweep": sweep, "status": status})

    class MetricsExporter(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            count(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tags = {"sweep": sweep, "trial": str(trial.config.get(RUN_NAME) or trial.trial_id)}
            for key, gauge in gauges.items():
                value = result.get(key)
                if isinstance(value, (int, float)):  # a diverged epoch reports a finite sentinel, never NaN
                    gauge.set(float(value), tags=tags)
            count(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            count(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            count(trials)

    return MetricsExporter()


def check_trackers(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when a requested tracker's package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--log {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"--log {name} needs the {TRACKERS[name]} package: pip install 'collapse-sweep[tracking]'"
            )


def tracker_callbacks(names: Sequence[str], out_dir: Path, study_name: str) -> list[Callback]:
    """Ray's logger callbacks for the requested trackers, writing beside the sweep's outputs.

    W&B runs offline into ``out_dir/wandb`` unless ``WANDB_MODE`` is set (upload later with
    ``wandb sync``); MLflow logs to ``MLFLOW_TRACKING_URI`` or else a SQLite store,
    ``out_dir/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///.../mlflow.db``). Either
    groups the trials under the study name.
    """
    check_trackers(names)
    callbacks = []
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback

        # Ray reads the mode from the environment to decide whether an API key is needed.
        mode = os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(WandbLoggerCallback(
            project="collapse-sweep", group=study_name, mode=mode, dir=str(out_dir), upload_checkpoints=False,
        ))
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / MLFLOW_DB).resolve()}"
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=study_name, save_artifact=False))
    return callbacks
