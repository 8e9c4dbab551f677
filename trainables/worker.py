"""What runs in one training process: the datasets, the device and the hooks that connect
``vae.training.fit`` to a Tune session (one worker) or a Ray Train session (one DDP rank).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vae.config import ExperimentConfig
from vae.data.sources import training_datasets
from vae.run_files import SPLIT_JSON
from vae.training import FitOutcome, Hooks, fit

from .resources import TrialResources



def run_experiment(cfg: ExperimentConfig, cache: Path, run_dir: Path, hooks: Hooks, device: torch.device) -> FitOutcome:
    """Train ``cfg`` on the prepared ``cache`` into ``run_dir`` (shared by all ranks of a trial)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # The split is recorded in the run, so a resumed run (or another rank) trains on the same subjects.
    train_set, val_set = training_datasets(cfg.data, cache, split_file=run_dir / SPLIT_JSON)
    return fit(cfg, train_set, val_set, run_dir, hooks=hooks, device=device)


def single_process_device(resources: TrialResources) -> torch.device:
    """The device of a one-worker trial (Tune limits the visible GPUs to the trial's share)."""
    if not resources.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the trial asks for a GPU but its process sees no CUDA device; check the node's drivers")
    return torch.device("cuda")


def train_worker_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def local_directory(checkpoint: Any) -> Path | None:
    """A local directory holding a Ray ``Checkpoint``'s files (downloaded if it is remote)."""
    if checkpoint is None:
        return None
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory())


def tune_hooks() -> Hooks:
    """Hooks for a one-worker trial: report to the Tune session and resume from its checkpoint."""
    import ray.tune

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    return Hooks(report=report, latest_checkpoint=lambda: local_directory(ray.tune.get_checkpoint()))


def train_hooks() -> Hooks:
    """Hooks for a rank of a multi-worker trial: DDP preparation by Ray Train, reports through it.

    Every rank must call ``ray.train.report`` each epoch (it is a barrier); only rank 0
    hands over the checkpoint, and only rank 0's metrics reach Tune, which is why
    ``fit`` reduces the losses and diagnostics across ranks before it reports them.
    """
    import ray.train
    import ray.train.torch

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        chief = ray.train.get_context().get_world_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and chief else None
        ray.train.report(metrics, checkpoint=checkpoint)

    return Hooks(
        prepare_model=ray.train.torch.prepare_model,
        prepare_loader=ray.train.torch.prepare_data_loader,
        report=report,
        latest_checkpoint=lambda: local_directory(ray.train.get_checkpoint()),
    )
