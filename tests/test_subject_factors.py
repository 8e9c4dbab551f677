"""Factors from segmentations (in the cached frame) and from a CSV table, through ``prepare``."""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, brain, ras_affine, write_subject
from vae.data import DataError, Manifest, PreprocessParams, prepare
from vae.data.cache import FACTORS_CSV
from vae.data.preprocess import Geometry
from vae.data.subject_factors import SEG_FACTORS, read_factor_table, resample_labels, seg_factors

SIZE = 16


def box_geometry() -> Geometry:
    """A 32-voxel brain box at 1 mm fitted into 16^3: output voxel j covers source 2 j .. 2 j + 1 of the box."""
    return Geometry.fit(np.array([4, 4, 4]), np.array([36, 36, 36]), np.ones(3), PreprocessParams(size=SIZE))


def test_factors_of_a_box_tumour_by_hand():
    labels = np.zeros((40, 40, 40), np.int16)
    # 4 x 4 x 4 voxels centred on source index 19.5 = the box's centre (4 + 15.5): the cube's centre.
    labels[18:22, 18:22, 18:22] = 2  # oedema
    labels[19:21, 19:21, 19:21] = 1  # necrotic core: 8 voxels
    labels[18, 18, 18] = 4  # one enhancing voxel (BraTS 2021's label)
    factors = seg_factors(labels, box_geometry())
    assert set(factors) == set(SEG_FACTORS)
    # 64 voxels of 1 mm^3 in output voxels of 2^3 mm^3
    assert factors["tumour_log_volume"] == pytest.approx(math.log1p(64 / 8))
    # the box's centre is the cube's: j = (19.5 - 4 - 0.5) / 2 = 7.5 of 0..15
    assert [factors[f"tumour_centroid_{a}"] for a in "xyz"] == pytest.approx([0.0] * 3, abs=1e-12)
    assert (factors["necrotic_fraction"], factors["enhancing_fraction"]) == pytest.approx((8 / 64, 1 / 64))
    assert factors["oedema_fraction"] == pytest.approx(55 / 64)
    # BraTS 2023 labels the enhancing tumour 3
    assert seg_factors(np.where(labels == 4, 3, labels), box_geometry()) == pytest.approx(factors)


def test_a_tumour_at_the_box_corner_is_at_minus_one():
    labels = np.zeros((40, 40, 40), np.int16)
    labels[4:6, 4:6, 4:6] = 2  # the first output voxel of each axis
    factors = seg_factors(labels, box_geometry())
    assert [factors[f"tumour_centroid_{a}"] for a in "xyz"] == pytest.approx([-1.0] * 3)


def test_no_tumour_has_no_location_and_zero_volume():
    factors = seg_factors(np.zeros((40, 40, 40), np.int16), box_geometry())
    assert factors["tumour_log_volume"] == 0.0
    assert all(math.isnan(factors[name]) for name in SEG_FACTORS[1:])


def test_resampled_labels_keep_their_values_and_place():
    labels = np.zeros((40, 40, 40), np.int16)
    labels[20:28, 8:16, 12:20] = 4
    labels[22:26, 10:14, 14:18] = 1
    cube = resample_labels(labels, box_geometry())
    assert cube.dtype == np.uint8 and cube.shape == (SIZE,) * 3 and set(np.unique(cube)) == {0, 1, 4}
    centroid = np.argwhere(cube > 0).mean(axis=0) * 2 / (SIZE - 1) - 1
    factors = seg_factors(labels, box_geometry())
    assert centroid == pytest.approx([factors[f"tumour_centroid_{a}"] for a in "xyz"], abs=1 / (SIZE - 1))


def write_case(root, case: str, tumour_at: tuple[int, int, int] | None, et_label: int = 4):
    """A subject on the helpers' 28 x 32 x 24 grid whose seg holds a 4^3 tumour (core + enhancing) at ``tumour_at``."""
    volumes = {m: brain(channel=c) for c, m in enumerate(("t1c", "t1n", "t2f", "t2w"))}
    folder = write_subject(root, case, volumes=volumes, seg=False)
    seg = np.zeros(volumes["t1c"].shape, np.uint8)
    if tumour_at is not None:
        x, y, z = tumour_at
        seg[x:x + 4, y:y + 4, z:z + 4] = et_label
        seg[x + 1:x + 3, y + 1:y + 3, z + 1:z + 3] = 1
    nib.save(nib.Nifti1Image(seg, ras_affine(seg.shape)), folder / f"{case}_seg.nii.gz")
    return folder


