import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from vae.config import ConfigError, load_experiment
from vae.data import DataError
from vae.data import phantom as P
from vae.data.phantom import anatomy as phantom_anatomy
from vae.run_files import is_temporary

ANATOMIES = ["procedural", "mni"]  # the MNI maps come with the pinned nilearn, a declared dependency
TUMOUR = {"tumour_present": True}


def neutral_template_tissue(anatomy: str, grid: P.Grid) -> np.ndarray:
    """CSF / GM / WM at the grid under the identity pose: x = y + c0. [3, X, Y, Z]"""
    atlas = P.get_anatomy(anatomy)
    points = grid.points() + np.asarray(atlas.centre_mm, np.float32)[:, None, None, None]
    return atlas.fractions(points, min(grid.spacing))


def core_centre_of_mass(seg: np.ndarray, et_label: int = 4) -> np.ndarray:
    return np.argwhere(np.isin(seg, (1, et_label))).mean(axis=0)


# ---------------------------------------------------------------------------
# Factors


def test_same_seed_and_index_give_identical_subjects():
    first = P.subject_factors(3, 7, anatomy="procedural")
    assert P.subject_factors(3, 7, anatomy="procedural") == first
    assert P.subject_factors(3, 8, anatomy="procedural") != first
    a = P.render_subject(first, 24, anatomy="procedural")
    b = P.render_subject(json.loads(json.dumps(first)), 24, anatomy="procedural")  # as read back from JSON
    for m in P.MODALITIES:
        np.testing.assert_array_equal(a.images[m], b.images[m])
    np.testing.assert_array_equal(a.seg, b.seg)
    assert a.factors == b.factors


def test_pinned_factors_are_fixed_and_other_draws_unchanged():
    pin = {"tumour_radius_mm": 12.0, "gain": 1.0, "rotation_deg": [0, 5, 0], "noise_seed": 11}
    free = P.subject_factors(0, 4, anatomy="procedural")
    pinned = P.subject_factors(0, 4, pin=pin, anatomy="procedural")
    assert pinned["tumour_radius_mm"] == 12.0
    assert pinned["gain"] == dict.fromkeys(P.MODALITIES, 1.0)
    assert pinned["rotation_deg"] == [0.0, 5.0, 0.0]
    assert pinned["noise_seed"] == 11
    assert {k: v for k, v in pinned.items() if k not in pin} == {k: v for k, v in free.items() if k not in pin}


@pytest.mark.parametrize(
    "pin, message",
    [
        ({"tumour_size": 3.0}, "cannot pin"),
        ({"vol_et": 3.0}, "cannot pin"),  # derived, not sampled
        ({"brain_scale": [1.0, 1.0]}, "brain_scale"),
        ({"gain": {"t1": 1.0}}, "gain"),
        ({"noise_seed": 1.5}, "noise_seed"),
        ({"tumour_radius_mm": float("nan")}, "tumour_radius_mm"),
    ],
)
def test_bad_pins_are_rejected_by_name(pin, message):
    with pytest.raises(ValueError, match=message):
        P.subject_factors(0, 0, pin=pin, anatomy="procedural")


def test_render_rejects_out_of_range_factors():
    factors = P.subject_factors(0, 0, pin={"mass_effect": 1.5}, anatomy="procedural")
    with pytest.raises(ValueError, match="mass_effect"):
        P.render_subject(factors, 16, anatomy="procedural")
    with pytest.raises(ValueError, match="lack"):
        P.render_subject({"tumour_present": True}, 16, anatomy="procedural")


def test_sampled_factors_stay_in_their_ranges():
    draws = [P.subject_factors(5, i, anatomy="procedural") for i in range(200)]
    for name, (low, high) in P.FACTOR_RANGES.items():
        values = np.array([list(d[name].values()) if name == "gain" else d[name] for d in draws], dtype=float)
        assert low <= values.min() and values.max() <= high, name
        assert values.max() - values.min() > 0.5 * (high - low), name  # they really vary
    present = np.mean([d["tumour_present"] for d in draws])
    assert 0.8 < present < 0.97  # p = 0.9


