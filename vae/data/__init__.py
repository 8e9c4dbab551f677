"""BraTS-style NIfTI data: discovery, validation, preprocessing, cache and dataset.

Typical use::

    manifest = prepare("BraTS2021/", "cache/128", PreprocessParams(size=128), workers=8)
    train_ids, val_ids = split_subjects(manifest.subject_ids, val_fraction=0.1, seed=0)
    train = CachedVolumes("cache/128", train_ids, flip=True)

The command line (``python -m vae.data check|prepare|phantom``) wraps the same functions.
"""
from .cache import Manifest, is_cache, prepare
from .checks import check, check_subject
from .discovery import ALIASES, MODALITIES, DataError, Problem, Subject, canonical_modality, discover, scan
from .preprocess import PreprocessParams, preprocess_subject

__all__ = [
    "ALIASES", "MODALITIES", "CachedVolumes", "DataError", "Manifest", "PreprocessParams", "Problem", "Subject",
    "canonical_modality", "check", "check_subject", "discover", "is_cache", "load_split", "prepare",
    "preprocess_subject", "save_split", "scan", "split_subjects",
]

_DATASET_NAMES = {"CachedVolumes", "load_split", "save_split", "split_subjects"}


def __getattr__(name: str):
    # The dataset module imports torch (seconds); loading it on first use keeps the CLI quick.
    if name in _DATASET_NAMES:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