def test_prepare_records_each_subjects_factors_and_a_table(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    write_case(raw, "left", (6, 12, 10))
    write_case(raw, "right", (16, 14, 10))
    write_case(raw, "healthy", None)
    write_subject(raw, "unlabelled", seg=False)
    manifest = prepare(raw, cache, PreprocessParams(size=SIZE))
    factors = Manifest.load(cache).factors
    assert factors == manifest.factors and factors["unlabelled"] == {} and manifest.without_factors == ["unlabelled"]
    left, right = factors["left"], factors["right"]
    assert left["tumour_centroid_x"] < right["tumour_centroid_x"]  # RAS: x grows to the right
    assert left["tumour_log_volume"] == pytest.approx(right["tumour_log_volume"])
    assert left["necrotic_fraction"] == pytest.approx(8 / 64) and left["enhancing_fraction"] == pytest.approx(56 / 64)
    assert factors["healthy"]["tumour_log_volume"] == 0 and math.isnan(factors["healthy"]["tumour_centroid_x"])
    with (cache / FACTORS_CSV).open() as handle:
        table = {row["subject"]: row for row in csv.DictReader(handle)}
    assert set(table) == {"left", "right", "healthy", "unlabelled"}
    assert table["healthy"]["tumour_centroid_x"] == "" and float(table["left"]["tumour_log_volume"]) > 0
    assert np.load(cache / "left.seg.npy").shape == (SIZE,) * 3 and not (cache / "unlabelled.seg.npy").exists()


def test_a_factor_table_adds_and_overrides(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    write_case(raw, "a", (6, 12, 10))
    write_case(raw, "b", (16, 14, 10))
    extra = tmp_path / "extra.csv"
    extra.write_text("subject,age,tumour_log_volume\na,61,1.5\nb,,\nnot_here,3,3\n")
    manifest = prepare(raw, cache, PreprocessParams(size=SIZE), factors_csv=extra)
    assert manifest.factors["a"]["age"] == 61 and manifest.factors["a"]["tumour_log_volume"] == 1.5
    assert math.isnan(manifest.factors["b"]["age"])  # an empty cell is undefined, and it overrides
    assert Manifest.load(cache).factors_csv == str(extra.resolve())


@pytest.mark.parametrize(
    "text, words",
    [
        ("subject,age\na,sixty\n", "column 'age' is not numeric (line 2: 'sixty')"),
        ("id,age\na,60\n", "no 'subject' column"),
        ("subject,age\nx,1\ny,2\n", "none of its 2 subjects (e.g. 'x') is among"),
        ("subject,age\na,1\na,2\n", "subject 'a' appears twice"),
    ],
)
def test_a_bad_factor_table_is_one_line_and_nothing_is_written(tmp_path, text, words):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    write_case(raw, "a", (6, 12, 10))
    write_case(raw, "b", (16, 14, 10))
    table = tmp_path / "factors.csv"
    table.write_text(text)
    with pytest.raises(DataError) as err:
        prepare(raw, cache, PreprocessParams(size=SIZE), factors_csv=table)
    assert "\n" not in str(err.value) and str(table) in str(err.value) and words in str(err.value)
    assert not cache.exists()


def test_the_phantoms_table_is_a_factor_table(tmp_path):
    from vae.data.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "phantom", 3, SIZE, anatomy="procedural", progress=False)
    table = read_factor_table(root / "factors.csv")
    assert len(table) == 3 and {"tumour_radius_mm", "tumour_centre_vox_x"} <= set(next(iter(table.values())))


def test_prepare_says_once_which_subjects_have_no_factors(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "a", (6, 12, 10))
    write_subject(raw, "b", seg=False)
    write_subject(raw, "c", seg=False)
    done = subprocess.run([sys.executable, "-m", "vae.data", "prepare", str(raw), "--out", str(tmp_path / "cache"),
                           "--size", str(SIZE), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 subject(s)" in notes[0] and "e.g. b" in notes[0]