def test_vary_tumour_holds_everything_but_the_tumour():
    draws = [P.subject_factors(2, i, vary="tumour", anatomy="procedural") for i in range(6)]
    for d in draws:
        assert d["tumour_present"]
        for name, value in P.NEUTRAL_FACTORS.items():
            assert d[name] == value, name
    assert len({d["tumour_radius_mm"] for d in draws}) == len(draws)
    assert len({tuple(d["tumour_centre_tpl_mm"]) for d in draws}) == len(draws)
    # Same pose: without mass effect, the brain occupies exactly the same voxels.
    masks = [
        P.render_subject({**d, "mass_effect": 0.0}, 24, anatomy="procedural").images["t1"] > 0 for d in draws[:2]
    ]
    np.testing.assert_array_equal(masks[0], masks[1])


# ---------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_seg_core_is_centred_on_the_reported_tumour_centre(anatomy):
    distances = []
    for i in range(10):
        subject = P.render_subject(P.subject_factors(1, i, pin=TUMOUR, anatomy=anatomy), 32, anatomy=anatomy)
        centre = np.array(subject.factors["tumour_centre_vox"])
        distances.append(np.linalg.norm(core_centre_of_mass(subject.seg) - centre))
        np.testing.assert_allclose(subject.factors["tumour_centre_norm"], 2 * centre / 31 - 1)
    assert np.mean(distances) < 0.5 and np.max(distances) < 1.5, distances


@pytest.mark.parametrize("et_label", [4, 3])
def test_labels_and_volumes(et_label):
    pin = {**TUMOUR, "necrosis_fraction": 0.5, "tumour_radius_mm": 20.0}
    factors = P.subject_factors(0, 1, pin=pin, anatomy="procedural")
    subject = P.render_subject(factors, (28, 32, 24), spacing=5.0, anatomy="procedural", et_label=et_label)
    assert subject.seg.dtype == np.uint8 and subject.seg.shape == (28, 32, 24)
    assert set(np.unique(subject.seg)) == {0, 1, 2, et_label}
    voxel = 5.0**3
    assert subject.factors["vol_ncr"] == np.sum(subject.seg == 1) * voxel
    assert subject.factors["vol_ed"] == np.sum(subject.seg == 2) * voxel
    assert subject.factors["vol_et"] == np.sum(subject.seg == et_label) * voxel
    assert subject.factors["vol_brain"] == np.sum(subject.images["t2"] > 0) * voxel


def test_core_volume_follows_the_radius():
    pin = {**TUMOUR, "irregularity": 0.0, "mass_effect": 0.0, "tumour_centre_tpl_mm": [25.0, 10.0, 20.0]}
    for radius in (10.0, 18.0):
        factors = P.subject_factors(0, 0, vary="tumour", pin={**pin, "tumour_radius_mm": radius}, anatomy="procedural")
        subject = P.render_subject(factors, 40, anatomy="procedural")
        core = subject.factors["vol_ncr"] + subject.factors["vol_et"]
        assert core == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.15)


