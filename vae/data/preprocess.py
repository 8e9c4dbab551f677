"""One preprocessing for every subject: RAS, crop/pad/resample to N^3, masked z-score.

Geometry is done in a single ``scipy.ndimage.affine_transform`` per channel (order 1):
an output voxel ``j`` (per axis) samples the input at voxel index
``centre + (j - (N - 1) / 2) * step``, where ``centre`` is the centre of the brain's
bounding box and ``step`` is the output spacing over the input spacing. Samples beyond
the volume read zeros, which is the zero padding. So:

* mode ``"fit"``: the output spacing is the longest side of the bounding box in mm over N
  (isotropic), i.e. crop to the bounding box, pad to a cube in mm, resample to N^3;
* mode ``"spacing"``: the output spacing is given, i.e. resample to that spacing, then
  crop or pad to N^3 around the brain's centre.

When the output grid is coarser than the input, each channel is first smoothed with a
Gaussian of sigma = (step - 1) / 2 input voxels (the anti-aliasing rule of
``skimage.transform.resize``) so that small outputs do not alias. The brain mask goes
through the same resampling; output voxels more than half inside the brain form the new
mask, and their values are divided by that fraction, so that the brain's rim is an average
of brain voxels rather than dimmed by the zero background.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from .checks import grid_mismatch, read_nifti, reading, shape_problem
from .discovery import MODALITIES, DataError, Subject, canonical_modalities

PIPELINE_VERSION = 2  # bump when the maths below or a cache entry changes: it invalidates every cache entry


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that determines the preprocessed array; :attr:`hash` names it in caches."""

    size: int = 128  # output edge N
    mode: Literal["fit", "spacing"] = "fit"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # output voxel size in mm, mode "spacing" only
    clip: float = 5.0  # z-scores are clipped to [-clip, clip]
    modalities: tuple[str, ...] = MODALITIES  # channel order

    def __post_init__(self) -> None:
        spacing = (self.spacing,) * 3 if isinstance(self.spacing, (int, float)) else tuple(self.spacing)
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        object.__setattr__(self, "modalities", canonical_modalities(self.modalities))
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"size must be an integer >= 2, got {self.size!r}")
        if self.mode not in ("fit", "spacing"):
            raise ValueError(f"mode must be 'fit' or 'spacing', got {self.mode!r}")
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be one or three positive sizes in mm, got {self.spacing!r}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spacing": list(self.spacing), "modalities": list(self.modalities)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessParams":
        return cls(**{**data, "spacing": tuple(data["spacing"]), "modalities": tuple(data["modalities"])})

    @property
    def hash(self) -> str:
        """A short digest of the parameters and the pipeline version, stable across runs."""
        text = json.dumps({"version": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Geometry:
    """Where a subject's source voxels land in its cube: output voxel ``j`` (per axis) samples the
    source at voxel index ``lo + offset + step * j`` (RAS order); ``lo:hi`` is the brain's box."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    source_voxel_mm: tuple[float, float, float]
    output_voxel_mm: tuple[float, float, float]
    size: int

    @staticmethod
    def fit(lo: np.ndarray, hi: np.ndarray, voxel_mm: np.ndarray, params: PreprocessParams) -> Geometry:
        """The geometry ``params`` asks for, for a brain in the source box ``lo:hi``."""
        extent_mm = (hi - lo) * voxel_mm
        out_mm = np.full(3, extent_mm.max() / params.size) if params.mode == "fit" else np.asarray(params.spacing)
        return Geometry(*(tuple(v.tolist()) for v in (lo, hi, voxel_mm, out_mm)), params.size)

    @staticmethod
    def from_info(info: dict[str, Any], size: int) -> Geometry:
        """The geometry recorded in a cache entry's ``info`` (see :func:`preprocess_subject`)."""
        lo, hi = info["bbox_ras_voxels"]
        return Geometry(tuple(lo), tuple(hi), tuple(info["source_voxel_mm"]), tuple(info["output_voxel_mm"]), size)

    @property
    def box(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def step(self) -> np.ndarray:
        """Source voxels per output voxel, per axis."""
        return np.asarray(self.output_voxel_mm) / np.asarray(self.source_voxel_mm)

    @property
    def offset(self) -> np.ndarray:
        """Box index sampled by output voxel 0: the cube is centred on the box."""
        return (np.asarray(self.hi) - np.asarray(self.lo) - 1) / 2 - self.step * (self.size - 1) / 2

    @property
    def source_voxel_volume(self) -> float:
        return float(np.prod(self.source_voxel_mm))

    @property
    def output_voxel_volume(self) -> float:
        return float(np.prod(self.output_voxel_mm))

    def to_output_index(self, source_index: np.ndarray) -> np.ndarray:
        """Source voxel indices ``[..., 3]`` as (fractional) indices of the output cube."""
        return (np.asarray(source_index) - np.asarray(self.lo) - self.offset) / self.step


def preprocess_subject(subject: Subject, params: PreprocessParams) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The subject's modalities as one normalised cube.

    Returns ``(array, mask, info)``: ``array`` float16 ``[C, N, N, N]`` (C = len(params.modalities),
    RAS axis order, z-scored inside the mask, clipped, background exactly 0), ``mask`` bool
    ``[N, N, N]`` (output voxels more than half inside the brain, where any modality is nonzero)
    and ``info``, a JSON-ready record of the geometry (:meth:`Geometry.from_info`) and of each
    channel's z-score mean and std.
    """
    volumes, voxel_mm, axcodes = load_canonical(subject, params.modalities)
    brain = np.logical_or.reduce([v != 0 for v in volumes])  # [X, Y, Z]
    if not brain.any():
        raise DataError("every modality is zero; remove the subject", subject.directory)
    geometry = Geometry.fit(*bounding_box(brain), voxel_mm, params)

    def resample(volume: np.ndarray) -> np.ndarray:
        return resample_cube(volume[geometry.box], geometry.step, geometry.offset, params.size)

    coverage = resample(brain.astype(np.float32))  # fraction of brain under each output voxel
    mask = coverage > 0.5
    if not mask.any():
        raise DataError(f"the brain vanishes when resampled to {params.size}^3; use a larger size", subject.directory)
    array = np.empty((len(volumes),) + mask.shape, dtype=np.float16)
    means, stds = [], []
    for channel, volume in enumerate(volumes):
        # Dividing by the coverage (normalised convolution) averages brain voxels only, so the
        # zero background does not darken the brain's rim.
        brain_only = np.divide(resample(volume), coverage, out=np.zeros_like(coverage), where=mask)
        array[channel], mean, std = zscore_in_mask(brain_only, mask, params.clip)
        means.append(mean)
        stds.append(std)
    info = {
        "source_shape": list(brain.shape),
        "source_axcodes": axcodes,
        "source_voxel_mm": list(geometry.source_voxel_mm),
        "bbox_ras_voxels": [list(geometry.lo), list(geometry.hi)],
        "output_voxel_mm": list(geometry.output_voxel_mm),
        "mean": means,
        "std": stds,
        "mask_fraction": float(mask.mean()),
    }
    return array, mask, info


def load_canonical(subject: Subject, modalities: tuple[str, ...]) -> tuple[list[np.ndarray], np.ndarray, str]:
    """Each modality as a float32 ``[X, Y, Z]`` array in RAS order, the voxel size in mm ``[3]``
    and the source orientation code (e.g. ``"LPS"``). All modalities must share one grid."""
    volumes, reference = [], None
    for modality in modalities:
        path = subject.paths.get(modality)
        if path is None:
            raise DataError(f"subject {subject.id} has no {modality} file", subject.directory)
        image = read_nifti(path)
        if message := shape_problem(image.shape):
            raise DataError(message, path)
        if reference is None:
            reference = (path, image)
        elif message := grid_mismatch(image, *reference):
            raise DataError(message, path)
        with reading(path):
            # The same reorientation for every modality, since they share the affine.
            canonical = nib.as_closest_canonical(image)
            volume = canonical.get_fdata(dtype=np.float32)
        if not np.isfinite(volume).all():
            raise DataError("NaN/Inf voxels; replace them (e.g. with 0) or regenerate the file", path)
        volumes.append(volume)
    voxel_mm = nib.affines.voxel_sizes(canonical.affine)
    return volumes, voxel_mm, "".join(nib.aff2axcodes(reference[1].affine))


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` int ``[3]`` with ``mask[lo:hi]`` the smallest box holding every True voxel."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return np.array(lo), np.array(hi)


def resample_cube(volume: np.ndarray, step: np.ndarray, offset: np.ndarray, size: int) -> np.ndarray:
    """Linear resampling of ``volume`` ``[X, Y, Z]`` to ``[size]^3``, output voxel ``j`` reading
    input index ``offset + step * j``, zeros outside; Gaussian anti-aliasing where step > 1."""
    sigma = np.maximum(0.0, (step - 1) / 2)
    if sigma.any():
        volume = ndimage.gaussian_filter(volume, sigma, mode="constant", cval=0.0)
    # A 1-D matrix is the diagonal: scipy then takes its faster zoom-and-shift path.
    return ndimage.affine_transform(
        volume, step, offset, output_shape=(size,) * 3, order=1, mode="grid-constant", cval=0.0, prefilter=False
    )


def zscore_in_mask(volume: np.ndarray, mask: np.ndarray, clip: float) -> tuple[np.ndarray, float, float]:
    """``((volume - mean) / std`` clipped to ``[-clip, clip]`` inside ``mask``, 0 outside; and the
    mean and std of ``volume[mask]`` (float64), for ``volume`` and ``mask`` of one shape."""
    values = volume[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    scaled = (volume - mean) / (std if std > 0 else 1.0)  # a constant channel becomes all zeros
    return np.where(mask, np.clip(scaled, -clip, clip), 0.0), mean, std
