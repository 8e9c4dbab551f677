"""Render a subject from its factors: grid, pose, elastic warp, tumour, intensities, bias and noise.

Coordinates: the output grid is RAS in mm and centred at 0. Template coordinates
``x`` relate to output coordinates ``y`` through
``x = c0 + R^T (y - t) / s + u(.)``: per-axis scale ``s``, rotation ``R = Rz Ry Rx``
(angles ``rotation_deg``), translation ``t``, and an elastic displacement ``u``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .anatomy import Anatomy, edge_width, get_anatomy, soft_step
from .factors import MODALITIES, check_factors
from .fields import bias_log_field, elastic_displacement, tumour_radius

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


# ---------------------------------------------------------------------------
# Grid and pose


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for rotations about x, y, z by the given angles in degrees. [3, 3]"""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


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


# ---------------------------------------------------------------------------
# Tumour


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


# ---------------------------------------------------------------------------
# A subject


@dataclass
class PhantomSubject:
    images: dict[str, np.ndarray]  # modality -> [X, Y, Z] float32, 0 outside the brain
    seg: np.ndarray  # [X, Y, Z] uint8: 0, NCR 1, ED 2, ET et_label
    affine: np.ndarray  # [4, 4] voxel -> RAS mm
    factors: dict[str, Any]  # sampled and derived factors


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
    factors = check_factors(factors)
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