def test_no_tumour_means_no_lesion_and_undefined_geometry():
    factors = P.subject_factors(0, 0, pin={"tumour_present": False}, anatomy="procedural")
    subject = P.render_subject(factors, 24, anatomy="procedural")
    assert not subject.seg.any()
    assert subject.factors["vol_et"] == subject.factors["vol_ed"] == subject.factors["vol_ncr"] == 0.0
    assert np.isnan(subject.factors["tumour_centre_vox"]).all() and subject.factors["hemisphere"] == 0


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_background_is_exactly_zero_outside_the_brain(anatomy):
    grid = P.Grid.make(24)
    pin = {"tumour_present": False, "noise_sigma": 0.04}
    subject = P.render_subject(P.subject_factors(0, 0, vary="tumour", pin=pin, anatomy=anatomy), 24, anatomy=anatomy)
    brain = neutral_template_tissue(anatomy, grid).sum(0)
    outside = brain < P.BACKGROUND_BRAIN_FRACTION
    assert 0.2 < outside.mean() < 0.9
    for m in P.MODALITIES:
        assert np.all(subject.images[m][outside] == 0.0), m
        assert np.all(subject.images[m][~outside] > 0.0), m  # Rician magnitude of a positive signal


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_tissue_contrasts(anatomy):
    grid = P.Grid.make(32)
    csf, gm, wm = neutral_template_tissue(anatomy, grid)
    healthy = P.render_subject(
        P.subject_factors(0, 0, vary="tumour", pin={"tumour_present": False}, anatomy=anatomy), 32, anatomy=anatomy
    ).images
    is_csf, is_wm = csf > 0.6, wm > 0.8
    assert is_csf.sum() >= 20 and is_wm.sum() >= 20
    mean = {m: (healthy[m][is_csf].mean(), healthy[m][is_wm].mean()) for m in P.MODALITIES}
    assert mean["t2"][0] > mean["t2"][1] + 0.2  # CSF bright on T2
    assert mean["t1"][0] < mean["t1"][1] - 0.2  # dark on T1
    assert mean["flair"][0] < mean["flair"][1]  # suppressed on FLAIR

    pin = {"necrosis_fraction": 0.4, "tumour_radius_mm": 20.0, "edema_extent_mm": 15.0, "mass_effect": 0.2}
    subject = P.render_subject(P.subject_factors(0, 3, vary="tumour", pin=pin, anatomy=anatomy), 32, anatomy=anatomy)
    by_label = {label: subject.seg == label for label in (0, 1, 2, 4)}
    by_label[0] &= subject.images["t1"] > 0
    t1ce = {label: subject.images["t1ce"][mask].mean() for label, mask in by_label.items()}
    flair = {label: subject.images["flair"][mask].mean() for label, mask in by_label.items()}
    assert t1ce[4] == max(t1ce.values())  # the enhancing rim is the brightest on T1ce
    assert flair[2] > flair[0] and flair[2] > flair[1]  # oedema bright on FLAIR


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_anatomy_fractions_are_valid(anatomy):
    grid = P.Grid.make(24)
    tissue = neutral_template_tissue(anatomy, grid)
    assert tissue.min() >= 0.0 and tissue.sum(0).max() <= 1.0 + 1e-5
    assert tissue[2].max() > 0.9 and tissue[1].max() > 0.6  # pure white and grey matter exist
    # Brain volume: about 1.9 L (MNI mask) or the ellipsoid's 4/3 pi a b c = 1.62 L.
    volume = tissue.sum() * np.prod(grid.spacing)
    expected = 1.89e6 if anatomy == "mni" else 4 / 3 * np.pi * np.prod(P.CEREBRUM_SEMI_AXES_MM)
    assert volume == pytest.approx(expected, rel=0.1)


def test_procedural_anatomy_needs_no_data_files(monkeypatch):
    monkeypatch.setattr(phantom_anatomy, "mni_template_paths", lambda: None)
    assert P.get_anatomy("procedural").name == "procedural_ellipsoids"
    with pytest.raises(DataError, match="nilearn") as missing:
        P.mni_anatomy.__wrapped__()  # the uncached loader
    message = str(missing.value)
    assert "\n" not in message and "./setup.sh" in message and "data.phantom.anatomy=procedural" in message
    subject = P.render_subject(P.subject_factors(0, 0, anatomy="procedural"), 16, anatomy="procedural")
    assert subject.factors["anatomy"] == "procedural_ellipsoids"


def test_the_anatomy_is_explicit_and_mni_by_default():
    assert P.mni_template_paths() is not None  # nilearn is a declared dependency
    assert P.get_anatomy().name == "mni_icbm152_2009a_sym"
    assert load_experiment("exp1_baseline_vae").data.phantom.anatomy == "mni"
    with pytest.raises(ConfigError, match="data.phantom.anatomy"):
        load_experiment("exp1_baseline_vae", ["data.phantom.anatomy=auto"])
    with pytest.raises(ValueError, match="auto"):
        P.get_anatomy("auto")
    # The maps' content names the cache, so maps of another release make another phantom.
    assert P.anatomy_key("mni").startswith("mni-") and P.anatomy_key("mni") == P.anatomy_key("mni")
    assert P.anatomy_key("procedural") == "procedural"


def test_mni_anatomy_sites():
    sites = P.get_anatomy("mni").tumour_sites_mm
    assert len(sites) > 1000 and sites[:, 2].min() > P.TUMOUR_SITE_MIN_Z_MM


