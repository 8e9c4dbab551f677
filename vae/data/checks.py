"""Validation of BraTS-style input: every problem at once, one line each, naming the file.

Also home to the NIfTI reading and per-subject process-pool helpers that the cache
builder shares, so that a file fails with the same message wherever it is read.
"""
from __future__ import annotations

import gzip
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .discovery import MODALITIES, SEG, DataError, Problem, Subject, scan

AFFINE_ATOL_MM = 1e-3  # affines closer than this are the same grid

T = TypeVar("T")


def check(
    root: str | Path,
    modalities: Sequence[str] = MODALITIES,
    require_seg: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> list[Problem]:
    """Every problem with the subjects under ``root`` (a directory or CSV manifest); [] when clean.

    Discovery problems (nothing found, missing modality, duplicate id) come first, then each
    subject's file problems (unreadable, truncated gzip, not NIfTI, not 3D, grids that differ
    between modalities, NaN/Inf voxels, all-zero volumes) in subject order.
    """
    subjects, problems = scan(root, modalities, require_seg)
    for found in map_subjects(check_subject, subjects, workers, "check", progress):
        problems += found
    return problems


def check_subject(subject: Subject) -> list[Problem]:
    """The file problems of one subject. Each file is read in full, so truncation and gzip
    checksum errors show up here rather than half-way through a training run."""
    problems: list[Problem] = []
    reference: tuple[Path, nib.Nifti1Image] | None = None  # the first readable 3D file
    for kind, path in subject.files().items():
        messages, image = _file_problems(kind, path, reference)
        problems += [Problem(path, message, subject=subject.id) for message in messages]
        if reference is None and image is not None:
            reference = (path, image)
    return problems


def _file_problems(
    kind: str, path: Path, reference: tuple[Path, nib.Nifti1Image] | None
) -> tuple[list[str], nib.Nifti1Image | None]:
    """What is wrong with one file, and its image when it is a readable 3D volume."""
    try:
        image = read_nifti(path)
        with reading(path):
            data = np.asanyarray(image.dataobj)
    except DataError as err:
        return [err.reason], None
    if message := shape_problem(image.shape):
        return [message], None
    messages = []
    if reference is not None and (message := grid_mismatch(image, *reference)):
        messages.append(message)
    if np.issubdtype(data.dtype, np.floating) and (n_bad := data.size - np.count_nonzero(np.isfinite(data))):
        messages.append(f"{n_bad} NaN/Inf voxels; replace them (e.g. with 0) or regenerate the file")
    if kind != SEG and not np.any(data):
        messages.append("all voxels are zero (an empty volume); replace the file or remove the subject")
    return messages, image


# ---------------------------------------------------------------------------
# Reading NIfTI files with errors that name the file


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn the ways a NIfTI read fails into a :class:`DataError` naming ``path``."""
    try:
        yield
    except EOFError:
        raise DataError("truncated gzip: the file ends before its end-of-stream marker; copy it again", path) from None
    except (zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"corrupt gzip data ({err}); copy the file again", path) from None
    except (ImageFileError, HeaderDataError) as err:
        raise DataError(f"not a valid NIfTI file ({err})", path) from None
    except OSError as err:  # permissions, or an uncompressed file shorter than its header says
        reason = " ".join(str(err.strerror or err).split())
        raise DataError(f"cannot read the file ({reason}); check its permissions or copy it again", path) from None


def read_nifti(path: Path) -> nib.Nifti1Image:
    """The NIfTI-1 or -2 image at ``path``, read whole into memory.

    Reading every byte (rather than letting nibabel stop after the voxel data) makes gzip
    verify its checksum, so corruption inside the stream is caught, not just truncation.
    """
    with reading(path):
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        for image_class in (nib.Nifti1Image, nib.Nifti2Image):
            header_class = image_class.header_class
            if header_class.may_contain_header(raw[: header_class.template_dtype.itemsize]):
                return image_class.from_bytes(raw)
    raise DataError("not a NIfTI file (no NIfTI-1 or NIfTI-2 header at its start)", path)


def shape_problem(shape: tuple[int, ...]) -> str | None:
    if len(shape) != 3:
        return f"{len(shape)}D image of shape {tuple(shape)} where a 3D volume is expected; store one volume per file"
    return None


def grid_mismatch(image: nib.Nifti1Image, reference_path: Path, reference: nib.Nifti1Image) -> str | None:
    """Why ``image`` is not on the voxel grid of ``reference``, or None when it is."""
    if image.shape != reference.shape:
        return (
            f"shape {tuple(image.shape)} differs from {reference_path.name} {tuple(reference.shape)}; "
            "co-register the modalities to one grid"
        )
    difference = float(np.max(np.abs(image.affine - reference.affine)))
    if difference > AFFINE_ATOL_MM:
        return (
            f"affine differs from {reference_path.name} (largest entry difference {difference:.3g}); "
            "co-register the modalities to one grid"
        )
    return None


# ---------------------------------------------------------------------------
# Per-subject work in a process pool


def map_subjects(
    fn: Callable[[Subject], T], subjects: Sequence[Subject], workers: int = 1, desc: str = "", progress: bool = False
) -> list[T]:
    """``[fn(s) for s in subjects]``, in ``workers`` processes when > 1, with a progress bar.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    results: list[T] = [None] * len(subjects)  # type: ignore[list-item]
    bar = ProgressBar(len(subjects), desc, progress)
    try:
        if workers <= 1 or len(subjects) <= 1:
            for i, subject in enumerate(subjects):
                results[i] = fn(subject)
                bar.step(subject.id)
            return results
        pool = ProcessPoolExecutor(min(workers, len(subjects)))
        try:
            futures = {pool.submit(fn, subject): i for i, subject in enumerate(subjects)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                bar.step(subjects[i].id)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, drop the work not yet started
        return results
    finally:
        bar.close()


class ProgressBar:
    """tqdm on stderr when installed, else one line per item (a subject, a volume)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "subject"):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled and total > 0, 0
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"{self.desc} {self.done}/{self.total} {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
