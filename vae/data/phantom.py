"""Synthetic 4-modality brain MRI with a tumour and known generative factors.

Each subject is a normal anatomy (the MNI ICBM152 2009 tissue maps shipped in the
nilearn wheel, a pinned dependency, or analytic ellipsoids on request) warped by a random
pose and a smooth elastic field, with a tumour (necrotic core, enhancing rim, oedema
that follows white matter) inserted with mass effect. t1, t1ce, t2 and flair are
synthesised from relative tissue intensities, then a bias field and Rician noise are
applied. Every factor of variation is recorded, so a representation can be scored
against ground truth. A subject is a pure function of its factors, and the factors are
a pure function of ``(seed, index)``.

Coordinates: the output grid is RAS in mm and centred at 0. Template coordinates
``x`` relate to output coordinates ``y`` through
``x = c0 + R^T (y - t) / s + u(.)``: per-axis scale ``s``, rotation ``R = Rz Ry Rx``
(angles ``rotation_deg``), translation ``t``, and an elastic displacement ``u``.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates
from tqdm import tqdm

from .discovery import DataError

MODALITIES = ("t1", "t1ce", "t2", "flair")
# File suffix of each modality per naming scheme (BraTS 2023: t1n, t1c, t2w, t2f).
MODALITY_FILE_NAMES = {
    "brats2021": dict(zip(MODALITIES, MODALITIES)),
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
}
NAMINGS = tuple(MODALITY_FILE_NAMES)
ET_LABEL = {"brats2021": 4, "brats2023": 3}  # enhancing tumour; NCR is 1 and ED is 2 in both
ANATOMIES = ("mni", "procedural")
VARY = ("all", "tumour")
FOV_MM = 200.0  # default field of view of the output grid

# Relative intensities (a plausible contrast ordering, not a relaxometry simulation).
# Rows follow MODALITIES, columns follow TISSUES.
TISSUES = ("csf", "gm", "wm", "necrosis", "enhancing", "oedema")
TISSUE_INTENSITY = np.array(
    [
        [0.15, 0.50, 0.75, 0.20, 0.45, 0.45],  # t1
        [0.15, 0.50, 0.75, 0.20, 1.00, 0.45],  # t1ce: the rim enhances
        [1.00, 0.60, 0.40, 0.95, 0.70, 0.85],  # t2
        [0.08, 0.55, 0.42, 0.35, 0.70, 0.95],  # flair: CSF suppressed, oedema bright
    ],
    dtype=np.float32,
)

BACKGROUND_BRAIN_FRACTION = 0.02  # below this brain fraction a voxel is exactly 0
INTENSITY_SCALE = 1000.0  # float intensity -> int16 in the written files

# Sampled factors: (low, high) of the uniform draws, per component for vectors.
FACTOR_RANGES = {
    "brain_scale": (0.9, 1.1),
    "rotation_deg": (-10.0, 10.0),
    "translation_mm": (-6.0, 6.0),
    "elastic_amplitude_mm": (0.0, 3.0),
    "tumour_radius_mm": (8.0, 25.0),
    "necrosis_fraction": (0.0, 0.7),
    "edema_extent_mm": (3.0, 25.0),
    "irregularity": (0.0, 0.25),
    "mass_effect": (0.0, 0.5),
    "gain": (0.7, 1.3),
    "bias_strength": (0.0, 0.25),
    "noise_sigma": (0.01, 0.04),
}
TUMOUR_PROBABILITY = 0.9
TUMOUR_SITE_MIN_WM = 0.6  # tumour centres are drawn among voxels this white ...
TUMOUR_SITE_MIN_Z_MM = -25.0  # ... and above this height (keeps them out of the cerebellum)
SITE_SPACING_MM = 2.0

_VECTOR_FACTORS = ("brain_scale", "rotation_deg", "translation_mm", "tumour_centre_tpl_mm")
_SEED_FACTORS = ("elastic_seed", "tumour_shape_seed", "bias_seed", "noise_seed")
SAMPLED_FACTORS = (
    "brain_scale", "rotation_deg", "translation_mm", "elastic_amplitude_mm", "elastic_seed",
    "tumour_present", "tumour_centre_tpl_mm", "tumour_radius_mm", "necrosis_fraction",
    "edema_extent_mm", "irregularity", "mass_effect", "tumour_shape_seed",
    "gain", "bias_strength", "bias_seed", "noise_sigma", "noise_seed",
)  # fmt: skip
# vary="tumour": everything but the tumour is held at these values.
NEUTRAL_FACTORS = {
    "brain_scale": [1.0, 1.0, 1.0],
    "rotation_deg": [0.0, 0.0, 0.0],
    "translation_mm": [0.0, 0.0, 0.0],
    "elastic_amplitude_mm": 0.0,
    "tumour_present": True,
    "gain": dict.fromkeys(MODALITIES, 1.0),
    "bias_strength": 0.0,
    "noise_sigma": 0.02,  # the noise level stays fixed; its realisation still differs per subject
}

_XYZ = ("x", "y", "z")
# Flat (factors.csv) names of the scalar factors usable as ground truth for a representation.
PHANTOM_FACTORS = [
    *(f"brain_scale_{a}" for a in _XYZ),
    *(f"rotation_deg_{a}" for a in _XYZ),
    *(f"translation_mm_{a}" for a in _XYZ),
    "elastic_amplitude_mm",
    "tumour_present",
    *(f"tumour_centre_tpl_mm_{a}" for a in _XYZ),
    *(f"tumour_centre_vox_{a}" for a in _XYZ),
    *(f"tumour_centre_norm_{a}" for a in _XYZ),
    "tumour_radius_mm",
    "tumour_radius_vox",
    "necrosis_fraction",
    "edema_extent_mm",
    "irregularity",
    "mass_effect",
    "hemisphere",
    *(f"gain_{m}" for m in MODALITIES),
    "bias_strength",
    "noise_sigma",
    "vol_ncr",
    "vol_ed",
    "vol_et",
    "vol_brain",
]


# ---------------------------------------------------------------------------
# Small pure helpers


def soft_step(distance: np.ndarray, width: float) -> np.ndarray:
    """0.5 (1 + tanh(d / w)): a membership that is 1 inside (d > 0), 0 outside, smooth over ~w."""
    return 0.5 * (1.0 + np.tanh(distance / np.float32(width)))


def edge_width(spacing: Sequence[float]) -> float:
    """Soft-edge width in mm: half a voxel, at least 0.5 mm (limits aliasing of sharp borders)."""
    return max(float(np.mean(spacing)) / 2.0, 0.5)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for rotations about x, y, z by the given angles in degrees. [3, 3]"""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_depth(points: np.ndarray, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Approximate signed depth in mm below an ellipsoid's surface (> 0 inside). points: [3, ...]"""
    scaled = [(p - np.float32(c)) / np.float32(a) for p, c, a in zip(points, centre, semi_axes)]
    q = np.sqrt(sum(s * s for s in scaled))
    # First-order distance (q - 1) / |grad q|; |grad q| is bounded below by 1 / largest axis.
    grad = np.sqrt(sum((s / np.float32(a)) ** 2 for s, a in zip(scaled, semi_axes))) / np.maximum(q, 1e-6)
    return (1.0 - q) / np.maximum(grad, np.float32(1.0 / max(semi_axes)))


# ---------------------------------------------------------------------------
# Anatomies: CSF / GM / WM fractions at template coordinates


@dataclass(frozen=True)
class Anatomy:
    """A normal brain: tissue fractions as a function of template position (mm)."""

    name: str
    centre_mm: tuple[float, float, float]  # c0: the brain's centre, mapped to the grid centre
    tumour_sites_mm: np.ndarray  # [M, 3] candidate tumour centres on a SITE_SPACING_MM lattice
    fractions: Callable[[np.ndarray, float], np.ndarray]  # ([3, ...] mm, spacing mm) -> [3, ...] csf, gm, wm


def _tumour_sites(points: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Lattice points [M, 3] that are clearly white matter and above the cerebellum."""
    keep = (wm > TUMOUR_SITE_MIN_WM) & (points[2] > TUMOUR_SITE_MIN_Z_MM)
    return points[:, keep].T.astype(np.float64)


def mni_template_paths() -> dict[str, Path] | None:
    """The ICBM152 2009 t1 / gm / wm maps inside the installed nilearn, or None.

    Found by path so that nilearn (slow to import) is never imported.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    return paths if all(p.is_file() for p in paths.values()) else None


MISSING_MNI = (
    "data.phantom.anatomy 'mni' needs the MNI152 tissue maps of the nilearn package, which is not installed: "
    "run ./setup.sh (or `pip install -e .`, which installs the pinned nilearn), or use the procedural anatomy "
    "(data.phantom.anatomy=procedural, or --anatomy procedural)"
)


def require_mni_maps() -> dict[str, Path]:
    """:func:`mni_template_paths`, or a one-line :class:`DataError` that says how to install them."""
    paths = mni_template_paths()
    if paths is None:
        raise DataError(MISSING_MNI)
    return paths


def anatomy_key(anatomy: str) -> str:
    """What identifies ``anatomy``'s tissue maps in a cache name: a phantom rendered from other maps
    (another nilearn release) is another data set."""
    if anatomy == "procedural":
        return "procedural"
    digest = hashlib.sha256()
    for path in require_mni_maps().values():
        digest.update(path.read_bytes())
    return f"mni-{digest.hexdigest()[:8]}"


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks of [C, X, Y, Z] (sizes divisible by factor)."""
    c, x, y, z = volume.shape
    blocks = volume.reshape(c, x // factor, factor, y // factor, factor, z // factor, factor)
    return blocks.mean(axis=(2, 4, 6), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def mni_anatomy() -> Anatomy:
    """ICBM152 2009 tissue fractions as a 1 / 2 / 4 mm block-averaged pyramid (loaded once)."""
    paths = require_mni_maps()
    images = {k: nib.load(p) for k, p in paths.items()}
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"{paths['t1']}: expected a 1 mm RAS grid, got affine\n{affine}")
    maps = {k: np.asanyarray(img.dataobj).astype(np.float32) / 255.0 for k, img in images.items()}
    mask = (maps["t1"] > 0).astype(np.float32)  # the T1 is skull-stripped
    gm, wm = maps["gm"] * mask, maps["wm"] * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # Crop to the brain (plus a margin) and pad to a multiple of the coarsest block.
    coarsest = 4
    inside = np.argwhere(mask > 0)
    lo = np.maximum(inside.min(0) - coarsest, 0)
    hi = np.minimum(inside.max(0) + coarsest + 1, mask.shape)
    tissue = np.stack([csf, gm, wm])[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    tissue = np.pad(tissue, [(0, 0)] + [(0, (-n) % coarsest) for n in tissue.shape[1:]])
    origin = affine[:3, 3] + lo  # mm of voxel 0 of the crop

    # A block of f voxels starting at voxel 0 is centred at (f - 1) / 2.
    levels = tuple(
        (float(f), origin + (f - 1) / 2.0, np.ascontiguousarray(tissue if f == 1 else _block_mean(tissue, f)))
        for f in (1, 2, coarsest)
    )
    centre = tuple(float(v) for v in affine[:3, 3] + (inside.min(0) + inside.max(0)) / 2.0)

    def fractions(points: np.ndarray, spacing: float) -> np.ndarray:
        # The coarsest level not coarser than the output spacing: finer levels alias.
        fine_enough = [lv for lv in levels if lv[0] <= spacing] or [levels[0]]
        step, level_origin, level = fine_enough[-1]
        index = np.stack([(p - np.float32(o)) / np.float32(step) for p, o in zip(points, level_origin)])
        return np.stack([map_coordinates(m, index, order=1, mode="constant", cval=0.0, prefilter=False) for m in level])

    site_step, site_origin, site_level = levels[1]
    site_grid = np.stack(
        np.meshgrid(*(o + site_step * np.arange(n) for o, n in zip(site_origin, site_level.shape[1:])), indexing="ij")
    )
    return Anatomy("mni_icbm152_2009a_sym", centre, _tumour_sites(site_grid, site_level[2]), fractions)


# Procedural anatomy (mm, template centred at 0).
CEREBRUM_SEMI_AXES_MM = (68.0, 86.0, 66.0)
OUTER_CSF_MM = 1.5
CORTEX_MM = 3.5
VENTRICLES = tuple(((side * 11.0, -4.0, 12.0), (4.5, 26.0, 10.0)) for side in (-1, 1))  # (centre, semi-axes)
THALAMI = tuple(((side * 10.0, -16.0, 0.0), (8.0, 12.0, 9.0)) for side in (-1, 1))


def procedural_fractions(points: np.ndarray, spacing: float) -> np.ndarray:
    """CSF / GM / WM of an ellipsoid cerebrum with a wavy cortex, ventricles and thalami.

    points: [3, ...] template mm -> [3, ...] fractions that sum to the brain membership.
    """
    width = edge_width([spacing])
    depth = _ellipsoid_depth(points, (0.0, 0.0, 0.0), CEREBRUM_SEMI_AXES_MM)
    x, y, z = points
    # Gyri-like thickness modulation of the cortical ribbon (wavelengths ~35-45 mm).
    ribbon = CORTEX_MM * (1.0 + 0.5 * np.sin(x / 6.3 + 0.4) * np.sin(y / 7.1 + 1.3) * np.sin(z / 5.7 + 2.1))
    inside = soft_step(depth, width)
    below_csf = soft_step(depth - OUTER_CSF_MM, width)
    white = soft_step(depth - OUTER_CSF_MM - ribbon, width)
    ventricle = np.maximum(*(soft_step(_ellipsoid_depth(points, c, a), width) for c, a in VENTRICLES))
    thalamus = np.maximum(*(soft_step(_ellipsoid_depth(points, c, a), width) for c, a in THALAMI))
    csf = inside - below_csf + white * ventricle
    gm = below_csf - white + white * (1.0 - ventricle) * thalamus
    wm = white * (1.0 - ventricle) * (1.0 - thalamus)
    return np.stack([csf, gm, wm]).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=1)
def procedural_anatomy() -> Anatomy:
    """The analytic anatomy; needs no data files."""
    axes = [np.arange(-a, a + SITE_SPACING_MM, SITE_SPACING_MM) for a in CEREBRUM_SEMI_AXES_MM]
    site_grid = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    wm = procedural_fractions(site_grid, SITE_SPACING_MM)[2]
    return Anatomy("procedural_ellipsoids", (0.0, 0.0, 0.0), _tumour_sites(site_grid, wm), procedural_fractions)


def get_anatomy(anatomy: str = "mni") -> Anatomy:
    """'mni' (the ICBM152 maps) or 'procedural' (analytic ellipsoids)."""
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy '{anatomy}' is not one of {', '.join(ANATOMIES)}")
    return mni_anatomy() if anatomy == "mni" else procedural_anatomy()


# ---------------------------------------------------------------------------
# Factors


def _as_number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"factor '{name}' must be a finite number, got {value!r}")
    return number


def _as_vector(name: str, value: Any) -> list[float]:
    if np.shape(value) != (3,):
        raise ValueError(f"factor '{name}' must be 3 finite numbers (x, y, z), got {value!r}")
    return [_as_number(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _as_factor(name: str, value: Any) -> Any:
    """A pinned or loaded factor value in its canonical JSON-friendly form."""
    if name in _VECTOR_FACTORS:
        return _as_vector(name, value)
    if name == "gain":
        if not isinstance(value, Mapping):
            value = dict.fromkeys(MODALITIES, value)  # one number pins every modality
        if set(value) != set(MODALITIES):
            raise ValueError(f"factor 'gain' needs one value per modality {MODALITIES}, got keys {sorted(value)}")
        return {m: _as_factor(f"gain[{m}]", value[m]) for m in MODALITIES}
    if name == "tumour_present":
        if value not in (True, False):
            raise ValueError(f"factor 'tumour_present' must be true or false, got {value!r}")
        return bool(value)
    number = _as_number(name, value)
    if name in _SEED_FACTORS:
        if not number.is_integer() or number < 0:
            raise ValueError(f"factor '{name}' must be a non-negative integer seed, got {value!r}")
        return int(number)
    return number


def sample_factors(
    rng: np.random.Generator, vary: str = "all", pin: Mapping[str, Any] | None = None, anatomy: str = "mni"
) -> dict[str, Any]:
    """Draw the sampled factors of one subject (ranges in FACTOR_RANGES).

    Every factor is always drawn, in a fixed order, so pinning one leaves the others'
    draws unchanged. ``vary="tumour"`` then holds pose, elastic field, gains, bias and
    noise level at NEUTRAL_FACTORS (with a tumour always present); ``pin`` maps any name
    of SAMPLED_FACTORS to a fixed value and wins over both. The tumour centre is a white
    matter site of ``anatomy``.
    """
    if vary not in VARY:
        raise ValueError(f"vary '{vary}' is not one of {', '.join(VARY)}")
    pin = dict(pin or {})
    unknown = sorted(set(pin) - set(SAMPLED_FACTORS))
    if unknown:
        raise ValueError(f"cannot pin {unknown}: pinnable factors are {', '.join(SAMPLED_FACTORS)}")
    sites = get_anatomy(anatomy).tumour_sites_mm

    def uniform(name: str, size: int | None = None) -> Any:
        low, high = FACTOR_RANGES[name]
        value = rng.uniform(low, high, size)
        return [float(v) for v in value] if size else float(value)

    def seed() -> int:
        return int(rng.integers(2**31))

    factors = {
        "brain_scale": uniform("brain_scale", 3),
        "rotation_deg": uniform("rotation_deg", 3),
        "translation_mm": uniform("translation_mm", 3),
        "elastic_amplitude_mm": uniform("elastic_amplitude_mm"),
        "elastic_seed": seed(),
        "tumour_present": bool(rng.random() < TUMOUR_PROBABILITY),
        # A lattice site plus a sub-lattice jitter, so that positions are continuous.
        "tumour_centre_tpl_mm": [
            float(v) for v in sites[rng.integers(len(sites))] + rng.uniform(-0.5, 0.5, 3) * SITE_SPACING_MM
        ],
        "tumour_radius_mm": uniform("tumour_radius_mm"),
        "necrosis_fraction": uniform("necrosis_fraction"),
        "edema_extent_mm": uniform("edema_extent_mm"),
        "irregularity": uniform("irregularity"),
        "mass_effect": uniform("mass_effect"),
        "tumour_shape_seed": seed(),
        "gain": {m: uniform("gain") for m in MODALITIES},
        "bias_strength": uniform("bias_strength"),
        "bias_seed": seed(),
        "noise_sigma": uniform("noise_sigma"),
        "noise_seed": seed(),
    }
    held = {**(NEUTRAL_FACTORS if vary == "tumour" else {}), **pin}
    factors.update({name: _as_factor(name, value) for name, value in held.items()})  # fresh copies
    return factors


def subject_factors(
    seed: int, index: int, vary: str = "all", pin: Mapping[str, Any] | None = None, anatomy: str = "mni"
) -> dict[str, Any]:
    """The sampled factors of subject ``index`` of the set drawn with ``seed`` (reproducible)."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return sample_factors(np.random.default_rng([seed, index]), vary=vary, pin=pin, anatomy=anatomy)


def _check_factors(factors: Mapping[str, Any]) -> dict[str, Any]:
    missing = [name for name in SAMPLED_FACTORS if name not in factors]
    if missing:
        raise ValueError(f"factors lack {missing}: build them with sample_factors or subject_factors")
    checked = {name: _as_factor(name, factors[name]) for name in SAMPLED_FACTORS}
    bounds = {  # (name, lowest, highest, what goes wrong outside)
        "mass_effect": (0.0, 0.999, "the displacement must stay monotone (< 1)"),
        "necrosis_fraction": (0.0, 1.0, "the necrosis lies inside the core"),
        "tumour_radius_mm": (1e-3, math.inf, "the radius must be positive"),
        "edema_extent_mm": (0.0, math.inf, "an extent cannot be negative"),
        "irregularity": (0.0, 0.6, "larger values can make the radius negative"),
        "noise_sigma": (0.0, math.inf, "a standard deviation cannot be negative"),
        "bias_strength": (0.0, math.inf, "a strength cannot be negative"),
        "elastic_amplitude_mm": (0.0, math.inf, "an amplitude cannot be negative"),
    }
    for name, (low, high, why) in bounds.items():
        if not low <= checked[name] <= high:
            raise ValueError(f"factor '{name}' = {checked[name]} is outside [{low}, {high}]: {why}")
    if min(checked["brain_scale"]) <= 0:
        raise ValueError(f"factor 'brain_scale' = {checked['brain_scale']} must be positive")
    return checked


def flatten_factors(factors: Mapping[str, Any]) -> dict[str, Any]:
    """One flat row: vectors become ``name_x/_y/_z``, the gain dict ``gain_<modality>``, booleans 0/1."""
    row: dict[str, Any] = {}
    for name, value in factors.items():
        if isinstance(value, Mapping):
            row.update({f"{name}_{key}": item for key, item in value.items()})
        elif isinstance(value, (list, tuple, np.ndarray)):
            row.update({f"{name}_{axis}": item for axis, item in zip(_XYZ, value)})
        elif isinstance(value, bool):
            row[name] = int(value)
        else:
            row[name] = value
    return row


# ---------------------------------------------------------------------------
# Random fields, each a pure function of its seed


def _elastic_waves(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Wave vectors [3 components, 3 terms, 3] in rad/mm (wavelengths 80-160 mm) and phases [3, 3]."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((3, 3, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    wavelength = rng.uniform(80.0, 160.0, (3, 3, 1))
    phases = rng.uniform(0, 2 * np.pi, (3, 3))
    return (2 * np.pi / wavelength * directions).astype(np.float32), phases.astype(np.float32)


def elastic_displacement(points: np.ndarray, amplitude: float, seed: int) -> np.ndarray:
    """u_i(x) = A / sqrt(3) * sum_k sin(k_ik . x + phi_ik). points: [3, ...] mm -> [3, ...] mm"""
    waves, phases = _elastic_waves(seed)
    scale = np.float32(amplitude / math.sqrt(3.0))
    def wave(i: int, k: int) -> np.ndarray:
        return np.sin(sum(w * p for w, p in zip(waves[i, k], points)) + phases[i, k])

    return np.stack([sum(wave(i, k) for k in range(3)) * scale for i in range(3)])


def _shape_harmonics(seed: int, terms: int = 3) -> tuple[np.ndarray, ...]:
    """Directions [J, 3], integer frequencies [J] (2-5, little shift of the centre), amplitudes and phases [J]."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequency = rng.integers(2, 6, terms)
    return directions, frequency, rng.uniform(0.5, 1.0, terms), rng.uniform(0, 2 * np.pi, terms)


def tumour_radius(direction: np.ndarray, radius: float, irregularity: float, seed: int) -> np.ndarray:
    """r(u) = r0 (1 + iota/2 * sum_j a_j sin(m_j pi u.v_j + phi_j)). direction: [3, ...] unit -> [...] mm"""
    if irregularity == 0:
        return np.full(direction.shape[1:], radius, dtype=np.float32)
    directions, frequency, amplitude, phase = (np.asarray(a, np.float32) for a in _shape_harmonics(seed))
    wobble = sum(
        a * np.sin(m * np.float32(np.pi) * sum(v_i * u_i for v_i, u_i in zip(v, direction)) + phi)
        for v, m, a, phi in zip(directions, frequency, amplitude, phase)
    )
    return np.float32(radius) * (1.0 + np.float32(irregularity / 2) * wobble)


def bias_log_field(points: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """Second-order polynomial log-bias per modality. points: [3, ...] mm -> [4, ...]

    The coefficients have unit L1 norm, so |log bias| <= strength within +-100 mm.
    """
    rng = np.random.default_rng(seed)
    coefficients = rng.uniform(-1.0, 1.0, (len(MODALITIES), 9))
    coefficients *= strength / np.abs(coefficients).sum(axis=1, keepdims=True)
    x, y, z = (p / np.float32(100.0) for p in points)
    monomials = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    return np.stack([sum(np.float32(c) * m for c, m in zip(row, monomials)) for row in coefficients])


# ---------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Grid:
    """An output grid: RAS, axis-aligned, centred at 0 mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def make(cls, shape: int | Sequence[int], spacing: float | Sequence[float] | None = None) -> "Grid":
        """Cubic ``shape`` S or (X, Y, Z); ``spacing`` defaults to FOV_MM / max(shape), isotropic."""
        dims = (shape,) * 3 if np.ndim(shape) == 0 else tuple(shape)
        if len(dims) != 3 or any(isinstance(n, bool) or int(n) != n or n < 1 for n in dims):
            raise ValueError(f"shape must be a positive int or 3 positive ints, got {shape!r}")
        dims = tuple(int(n) for n in dims)
        step = FOV_MM / max(dims) if spacing is None else spacing
        steps = (step,) * 3 if np.isscalar(step) else tuple(step)
        if len(steps) != 3 or not all(math.isfinite(s) and s > 0 for s in steps):
            raise ValueError(f"spacing must be a positive number or 3 positive numbers (mm), got {spacing!r}")
        return cls(dims, tuple(float(s) for s in steps))

    @property
    def origin(self) -> np.ndarray:
        """Position (mm) of voxel (0, 0, 0). [3]"""
        return -(np.asarray(self.shape) - 1) / 2.0 * np.asarray(self.spacing)

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> RAS mm. [4, 4]"""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def points(self) -> np.ndarray:
        """Voxel centres in mm, [3, X, Y, Z] float32."""
        axes = [(o + s * np.arange(n)).astype(np.float32) for o, s, n in zip(self.origin, self.spacing, self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij", copy=True))


@dataclass
class PhantomSubject:
    images: dict[str, np.ndarray]  # modality -> [X, Y, Z] float32, 0 outside the brain
    seg: np.ndarray  # [X, Y, Z] uint8: 0, NCR 1, ED 2, ET et_label
    affine: np.ndarray  # [4, 4] voxel -> RAS mm
    factors: dict[str, Any]  # sampled and derived factors


def _template_points(grid_points: np.ndarray, factors: Mapping[str, Any], centre: Sequence[float]) -> np.ndarray:
    """Output mm [3, ...] -> template mm before the elastic field: c0 + R^T (y - t) / s."""
    inverse = rotation_matrix(factors["rotation_deg"]).T / np.asarray(factors["brain_scale"])[:, None]
    offset = np.asarray(centre) - inverse @ np.asarray(factors["translation_mm"])
    return np.stack(
        [sum(np.float32(inverse[i, j]) * grid_points[j] for j in range(3)) + np.float32(offset[i]) for i in range(3)]
    )


def _output_position(template_mm: np.ndarray, factors: Mapping[str, Any], centre: Sequence[float]) -> np.ndarray:
    """Where a template point (after the elastic field) lands in output mm. [3] -> [3]

    Solves a + u(a) = x for a by fixed-point iteration (|grad u| < 1 for the sampled fields),
    then applies y = t + R (s * (a - c0)).
    """
    a = np.asarray(template_mm, dtype=np.float64)
    amplitude = factors["elastic_amplitude_mm"]
    for _ in range(30 if amplitude else 0):
        a = template_mm - elastic_displacement(a, amplitude, factors["elastic_seed"]).astype(np.float64)
    scaled = np.asarray(factors["brain_scale"]) * (a - np.asarray(centre))
    return np.asarray(factors["translation_mm"]) + rotation_matrix(factors["rotation_deg"]) @ scaled


def _tumour_memberships(
    x: np.ndarray, tissue: np.ndarray, factors: Mapping[str, Any], width: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft core, necrosis and oedema fractions of the brain at template points x. -> 3 x [...]"""
    centre = factors["tumour_centre_tpl_mm"]
    r0, extent = factors["tumour_radius_mm"], factors["edema_extent_mm"]
    offset = np.stack([p - np.float32(c) for p, c in zip(x, centre)])
    rho = np.sqrt((offset * offset).sum(0))
    radius = tumour_radius(offset / np.maximum(rho, 1e-6), r0, factors["irregularity"], factors["tumour_shape_seed"])
    core = soft_step(radius - rho, width)
    inner = factors["necrosis_fraction"] * radius
    # A necrosis thinner than the edge fades out rather than half-filling the centre voxel.
    necrosis = soft_step(inner - rho, width) * np.tanh(inner / np.float32(width))
    csf, gm, wm = tissue
    brain = np.maximum(csf + gm + wm, 1e-6)
    # Oedema spreads along white matter and never into CSF.
    affinity = np.clip(0.2 + wm / brain, 0.0, 1.0) * (1.0 - csf / brain)
    oedema = soft_step(radius * np.float32(1.0 + extent / r0) - rho, width) * (1.0 - core) * affinity
    return core, necrosis, oedema


def _mass_effect(x: np.ndarray, factors: Mapping[str, Any]) -> np.ndarray:
    """x' = c_T + (x - c_T)(1 - kappa exp(-(rho / R)^2)), R = r0 + e: anatomy pushed outward. [3, ...]"""
    kappa = factors["mass_effect"]
    if kappa == 0:
        return x
    centre = factors["tumour_centre_tpl_mm"]
    reach = factors["tumour_radius_mm"] + factors["edema_extent_mm"]
    offset = np.stack([p - np.float32(c) for p, c in zip(x, centre)])
    shrink = 1.0 - np.float32(kappa) * np.exp(-(offset * offset).sum(0) / np.float32(reach**2))
    return np.stack([np.float32(c) + o * shrink for o, c in zip(offset, centre)])


def render_subject(
    factors: Mapping[str, Any],
    shape: int | Sequence[int],
    spacing: float | Sequence[float] | None = None,
    anatomy: str = "mni",
    et_label: int = 4,
) -> PhantomSubject:
    """Render one subject from its sampled factors onto a grid of ``shape`` (``spacing`` mm).

    Returns images in relative units (brain tissue ~0.1-1.3), the seg with ET as
    ``et_label`` (4: BraTS 2021, 3: BraTS 2023) and the factors plus derived ones:
    tumour_centre_vox / _norm (voxel index, and the same mapped to [-1, 1] corner to corner),
    tumour_radius_vox (radius in mm times the geometric-mean scale over the geometric-mean
    spacing), hemisphere (+1 right, -1 left, 0 without tumour), vol_* (mm^3), anatomy,
    shape and spacing. Tumour geometry is NaN when tumour_present is false.
    """
    if et_label not in (3, 4):
        raise ValueError(f"et_label must be 4 (BraTS 2021) or 3 (BraTS 2023), got {et_label!r}")
    factors = _check_factors(factors)
    grid = Grid.make(shape, spacing)
    atlas = get_anatomy(anatomy)
    width = edge_width(grid.spacing)
    y = grid.points()

    x = _template_points(y, factors, atlas.centre_mm)
    if factors["elastic_amplitude_mm"] > 0:
        x += elastic_displacement(x, factors["elastic_amplitude_mm"], factors["elastic_seed"])
    tumour = factors["tumour_present"]
    tissue = atlas.fractions(_mass_effect(x, factors) if tumour else x, min(grid.spacing))
    inside = tissue.sum(0) >= BACKGROUND_BRAIN_FRACTION  # outside stays exactly 0
    # From here on only the brain's voxels, as flat [C, M] arrays.
    x, y, tissue = x[:, inside], y[:, inside], tissue[:, inside]
    brain = tissue.sum(0)
    if tumour:
        core, necrosis, oedema = _tumour_memberships(x, tissue, factors, width)
    else:
        core = necrosis = oedema = np.zeros_like(brain)

    normal = (1.0 - core) * (1.0 - oedema)
    lesion = np.stack([brain * necrosis, brain * (core - necrosis), brain * (1.0 - core) * oedema])  # NCR, ET, ED
    mixture = np.concatenate([normal * tissue, lesion])  # [6, M] in TISSUES order
    images = TISSUE_INTENSITY @ mixture  # [4, M]
    if factors["bias_strength"] > 0:
        images *= np.exp(bias_log_field(y, factors["bias_strength"], factors["bias_seed"]))
    images *= np.asarray([[factors["gain"][m]] for m in MODALITIES], np.float32)
    if factors["noise_sigma"] > 0:  # Rician: magnitude of a complex signal with Gaussian noise
        noise = np.random.default_rng(factors["noise_seed"]).standard_normal((2, *images.shape), dtype=np.float32)
        noise *= np.float32(factors["noise_sigma"])
        images = np.sqrt((images + noise[0]) ** 2 + noise[1] ** 2)

    # Label: the largest of (normal, NCR, ET, ED) where the lesion holds over half of the brain.
    classes = np.concatenate([(brain * normal)[None], lesion])
    label_of_class = np.array([0, 1, et_label, 2], dtype=np.uint8)
    labels = np.where(brain - classes[0] > 0.5 * brain, label_of_class[classes.argmax(0)], 0)

    volumes = np.zeros((len(MODALITIES), *grid.shape), dtype=np.float32)
    volumes[:, inside] = images
    seg = np.zeros(grid.shape, dtype=np.uint8)
    seg[inside] = labels
    derived = _derived_factors(factors, grid, atlas, seg, inside, et_label)
    return PhantomSubject(
        images={m: volumes[i] for i, m in enumerate(MODALITIES)},
        seg=seg,
        affine=grid.affine,
        factors={**factors, **derived},
    )


def _derived_factors(
    factors: Mapping[str, Any], grid: Grid, atlas: Anatomy, seg: np.ndarray, inside: np.ndarray, et_label: int
) -> dict[str, Any]:
    voxel_mm3 = float(np.prod(grid.spacing))
    derived: dict[str, Any] = {"anatomy": atlas.name, "shape": list(grid.shape), "spacing": list(grid.spacing)}
    if factors["tumour_present"]:
        centre_mm = _output_position(np.asarray(factors["tumour_centre_tpl_mm"]), factors, atlas.centre_mm)
        centre_vox = (centre_mm - grid.origin) / np.asarray(grid.spacing)
        centre_norm = 2.0 * centre_vox / np.maximum(np.asarray(grid.shape) - 1, 1) - 1.0
        scale = float(np.prod(factors["brain_scale"])) ** (1 / 3)
        radius_vox = factors["tumour_radius_mm"] * scale / voxel_mm3 ** (1 / 3)
        side = 1 if factors["tumour_centre_tpl_mm"][0] >= atlas.centre_mm[0] else -1  # RAS: +x is right
    else:
        centre_vox = centre_norm = np.full(3, np.nan)
        radius_vox, side = math.nan, 0
    derived.update(
        tumour_centre_vox=[float(v) for v in centre_vox],
        tumour_centre_norm=[float(v) for v in centre_norm],
        tumour_radius_vox=float(radius_vox),
        hemisphere=side,
        vol_ncr=float((seg == 1).sum()) * voxel_mm3,
        vol_ed=float((seg == 2).sum()) * voxel_mm3,
        vol_et=float((seg == et_label).sum()) * voxel_mm3,
        vol_brain=float(inside.sum()) * voxel_mm3,
    )
    return derived


# ---------------------------------------------------------------------------
# Files


def subject_id(naming: str, index: int) -> str:
    """BraTS2021_00000 or BraTS-GLI-00000-000 (the trailing -000 is the timepoint)."""
    return f"BraTS2021_{index:05d}" if naming == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def subject_files(folder: Path, naming: str) -> dict[str, Path]:
    """modality (and 'seg') -> NIfTI path of one subject folder, in the naming's scheme."""
    separator = "_" if naming == "brats2021" else "-"
    names = {**MODALITY_FILE_NAMES[naming], "seg": "seg"}
    return {key: folder / f"{folder.name}{separator}{name}.nii.gz" for key, name in names.items()}


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix nibabel reads
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _nifti(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


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
        _write_atomic(paths[modality], lambda p, v=_as_int16(image): nib.save(_nifti(v, subject.affine), p))
    _write_atomic(paths["seg"], lambda p: nib.save(_nifti(subject.seg, subject.affine), p))
    # factors.json last: its presence marks the subject complete.
    _write_atomic(folder / "factors.json", lambda p: p.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n"))


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(p: Path) -> None:
        with p.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    _write_atomic(path, write)


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
    ``factors.json``; for the set, ``factors.csv`` (one flat row per subject). Subject
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
        rows.append(flatten_factors(record))
    _write_table(root / "factors.csv", rows)
    return root


def read_factors_table(
    path: str | os.PathLike, names: Sequence[str] = tuple(PHANTOM_FACTORS)
) -> tuple[list[str], np.ndarray]:
    """Subject ids and the factor matrix [N, K] (float64; NaN where a factor is undefined) of a factors.csv."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no subjects")
    missing = [name for name in names if name not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; available: {', '.join(rows[0])}")
    return [row["subject"] for row in rows], np.array([[float(row[k] or "nan") for k in names] for row in rows])
