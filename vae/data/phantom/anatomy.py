"""Normal anatomies: CSF / GM / WM fractions as a function of template position (mm).

'mni': the ICBM152 2009 tissue maps shipped in the nilearn wheel (a pinned dependency),
found by path; 'procedural': analytic ellipsoids that need no data files. Also the soft
memberships every border of the phantom is drawn with.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates

from ..discovery import DataError

ANATOMIES = ("mni", "procedural")
TUMOUR_SITE_MIN_WM = 0.6  # tumour centres are drawn among voxels this white ...
TUMOUR_SITE_MIN_Z_MM = -25.0  # ... and above this height (keeps them out of the cerebellum)
SITE_SPACING_MM = 2.0


# ---------------------------------------------------------------------------
# Soft borders


def soft_step(distance: np.ndarray, width: float) -> np.ndarray:
    """0.5 (1 + tanh(d / w)): a membership that is 1 inside (d > 0), 0 outside, smooth over ~w."""
    return 0.5 * (1.0 + np.tanh(distance / np.float32(width)))


def edge_width(spacing: Sequence[float]) -> float:
    """Soft-edge width in mm: half a voxel, at least 0.5 mm (limits aliasing of sharp borders)."""
    return max(float(np.mean(spacing)) / 2.0, 0.5)


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
