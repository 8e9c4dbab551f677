"""A phantom data set on disk: BraTS-named NIfTI folders, ``factors.json`` per subject, ``factors.csv``.

Every file is written whole through :func:`vae.run_files.atomic_write`, so a reader (or a
rerun after a kill) never sees a partial file.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from vae.run_files import atomic_write, csv_bytes

from .anatomy import get_anatomy
from .factors import MODALITIES, flatten_factors, subject_factors
from .render import Grid, PhantomSubject, render_subject

# File suffix of each modality per naming scheme (BraTS 2023: t1n, t1c, t2w, t2f).
MODALITY_FILE_NAMES = {
    "brats2021": dict(zip(MODALITIES, MODALITIES)),
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
}
NAMINGS = tuple(MODALITY_FILE_NAMES)
ET_LABEL = {"brats2021": 4, "brats2023": 3}  # enhancing tumour; NCR is 1 and ED is 2 in both
INTENSITY_SCALE = 1000.0  # float intensity -> int16 in the written files


def subject_id(naming: str, index: int) -> str:
    """BraTS2021_00000 or BraTS-GLI-00000-000 (the trailing -000 is the timepoint)."""
    return f"BraTS2021_{index:05d}" if naming == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def subject_files(folder: Path, naming: str) -> dict[str, Path]:
    """modality (and 'seg') -> NIfTI path of one subject folder, in the naming's scheme."""
    separator = "_" if naming == "brats2021" else "-"
    names = {**MODALITY_FILE_NAMES[naming], "seg": "seg"}
    return {key: folder / f"{folder.name}{separator}{name}.nii.gz" for key, name in names.items()}


def _nifti_gz(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """The bytes of a .nii.gz file of ``volume`` (RAS mm, q- and s-form set)."""
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    # nibabel's own level; mtime 0 makes the file a function of the volume alone.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _as_int16(image: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int16)
    return np.clip(np.rint(image * INTENSITY_SCALE), info.min, info.max).astype(np.int16)


def _json_ready(value: Any) -> Any:
    """Plain JSON types (tuples become lists); NaN, an undefined factor, becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _complete_factors(folder: Path, naming: str, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored factors of a finished subject rendered with ``expected`` settings, else None."""
    factors_path = folder / "factors.json"
    if not factors_path.is_file() or not all(p.is_file() for p in subject_files(folder, naming).values()):
        return None
    try:
        stored = json.loads(factors_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    expected = _json_ready(expected)
    return stored if all(stored.get(k) == v for k, v in expected.items()) else None


def _write_subject(folder: Path, naming: str, subject: PhantomSubject, record: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    paths = subject_files(folder, naming)
    for modality, image in subject.images.items():
        atomic_write(paths[modality], _nifti_gz(_as_int16(image), subject.affine))
    atomic_write(paths["seg"], _nifti_gz(subject.seg, subject.affine))
    # factors.json last: its presence marks the subject complete.
    atomic_write(folder / "factors.json", (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())


def write_phantom_dataset(
    out: str | os.PathLike,
    n: int,
    size: int | Sequence[int],
    naming: str = "brats2021",
    anatomy: str = "mni",
    vary: str = "all",
    seed: int = 0,
    pin: Mapping[str, Any] | None = None,
    spacing: float | Sequence[float] | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n`` phantom subjects as BraTS-style NIfTI folders under ``out``; returns ``out``.

    Per subject: four int16 images (relative intensity x 1000), a uint8 seg, and
    ``factors.json``; for the set, ``factors.csv`` (one flat numeric row per subject). Subject
    ``i`` depends only on ``(seed, i)`` and the settings; a subject whose files are
    complete and whose stored factors match these settings is kept, not rendered again.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming '{naming}' is not one of {', '.join(NAMINGS)}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive number of subjects, got {n!r}")
    grid = Grid.make(size, spacing)
    atlas_name = get_anatomy(anatomy).name
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in tqdm(range(int(n)), desc=f"phantom -> {root}", unit="subject", file=sys.stderr, disable=not progress):
        name = subject_id(naming, index)
        folder = root / name
        sampled = subject_factors(seed, index, vary=vary, pin=pin, anatomy=anatomy)
        settings = {"subject": name, "naming": naming, "seed": seed, "index": index,
                    "anatomy": atlas_name, "shape": list(grid.shape), "spacing": list(grid.spacing)}  # fmt: skip
        record = _complete_factors(folder, naming, {**settings, **sampled})
        if record is None:
            subject = render_subject(sampled, grid.shape, grid.spacing, anatomy, et_label=ET_LABEL[naming])
            record = _json_ready({**settings, **subject.factors})
            _write_subject(folder, naming, subject, record)
        # The table holds numbers only (text settings stay in factors.json): a factor table for evaluation.
        rows.append({k: v for k, v in flatten_factors(record).items() if k == "subject" or not isinstance(v, str)})
    atomic_write(root / "factors.csv", csv_bytes(rows, list(rows[0])))
    return root
