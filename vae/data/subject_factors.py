"""Factors of variation per subject: from its tumour segmentation, and from a table of one's own.

Factors are what an evaluation checks a latent code against (does it carry the tumour's size
and location?). ``prepare`` records the segmentation's factors with each cached subject, and a
CSV of ``subject`` plus numeric columns (:func:`read_factor_table`, e.g. a phantom's
``factors.csv``) adds factors or overrides them.

From a segmentation:

BraTS labels: 1 necrotic / non-enhancing core, 2 oedema (2023: surrounding FLAIR
hyperintensity), 4 enhancing tumour in 2020/2021 and 3 in 2023 (a file never holds both, so
either counts as enhancing). Per subject, with the whole tumour = every nonzero label:

- ``tumour_log_volume``: log(1 + whole-tumour volume in cached voxels);
- ``tumour_centroid_x|y|z``: its centre of mass in the cached cube, normalised to [-1, 1]
  along each RAS axis (-1 the first voxel's centre, +1 the last's);
- ``enhancing_fraction``, ``necrotic_fraction``, ``oedema_fraction``: shares of the whole tumour.

The factors are computed on the segmentation at its own resolution and mapped into the cached
frame through the same crop, pad and scale as the image (:class:`~vae.data.preprocess.Geometry`),
so a small tumour does not vanish on a coarse grid. A subject without tumour has a log-volume
of 0 and no centroid or fractions (NaN: left out of those factors). The segmentation is also
resampled into the cube (nearest neighbour), for pictures and checks.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from .checks import read_nifti, reading
from .discovery import DataError
from .preprocess import Geometry

NECROTIC, OEDEMA = 1, 2
ENHANCING = (3, 4)  # BraTS 2023, BraTS 2020/2021
AXES = ("x", "y", "z")
SEG_FACTORS = (
    "tumour_log_volume", *(f"tumour_centroid_{a}" for a in AXES),
    "enhancing_fraction", "necrotic_fraction", "oedema_fraction",
)
LOCATION_FACTORS = tuple(f"tumour_centroid_{a}" for a in AXES)
SIZE_FACTORS = ("tumour_log_volume",)


def load_labels(path) -> np.ndarray:
    """The segmentation at ``path`` as integer labels ``[X, Y, Z]`` in RAS order (as the images)."""
    image = read_nifti(path)
    with reading(path):
        labels = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    return np.rint(labels).astype(np.int16)


def seg_factors(labels: np.ndarray, geometry: Geometry) -> dict[str, float]:
    """The factors of the module docstring for ``labels`` ``[X, Y, Z]`` on the source grid."""
    tumour = labels > 0
    voxels = int(tumour.sum())
    volume = voxels * geometry.source_voxel_volume / geometry.output_voxel_volume
    factors = {"tumour_log_volume": math.log1p(volume)}
    if voxels == 0:
        return factors | dict.fromkeys(SEG_FACTORS[1:], math.nan)
    centre = np.argwhere(tumour).mean(axis=0)  # source voxel indices
    normalised = geometry.to_output_index(centre) * 2.0 / (geometry.size - 1) - 1.0
    factors |= {f"tumour_centroid_{a}": float(v) for a, v in zip(AXES, normalised)}
    factors["enhancing_fraction"] = float(np.isin(labels, ENHANCING).sum() / voxels)
    factors["necrotic_fraction"] = float((labels == NECROTIC).sum() / voxels)
    factors["oedema_fraction"] = float((labels == OEDEMA).sum() / voxels)
    return factors


def resample_labels(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``labels`` in the cached cube ``[N, N, N]`` (uint8), nearest neighbour: no label is invented."""
    cropped = labels[geometry.box]
    return ndimage.affine_transform(
        cropped, geometry.step, geometry.offset, output_shape=(geometry.size,) * 3, order=0, mode="grid-constant",
        cval=0, prefilter=False,
    ).astype(np.uint8)


# --------------------------------------------------------------------------- a table of one's own

Factors = dict[str, dict[str, float]]  # subject id -> {factor name: value (NaN: undefined)}
SUBJECT_COLUMN = "subject"


def read_factor_table(path: str | Path) -> Factors:
    """The factors of a CSV file: a ``subject`` column and numeric columns (an empty cell is undefined).

    A :class:`DataError` naming the file says what is wrong: no ``subject`` column, a repeated
    subject, or a cell that is not a number (naming its column and row).
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read it as a CSV table ({err}); give a CSV file of subject and factor columns", path)
    if SUBJECT_COLUMN not in columns:
        raise DataError(f"no '{SUBJECT_COLUMN}' column (columns: {', '.join(columns) or 'none'}); name the "
                        "column of subject ids 'subject'", path)
    table: Factors = {}
    for line, row in enumerate(rows, start=2):
        subject = (row.get(SUBJECT_COLUMN) or "").strip()
        if subject in table:
            raise DataError(f"subject '{subject}' appears twice (line {line}); give each subject one row", path)
        table[subject] = {name: _number(row.get(name), name, line, path) for name in columns if name != SUBJECT_COLUMN}
    if not table:
        raise DataError("no rows; give one row per subject", path)
    return table


def _number(cell: str | None, column: str, line: int, path: Path) -> float:
    if cell is None or not cell.strip():
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"column '{column}' is not numeric (line {line}: {cell!r}); factors are numbers "
                        "(leave a cell empty where a factor is undefined)", path) from None


def merge_factors(base: Mapping[str, Mapping[str, float]], extra: Factors, subjects: Iterable[str],
                  source: str | Path) -> Factors:
    """``base`` with ``extra``'s factors added (or overriding) for ``subjects``; a table that names
    none of them is a :class:`DataError` naming ``source`` (a table for other data)."""
    subjects = list(subjects)
    matched = [s for s in subjects if s in extra]
    if not matched:
        example = next(iter(extra), "")
        raise DataError(f"none of its {len(extra)} subjects (e.g. '{example}') is among the {len(subjects)} of the "
                        f"data (e.g. '{subjects[0] if subjects else ''}'); check that its subject ids match", source)
    return {s: {**base.get(s, {}), **extra.get(s, {})} for s in subjects}


@dataclass(frozen=True)
class FactorTable:
    """Factors as an array: ``values[i, k]`` is factor ``names[k]`` of the i-th subject (NaN: undefined)."""

    names: tuple[str, ...]
    values: np.ndarray  # [subjects, factors] float64

    @staticmethod
    def of(factors: Mapping[str, Mapping[str, float]], subjects: Sequence[str]) -> "FactorTable | None":
        """The table of ``subjects`` in that order, its columns every factor any of them has; None when none has one."""
        names = tuple(sorted({name for s in subjects for name in factors.get(s, {})}))
        if not names:
            return None
        values = np.array([[factors.get(s, {}).get(name, math.nan) for name in names] for s in subjects], np.float64)
        return FactorTable(names, values.reshape(len(subjects), len(names)))