def test_grid_is_ras_and_centred():
    grid = P.Grid.make((20, 30, 10), spacing=(1.0, 2.0, 3.0))
    centre_index = (np.array(grid.shape) - 1) / 2
    np.testing.assert_allclose(grid.affine @ [*centre_index, 1], [0, 0, 0, 1])
    assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")
    assert P.Grid.make(32).spacing == (6.25, 6.25, 6.25)  # FOV 200 mm by default
    np.testing.assert_allclose(grid.points()[:, 1, 2, 3], grid.affine[:3, :3] @ [1, 2, 3] + grid.affine[:3, 3])
    for bad in [(0, 4, 4), (4, 4), 2.5]:
        with pytest.raises(ValueError, match="shape"):
            P.Grid.make(bad)
    with pytest.raises(ValueError, match="spacing"):
        P.Grid.make(8, spacing=-1.0)


def test_pose_moves_the_tumour_centre_with_the_anatomy():
    # A pure translation of the head moves the reported centre by the same mm.
    base = P.subject_factors(0, 2, vary="tumour", anatomy="procedural")
    moved = {**base, "translation_mm": [6.25, 0.0, -12.5]}
    a = P.render_subject(base, 32, anatomy="procedural").factors["tumour_centre_vox"]
    b = P.render_subject(moved, 32, anatomy="procedural")
    np.testing.assert_allclose(np.subtract(b.factors["tumour_centre_vox"], a), [1.0, 0.0, -2.0], atol=1e-9)
    assert np.linalg.norm(core_centre_of_mass(b.seg) - b.factors["tumour_centre_vox"]) < 0.5


def test_reported_centre_follows_the_elastic_field():
    # A strong elastic field moves the tumour by about a voxel; the reported centre must follow it.
    pin = {"elastic_amplitude_mm": 6.0, "irregularity": 0.0, "mass_effect": 0.0}
    for i in range(2):
        factors = P.subject_factors(0, i, vary="tumour", pin=pin, anatomy="procedural")
        warped = P.render_subject(factors, 40, spacing=4.0, anatomy="procedural")
        rigid = P.render_subject({**factors, "elastic_amplitude_mm": 0.0}, 40, spacing=4.0, anatomy="procedural")
        centre = np.array(warped.factors["tumour_centre_vox"])
        assert np.linalg.norm(centre - rigid.factors["tumour_centre_vox"]) > 0.6
        assert np.linalg.norm(core_centre_of_mass(warped.seg) - centre) < 0.35


# ---------------------------------------------------------------------------
# Files


def file_times(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file() and p.name != "factors.csv"}


def no_temporary_files(root):
    return not [p for p in root.rglob("*") if is_temporary(p)]


