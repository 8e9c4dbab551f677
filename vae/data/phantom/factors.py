"""The generative factors of a phantom subject: their ranges, sampling, pins and flat table.

The factors are a pure function of ``(seed, index)`` (and the settings ``vary``, ``pin``,
``anatomy``); every factor is recorded, so a representation can be scored against ground
truth: ``factors.csv`` holds one flat row per subject (:func:`flatten_factors`,
:func:`read_factors_table`).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .anatomy import SITE_SPACING_MM, get_anatomy

MODALITIES = ("t1", "t1ce", "t2", "flair")  # the images of a subject, each with its own gain
VARY = ("all", "tumour")

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
# Values, pinned or read back from JSON


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


# ---------------------------------------------------------------------------
# Sampling


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


def check_factors(factors: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled factors of ``factors`` in canonical form; a ValueError names any missing or out of range."""
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


# ---------------------------------------------------------------------------
# The flat table (factors.csv)


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
