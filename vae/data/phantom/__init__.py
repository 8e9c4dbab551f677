"""Synthetic 4-modality brain MRI with a tumour and known generative factors.

Each subject is a normal anatomy (the MNI ICBM152 2009 tissue maps shipped in the
nilearn wheel, a pinned dependency, or analytic ellipsoids on request) warped by a random
pose and a smooth elastic field, with a tumour (necrotic core, enhancing rim, oedema
that follows white matter) inserted with mass effect. t1, t1ce, t2 and flair are
synthesised from relative tissue intensities, then a bias field and Rician noise are
applied. Every factor of variation is recorded, so a representation can be scored
against ground truth. A subject is a pure function of its factors, and the factors are
a pure function of ``(seed, index)``.

Modules, each depending only on those above it:

    anatomy   tissue fractions of the MNI maps or the procedural brain; soft borders
    factors   ranges, sampling and pins of the factors; their flat table (factors.csv)
    fields    the random fields: elastic warp, tumour shape, bias
    render    grid, pose, tumour, intensities, noise: a subject from its factors
    writer    a data set on disk: NIfTI folders, factors.json, factors.csv
"""
from .anatomy import (
    ANATOMIES, CEREBRUM_SEMI_AXES_MM, MISSING_MNI, SITE_SPACING_MM, TUMOUR_SITE_MIN_WM, TUMOUR_SITE_MIN_Z_MM,
    Anatomy, anatomy_key, edge_width, get_anatomy, mni_anatomy, mni_template_paths, procedural_anatomy,
    procedural_fractions, require_mni_maps, soft_step,
)
from .factors import (
    FACTOR_RANGES, MODALITIES, NEUTRAL_FACTORS, PHANTOM_FACTORS, SAMPLED_FACTORS, TUMOUR_PROBABILITY, VARY,
    check_factors, flatten_factors, read_factors_table, sample_factors, subject_factors,
)
from .fields import bias_log_field, elastic_displacement, tumour_radius
from .render import (
    BACKGROUND_BRAIN_FRACTION, FOV_MM, TISSUE_INTENSITY, TISSUES, Grid, PhantomSubject, render_subject,
    rotation_matrix,
)
from .writer import (
    ET_LABEL, INTENSITY_SCALE, MODALITY_FILE_NAMES, NAMINGS, subject_files, subject_id, write_phantom_dataset,
)

__all__ = [
    "ANATOMIES", "BACKGROUND_BRAIN_FRACTION", "CEREBRUM_SEMI_AXES_MM", "ET_LABEL", "FACTOR_RANGES", "FOV_MM",
    "INTENSITY_SCALE", "MISSING_MNI", "MODALITIES", "MODALITY_FILE_NAMES", "NAMINGS", "NEUTRAL_FACTORS",
    "PHANTOM_FACTORS", "SAMPLED_FACTORS", "SITE_SPACING_MM", "TISSUES", "TISSUE_INTENSITY", "TUMOUR_PROBABILITY",
    "TUMOUR_SITE_MIN_WM", "TUMOUR_SITE_MIN_Z_MM", "VARY",
    "Anatomy", "Grid", "PhantomSubject",
    "anatomy_key", "bias_log_field", "check_factors", "edge_width", "elastic_displacement", "flatten_factors",
    "get_anatomy", "mni_anatomy", "mni_template_paths", "procedural_anatomy", "procedural_fractions",
    "read_factors_table", "render_subject", "require_mni_maps", "rotation_matrix", "sample_factors", "soft_step",
    "subject_factors", "subject_files", "subject_id", "tumour_radius", "write_phantom_dataset",
]
