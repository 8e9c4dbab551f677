"""From an experiment's ``data`` section to datasets: find or build the prepared cache.

``data.root`` may be a prepared cache (used as it is), a BraTS-style NIfTI tree (prepared
once into ``data.cache_dir``) or absent, in which case the phantom is generated once and
prepared the same way. Concurrent callers (several Ray workers on one node) serialise on
a lock file, so a cache is built by one of them and reused by the rest.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vae.config import DataConfig

from .cache import Manifest, check_pending, is_cache, prepare
from .dataset import CachedVolumes, load_split, save_split, split_subjects
from .preprocess import PreprocessParams
from .spectrum import Spectrum, cached_spectrum

DEFAULT_CACHE = "~/.cache/collapse-sweep"


def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir or os.environ.get("COLLAPSE_SWEEP_CACHE") or DEFAULT_CACHE).expanduser()


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def phantom_source(data: DataConfig) -> Path:
    """The phantom's NIfTI tree for ``data.phantom``, rendered once at ``data.size``.

    Its folder is named after everything that decides the volumes, the tissue maps included.
    """
    from .phantom import anatomy_key, write_phantom_dataset  # scipy and the MNI maps only when needed

    p = data.phantom
    out = cache_root(data) / f"phantom-{p.vary}-{anatomy_key(p.anatomy)}-n{p.subjects}-s{p.seed}-{data.size}"
    with _locked(cache_root(data)):
        write_phantom_dataset(out, p.subjects, data.size, anatomy=p.anatomy, vary=p.vary, seed=p.seed, progress=False)
    return out


def _preparation(data: DataConfig, source: Path) -> tuple[Path, PreprocessParams]:
    """Where the cache of ``source`` for ``data`` goes, and its preprocessing parameters."""
    params = PreprocessParams(size=data.size, modalities=tuple(data.modalities))
    # Named after the source and the parameters: two trees that share a folder name never collide.
    source_key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return cache_root(data) / "prepared" / f"{source.resolve().name}-{source_key}-{params.hash}", params


def prepared_cache(data: DataConfig, workers: int = 1, progress: bool = False) -> Path:
    """The cache directory holding ``data`` preprocessed at ``data.size``, building it if needed."""
    if data.root is not None and is_cache(data.root):
        return Path(data.root)
    source = Path(data.root) if data.root is not None else phantom_source(data)
    out, params = _preparation(data, source)
    with _locked(cache_root(data)):
        prepare(source, out, params, workers=workers, progress=progress)
    return out


def check_data(data: DataConfig) -> None:
    """Raise the :class:`~vae.data.DataError` :func:`prepared_cache` would raise, writing nothing.

    For a caller that must reject bad data before it starts anything (a sweep checks before
    Ray starts, then prepares). The phantom is generated: only the tissue maps it needs are
    looked for; a NIfTI ``data.root`` is read.
    """
    if data.root is None:
        if data.phantom.anatomy == "mni":
            from .phantom import require_mni_maps

            require_mni_maps()
        return
    if is_cache(data.root):
        return
    out, params = _preparation(data, Path(data.root))
    check_pending(data.root, out, params)


def training_datasets(data: DataConfig, cache: Path, split_file: Path | None = None) -> tuple[CachedVolumes, CachedVolumes]:
    """``(train, val)`` over ``cache`` with the seeded subject-level split, recorded in ``split_file``.

    An existing ``split_file`` wins over a fresh split, so a resumed run keeps its subjects.
    """
    if split_file is not None and split_file.is_file():
        train_ids, val_ids = load_split(split_file)
    else:
        ids = CachedVolumes(cache).ids
        train_ids, val_ids = split_subjects(ids, data.val_fraction, data.split_seed)
        if split_file is not None:
            save_split(split_file, train_ids, val_ids, seed=data.split_seed, val_fraction=data.val_fraction)
    return CachedVolumes(cache, train_ids, flip=data.flip, seed=data.split_seed), CachedVolumes(cache, val_ids)


def training_spectrum(data: DataConfig, cache: Path, progress: bool = False) -> Spectrum | None:
    """The spectrum of the training subjects a new run of ``data`` gets from ``cache``, computed once
    and stored with the cache (:mod:`vae.data.spectrum`); None with fewer than 2 of them."""
    ids = Manifest.load(cache).subject_ids
    train_ids = split_subjects(ids, data.val_fraction, data.split_seed)[0] if len(ids) > 1 else ids
    return cached_spectrum(cache, train_ids, progress=progress) if len(train_ids) > 1 else None


def validation_ids(data: DataConfig, manifest: Manifest) -> list[str]:
    """The validation subjects a new run of ``data`` gets from this cache (:func:`training_datasets`)."""
    ids = manifest.subject_ids
    return split_subjects(ids, data.val_fraction, data.split_seed)[1] if len(ids) > 1 else ids


def validation_has_factors(data: DataConfig, cache: Path) -> bool:
    """Whether any validation subject has a factor to probe the code with."""
    manifest = Manifest.load(cache)
    factors = manifest.factors
    return any(factors[s] for s in validation_ids(data, manifest))


def validation_warnings(data: DataConfig, cache: Path) -> list[str]:
    """What a user should know, before training, about what the validation set of ``data`` can measure.

    AU, MI and the through-channel probes are statistics over the validation subjects. Below
    :data:`~vae.evaluation.probes.MIN_VALIDATION_SUBJECTS` a probe's R^2 spreads by more than 0.1
    from one draw of subjects to the next (``bench/probe_subjects.py`` measures it).
    """
    from vae.evaluation.probes import MIN_VALIDATION_SUBJECTS

    manifest = Manifest.load(cache)
    ids, val_ids = manifest.subject_ids, validation_ids(data, manifest)
    lines = []
    if len(val_ids) < MIN_VALIDATION_SUBJECTS:
        lines.append(
            f"warning: the validation set holds {len(val_ids)} of {len(ids)} subjects (data.val_fraction "
            f"{data.val_fraction}); AU, MI and the probes of what the code carries need at least "
            f"{MIN_VALIDATION_SUBJECTS} to tell a code from chance: raise data.val_fraction or give more subjects"
        )
    if not validation_has_factors(data, cache):
        lines.append(
            "note: no validation subject has a segmentation or factor row, so nothing can say whether the code "
            "carries the tumour (semantic_r2 reads 0); give segmentations or prepare with --factors CSV"
        )
    return lines
