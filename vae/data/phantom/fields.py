"""The random fields of a subject, each a pure function of its seed: the elastic warp,
the tumour's irregular radius and the bias field."""
from __future__ import annotations

import math

import numpy as np

from .factors import MODALITIES


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