@pytest.mark.parametrize(
    "naming, et_label, files",
    [
        ("brats2021", 4, [f"BraTS2021_00001/BraTS2021_00001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")]),
        (
            "brats2023",
            3,
            [f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")],
        ),
    ],
)
def test_written_files_round_trip(tmp_path, naming, et_label, files):
    root = P.write_phantom_dataset(
        tmp_path / "set", 3, 20, naming=naming, anatomy="procedural", pin=TUMOUR, seed=4, progress=False
    )
    for name in files:
        image = nib.load(root / name)
        assert image.shape == (20, 20, 20)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.header.get_qform(coded=True)[1] > 0 and image.header.get_sform(coded=True)[1] > 0
        data = np.asanyarray(image.dataobj)
        if name.endswith("seg.nii.gz"):
            assert data.dtype == np.uint8 and et_label in set(np.unique(data)) <= {0, 1, 2, et_label}
        else:
            assert data.dtype == np.int16 and data.max() > 500

    folder = (root / files[0]).parent
    stored = json.loads((folder / "factors.json").read_text())
    factors = P.subject_factors(4, 1, pin=TUMOUR, anatomy="procedural")
    subject = P.render_subject(factors, 20, anatomy="procedural", et_label=et_label)
    assert stored["subject"] == folder.name and stored["tumour_centre_vox"] == subject.factors["tumour_centre_vox"]
    t1 = np.asanyarray(nib.load(root / files[0]).dataobj) / P.INTENSITY_SCALE
    np.testing.assert_allclose(t1, subject.images["t1"], atol=0.5 / P.INTENSITY_SCALE + 1e-6)
    np.testing.assert_allclose(nib.load(root / files[0]).affine, subject.affine)

    with (root / "factors.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["index"] for row in rows] == ["0", "1", "2"]
    assert {"tumour_centre_vox_x", "gain_flair", "brain_scale_z"} <= set(rows[0])
    ids, table = P.read_factors_table(root / "factors.csv")
    assert len(ids) == 3 and table.shape == (3, len(P.PHANTOM_FACTORS)) and np.isfinite(table).all()
    assert no_temporary_files(root)


def test_undefined_factors_are_null_in_json_and_nan_in_the_table(tmp_path):
    root = P.write_phantom_dataset(tmp_path, 1, 12, anatomy="procedural", pin={"tumour_present": False}, progress=False)
    text = (root / "BraTS2021_00000" / "factors.json").read_text()
    assert "NaN" not in text and json.loads(text)["tumour_centre_vox"] == [None, None, None]
    _, table = P.read_factors_table(root / "factors.csv", ["tumour_present", "tumour_centre_vox_x", "vol_brain"])
    assert table[0, 0] == 0 and np.isnan(table[0, 1]) and table[0, 2] > 0
    with pytest.raises(ValueError, match="no column"):
        P.read_factors_table(root / "factors.csv", ["tumour_size"])


def test_rerun_keeps_complete_subjects_and_repairs_incomplete_ones(tmp_path, capsys):
    root = P.write_phantom_dataset(tmp_path, 3, 16, anatomy="procedural", progress=True)
    assert "subject" in capsys.readouterr().err  # a progress line
    before = file_times(root)
    P.write_phantom_dataset(tmp_path, 3, 16, anatomy="procedural", progress=False)
    assert file_times(root) == before

    broken = root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    broken.unlink()
    P.write_phantom_dataset(tmp_path, 3, 16, anatomy="procedural", progress=False)
    after = file_times(root)
    assert broken.is_file()
    untouched = [p for p in before if "00001" not in str(p)]
    assert [after[p] for p in untouched] == [before[p] for p in untouched]
    assert all(after[p] != t for p, t in before.items() if "00001" in str(p) and p.exists())

    # Other settings (a different grid) are not mistaken for complete subjects.
    P.write_phantom_dataset(tmp_path, 3, 12, anatomy="procedural", progress=False)
    assert nib.load(root / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").shape == (12, 12, 12)
    assert no_temporary_files(root)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    real_replace = os.replace
    images = []

    def rename_then_fail(source, destination):
        # The temporary file is fully written; the run dies before the 7th image (second
        # subject, second image) is renamed into place.
        if str(destination).endswith(".nii.gz"):
            images.append(destination)
            if len(images) == 7:
                raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", rename_then_fail)
    with pytest.raises(KeyboardInterrupt):
        P.write_phantom_dataset(tmp_path, 2, 16, anatomy="procedural", progress=False)
    assert no_temporary_files(tmp_path)
    assert (tmp_path / "BraTS2021_00000" / "factors.json").is_file()
    assert not (tmp_path / "BraTS2021_00001" / "factors.json").exists()
    assert not (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").exists()
    assert not (tmp_path / "factors.csv").exists()

    monkeypatch.setattr(os, "replace", real_replace)
    P.write_phantom_dataset(tmp_path, 2, 16, anatomy="procedural", progress=False)
    assert (tmp_path / "BraTS2021_00001" / "factors.json").is_file()
    assert len(list(csv.DictReader((tmp_path / "factors.csv").open()))) == 2


def test_write_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="naming"):
        P.write_phantom_dataset(tmp_path, 1, 8, naming="brats2019")
    with pytest.raises(ValueError, match="n must"):
        P.write_phantom_dataset(tmp_path, 0, 8)
    with pytest.raises(ValueError, match="anatomy"):
        P.write_phantom_dataset(tmp_path, 1, 8, anatomy="colin27")


def test_cli_pins_factors_and_rejects_unknown_ones(tmp_path):
    import csv
    import subprocess
    import sys

    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "vae.data", "phantom", *args, "--quiet"], capture_output=True, text=True
    )
    ok = run(str(tmp_path / "a"), "--n", "3", "--size", "16", "--pin", "tumour_present=false", "noise_sigma=0.01")
    assert ok.returncode == 0, ok.stderr
    rows = list(csv.DictReader(open(tmp_path / "a" / "factors.csv")))
    assert [r["tumour_present"] for r in rows] == ["0"] * 3
    assert {float(r["noise_sigma"]) for r in rows} == {0.01}
    bad = run(str(tmp_path / "b"), "--n", "1", "--size", "16", "--pin", "bogus=1")
    assert bad.returncode == 2
    assert "cannot pin ['bogus']" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
