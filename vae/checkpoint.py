"""Training checkpoints: a directory holding ``checkpoint.pt``, replaced whole, read with ``weights_only=True``.

What goes into the state (model, optimizer, scaler, epoch, metrics) is the training loop's
business; this module stores it, finds it again, and turns the random number generator
states into types that ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
# The previous checkpoint, kept only for the moment between two renames of save_checkpoint.
_PREVIOUS_DIR = ".checkpoint-previous"


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and Python RNG states.

    The numpy key array becomes a list of ints, so the whole state loads with ``weights_only=True``.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``run_dir/checkpoint/checkpoint.pt``; returns the checkpoint directory.

    The new directory is written beside the old one and swapped in by two renames, so a
    crash leaves either checkpoint whole; :func:`find_checkpoint` knows where to look.
    """
    final, previous = run_dir / CHECKPOINT_DIR, run_dir / _PREVIOUS_DIR
    fresh = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint-new-"))
    try:
        torch.save(state, fresh / CHECKPOINT_FILE)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    fresh.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory a re-run of ``run_dir`` resumes from, or None."""
    for directory in (run_dir / CHECKPOINT_DIR, run_dir / _PREVIOUS_DIR):
        if (directory / CHECKPOINT_FILE).is_file():
            return directory
    return None


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """The state saved in ``directory`` (tensors on the CPU), loaded with ``weights_only=True``."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file; pass a directory written by save_checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never for a checkpoint
        raise ValueError(
            f"{path}: refused by the weights-only loader: it holds objects other than tensors and plain data "
            "(or is damaged), so it is not as this project wrote it; remove it or train in a new run directory"
        ) from None
