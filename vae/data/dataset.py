"""The training-side view of a cache: a map-style torch Dataset and a recorded split.

``CachedVolumes`` holds only paths and numbers, so it pickles into DataLoader workers and
Ray Train workers, and it opens each ``.npy`` only inside ``__getitem__`` (no file handle
or memory map survives a fork). It works with any sampler, including the
``DistributedSampler`` that Ray Train's ``prepare_data_loader`` inserts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vae.run_files import atomic_write

from .cache import Manifest
from .discovery import DataError
from .subject_factors import FactorTable


class CachedVolumes(Dataset):
    """Item ``i``: subject ``ids[i]`` as a float16 tensor ``[C, N, N, N]`` (as cached); its
    factors (from the segmentation and the factor table ``prepare`` was given) are row ``i`` of
    :attr:`factors`.

    With ``flip=True`` each spatial axis is flipped with probability 1/2, drawn from
    ``(seed, epoch, index)`` so an epoch is reproducible; call :meth:`set_epoch` each epoch
    (as with ``DistributedSampler``; DataLoader workers see it when they are created per
    epoch, i.e. without ``persistent_workers``).
    """

    def __init__(
        self, cache_dir: str | Path, subject_ids: Sequence[str] | None = None, flip: bool = False, seed: int = 0
    ):
        manifest = Manifest.load(cache_dir)
        self.ids = manifest.subject_ids if subject_ids is None else list(subject_ids)
        unknown = [i for i in self.ids if i not in manifest.entries]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            message = f"{len(unknown)} subject(s) not in the cache ({shown}); prepare them or fix the split"
            raise DataError(message, cache_dir)
        self.files = [str(Path(cache_dir) / manifest.entries[i]["file"]) for i in self.ids]
        self.shape = manifest.shape
        self.factors = FactorTable.of(manifest.factors, self.ids)  # rows in item order; None without factors
        self.modalities = manifest.params.modalities
        self.flip, self.seed, self.epoch = flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        volume = np.load(self.files[index], mmap_mode="r")  # float16 [C, N, N, N], nothing read yet
        if volume.shape != self.shape:
            message = f"shape {volume.shape}, but the manifest says {self.shape}; prepare the cache again"
            raise DataError(message, self.files[index])
        if self.flip:
            volume = np.flip(volume, axis=flip_axes(self.seed, self.epoch, index))
        # The copy reads the file and releases the map. It stays float16 (as stored): the training
        # loop converts on its device, so a loader moves half the bytes and never converts on the CPU.
        return torch.from_numpy(np.array(volume, order="C"))  # always a copy, never the map itself


def flip_axes(seed: int, epoch: int, index: int) -> tuple[int, ...]:
    """The spatial axes (of 1, 2, 3 in ``[C, X, Y, Z]``) to flip, each with probability 1/2."""
    coins = np.random.default_rng((seed, epoch, index)).random(3)
    return tuple(int(axis) + 1 for axis in np.flatnonzero(coins < 0.5))


def split_subjects(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)``, disjoint and sorted; the same for the same ids (in any order) and seed.

    The validation set has ``round(val_fraction * n)`` subjects, at least 1 and at most n - 1.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids repeat; each subject must be listed once")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 subjects to split into train and validation, got {len(ids)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[n_val:]), sorted(ids[i] for i in order[:n_val])


def save_split(
    path: str | Path,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    seed: int | None = None,
    val_fraction: float | None = None,
) -> None:
    """Record a split as JSON ``{"train", "val", "seed", "val_fraction"}``."""
    _check_disjoint(train_ids, val_ids, path)
    record = {"train": list(train_ids), "val": list(val_ids), "seed": seed, "val_fraction": val_fraction}
    atomic_write(Path(path), (json.dumps(record, indent=1) + "\n").encode())


def load_split(path: str | Path) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` as saved by :func:`save_split`."""
    try:
        record = json.loads(Path(path).read_text())
        train, val = list(record["train"]), list(record["val"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"not a readable split file ({err})", path) from None
    _check_disjoint(train, val, path)
    return train, val


def _check_disjoint(train_ids: Sequence[str], val_ids: Sequence[str], path: str | Path) -> None:
    shared = sorted(set(train_ids) & set(val_ids))
    if shared:
        raise DataError(f"subjects in both train and validation: {', '.join(shared[:5])}", path)
