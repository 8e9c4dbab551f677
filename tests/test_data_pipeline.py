"""BraTS NIfTI pipeline: discovery, checks, preprocessing, cache, dataset, split and CLI.

Every input is a small synthetic NIfTI written here: a smooth ellipsoid "brain" whose
intensity is an analytic function of position in mm, so that one subject can be stored at
any voxel size or orientation.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vae.data import (
    CachedVolumes,
    DataError,
    PreprocessParams,
    Subject,
    check,
    discover,
    load_split,
    prepare,
    preprocess_subject,
    save_split,
    split_subjects,
)
from helpers import (
    BAD_INPUTS, CHANNELS, REPO, SHAPE, brain, make_bad, modality_path, ras_affine, save, write_subject,
)
from vae.data.cache import FACTORS_CSV, MANIFEST

SMALL = PreprocessParams(size=16)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vae.data", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------------------
# Discovery


@pytest.mark.parametrize("naming,ext", [("brats2021", ".nii.gz"), ("brats2023", ".nii"), ("brats2023", ".nii.gz")])
def test_discover_finds_both_namings_with_canonical_modalities(tmp_path, naming, ext):
    case = "BraTS2021_00007" if naming == "brats2021" else "BraTS-GLI-00007-000"
    folder = write_subject(tmp_path / "nested", case, naming, ext)
    (folder / "notes.txt").write_text("not an image")

    (subject,) = discover(tmp_path)
    assert subject.id == case
    assert list(subject.paths) == list(CHANNELS)
    assert subject.paths == {m: modality_path(folder, m, naming, ext) for m in CHANNELS}
    assert subject.seg == modality_path(folder, "seg", naming, ext)

    (subset,) = discover(tmp_path, modalities=("flair", "t1ce"))  # 2021 names are aliases
    assert list(subset.paths) == ["t2f", "t1c"]


def test_discover_reads_a_csv_manifest_with_relative_paths(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    rows = ["subject,t1ce,t1,flair,t2,seg"]
    for case in ("a", "b"):
        for c, m in enumerate(CHANNELS):
            nib.save(nib.Nifti1Image(brain(channel=c), ras_affine(SHAPE)), scans / f"{case}{m.upper()}.nii.gz")
        rows.append(f"{case},scans/{case}T1C.nii.gz,scans/{case}T1N.nii.gz,scans/{case}T2F.nii.gz,"
                    f"scans/{case}T2W.nii.gz,")
    manifest = tmp_path / "subjects.csv"
    manifest.write_text("\n".join(rows) + "\n")

    subjects = discover(manifest)
    assert [s.id for s in subjects] == ["a", "b"]
    assert subjects[1].paths["t2f"] == scans / "bT2F.nii.gz"
    assert subjects[0].seg is None
    assert {p.message.split(" (")[0] for p in check(manifest, require_seg=True)} == {
        "subject a has no segmentation", "subject b has no segmentation"}
    assert prepare(manifest, tmp_path / "cache", SMALL).subject_ids == ["a", "b"]

    manifest.write_text("subject,t1ce,t1,t2\nA,x.nii.gz,y.nii.gz,z.nii.gz\n")
    (problem,) = check(manifest)
    assert problem.path == manifest and "t2f" in problem.message


# ---------------------------------------------------------------------------
# Preprocessing


def test_both_namings_and_extensions_prepare_to_the_same_arrays(tmp_path):
    write_subject(tmp_path / "raw", "BraTS2021_00001", "brats2021", ".nii.gz", seed=3)
    write_subject(tmp_path / "raw", "BraTS-GLI-00001-000", "brats2023", ".nii", seed=3)
    manifest = prepare(tmp_path / "raw", tmp_path / "cache", SMALL)
    assert manifest.subject_ids == ["BraTS-GLI-00001-000", "BraTS2021_00001"]
    first, second = (np.load(tmp_path / "cache" / f"{i}.npy") for i in manifest.subject_ids)
    assert first.shape == (4, 16, 16, 16) and first.dtype == np.float16 and first.flags.c_contiguous
    np.testing.assert_array_equal(first, second)


def test_ras_and_lps_storage_prepare_identically(tmp_path):
    volumes = {m: brain(channel=c, seed=1) for c, m in enumerate(CHANNELS)}
    ras = ras_affine(SHAPE)
    # LPS: array reversed along x and y, affine chosen so each voxel keeps its world position.
    reverse_xy = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lps_volumes = {m: np.ascontiguousarray(v[::-1, ::-1]) for m, v in volumes.items()}
    write_subject(tmp_path / "ras", "s", volumes=volumes, affine=ras, seg=False)
    write_subject(tmp_path / "lps", "s", volumes=lps_volumes, affine=ras @ reverse_xy, seg=False)
    assert nib.aff2axcodes(ras @ reverse_xy) == ("L", "P", "S")

    (from_ras,), (from_lps,) = discover(tmp_path / "ras"), discover(tmp_path / "lps")
    a, mask_a, info_a = preprocess_subject(from_ras, SMALL)
    b, mask_b, info_b = preprocess_subject(from_lps, SMALL)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert (info_a["source_axcodes"], info_b["source_axcodes"]) == ("RAS", "LPS")


def test_voxel_size_does_not_change_the_result_beyond_interpolation(tmp_path):
    fine_shape, coarse_shape = (48, 40, 36), (24, 20, 18)  # the same 48 x 40 x 36 mm field of view
    fine = {m: brain(fine_shape, 1.0, c, seed=2) for c, m in enumerate(CHANNELS)}
    coarse = {m: brain(coarse_shape, 2.0, c, seed=2) for c, m in enumerate(CHANNELS)}
    write_subject(tmp_path / "fine", "s", volumes=fine, affine=ras_affine(fine_shape, 1.0), seg=False)
    write_subject(tmp_path / "coarse", "s", volumes=coarse, affine=ras_affine(coarse_shape, 2.0), seg=False)

    a, mask_a, _ = preprocess_subject(discover(tmp_path / "fine")[0], SMALL)
    b, mask_b, _ = preprocess_subject(discover(tmp_path / "coarse")[0], SMALL)
    both = mask_a & mask_b
    assert both.sum() > 0.9 * max(mask_a.sum(), mask_b.sum())  # the same brain outline
    difference = np.abs(a.astype(np.float64) - b)[:, both]
    assert difference.mean() < 0.05 and np.quantile(difference, 0.95) < 0.15 and difference.max() < 0.4
    assert np.abs(a.astype(np.float64)[:, both]).mean() > 0.5  # the comparison is not of near-zero arrays


def box_subject(root: Path, voxel_mm: tuple[float, float, float]) -> Subject:
    """A box of 20 x 5 x 10 voxels in a 40^3 grid with the given voxel size; smooth contrast inside."""
    volume = np.zeros((40, 40, 40), np.float32)
    x = np.arange(20, dtype=np.float32)[:, None, None]
    volume[5:25, 10:15, 8:18] = 1 + x / 20 + np.zeros((1, 5, 10), np.float32)
    affine = np.diag(list(voxel_mm) + [1.0])
    write_subject(root, "box", volumes={m: volume for m in CHANNELS}, affine=affine, seg=False)
    return discover(root)[0]


def extents(mask: np.ndarray) -> list[int]:
    return [int(mask.any(axis=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]


def test_fit_mode_pads_to_a_cube_in_mm_and_respects_voxel_spacing(tmp_path):
    # 20 x 10 x 10 mm: the longest side fills the cube, the others keep their proportion.
    subject = box_subject(tmp_path, (1.0, 2.0, 1.0))
    array, mask, info = preprocess_subject(subject, PreprocessParams(size=20))
    assert extents(mask) == [20, 10, 10]
    ys, zs = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    assert (ys[0], ys[-1], zs[0], zs[-1]) == (5, 14, 5, 14)  # centred
    assert info["output_voxel_mm"] == [1.0, 1.0, 1.0]
    assert info["bbox_ras_voxels"] == [[5, 10, 8], [25, 15, 18]]
    np.testing.assert_array_equal(array[:, ~mask], 0)


def test_spacing_mode_resamples_to_the_given_voxel_size(tmp_path):
    subject = box_subject(tmp_path, (1.0, 2.0, 1.0))  # 20 x 10 x 10 mm
    _, mask, info = preprocess_subject(subject, PreprocessParams(size=16, mode="spacing", spacing=(2.0, 2.0, 2.0)))
    assert info["output_voxel_mm"] == [2.0, 2.0, 2.0]
    assert np.abs(np.array(extents(mask)) - [10, 5, 5]).max() <= 1  # +-1 voxel: the edge falls between samples


def test_zscore_inside_the_mask_and_zero_background(tmp_path):
    write_subject(tmp_path, "s", seed=4, seg=False)
    (subject,) = discover(tmp_path)
    array, mask, info = preprocess_subject(subject, PreprocessParams(size=16, clip=1e4))  # no clipping
    assert 0.2 < mask.mean() < 0.8
    for channel in array.astype(np.float64):
        inside = channel[mask]
        assert abs(inside.sum() / inside.size) < 2e-3
        assert abs(np.sqrt(np.square(inside - inside.mean()).sum() / inside.size) - 1) < 2e-3
        assert np.all(channel[~mask] == 0)
    assert all(m > 50 for m in info["mean"]) and all(s > 1 for s in info["std"])


def test_clip_bounds_outliers(tmp_path):
    volumes = {m: brain(channel=c) for c, m in enumerate(CHANNELS)}
    volumes["t2f"][10:13, 12:15, 8:11] = 1e5  # a hot spot, many std above the rest
    write_subject(tmp_path, "s", volumes=volumes, seg=False)
    array, _, _ = preprocess_subject(discover(tmp_path)[0], PreprocessParams(size=16, clip=3.0))
    assert array[2].max() == 3.0
    assert np.abs(array).max() <= 3.0


def test_params_hash_is_stable_and_sensitive():
    base = PreprocessParams(size=32)
    assert base.hash == PreprocessParams(size=32, modalities=("t1ce", "t1", "flair", "t2")).hash
    assert base.hash == PreprocessParams.from_dict(json.loads(json.dumps(base.to_dict()))).hash
    changed = [PreprocessParams(size=48), PreprocessParams(size=32, mode="spacing"), PreprocessParams(size=32, clip=4),
               PreprocessParams(size=32, modalities=("t1n", "t1c", "t2f", "t2w")),
               PreprocessParams(size=32, spacing=2.0)]
    assert len({base.hash} | {p.hash for p in changed}) == 1 + len(changed)
    with pytest.raises(ValueError, match="mode"):
        PreprocessParams(mode="crop")
    with pytest.raises(DataError, match="t3"):
        PreprocessParams(modalities=("t1c", "t3"))


# ---------------------------------------------------------------------------
# Checks: every class of bad input names its file; prepare then writes nothing


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_each_bad_input_is_reported_against_its_file_and_blocks_prepare(tmp_path, kind):
    blamed = make_bad(kind, tmp_path / "raw")
    problems = check(tmp_path / "raw")
    assert any(p.path == blamed and BAD_INPUTS[kind] in p.message for p in problems), problems
    assert all(p.subject == "bad" for p in problems)  # the good subject is clean

    with pytest.raises(DataError, match="nothing was written") as err:
        prepare(tmp_path / "raw", tmp_path / "cache", SMALL)
    assert str(blamed) in str(err.value)
    assert not (tmp_path / "cache").exists()

    manifest = prepare(tmp_path / "raw", tmp_path / "cache", SMALL, skip_bad=True)
    assert manifest.subject_ids == ["good"] and list(manifest.skipped) == ["bad"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [FACTORS_CSV, "good.json", "good.npy", "good.seg.npy", MANIFEST]  # the subject has a segmentation
    )


def test_an_empty_directory_is_a_problem(tmp_path):
    (problem,) = check(tmp_path)
    assert problem.path == tmp_path and "no subjects found" in problem.message
    with pytest.raises(DataError, match="no subjects found"):
        prepare(tmp_path, tmp_path / "cache", SMALL, skip_bad=True)
    assert not (tmp_path / "cache").exists()


def test_cli_reports_all_problems_at_once_and_exits_2(tmp_path):
    raw = tmp_path / "raw"
    kinds = tuple(BAD_INPUTS)
    blamed = {kind: make_bad(kind, raw, prefix=f"{i}") for i, kind in enumerate(kinds)}
    result = run_cli("check", raw)
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    for kind, path in blamed.items():
        assert any(line.startswith(f"{path}: ") and BAD_INPUTS[kind] in line for line in lines), (kind, lines)
    assert "Traceback" not in result.stderr

    result = run_cli("prepare", raw, "--out", tmp_path / "cache", "--size", 16)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(blamed["4D"]) in result.stderr
    assert not (tmp_path / "cache").exists()

    result = run_cli("prepare", raw, "--out", tmp_path / "cache", "--size", 16, "--skip-bad", "--quiet")
    assert result.returncode == 0, result.stderr
    skipped = {line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("skipped ")}
    assert skipped == {f"skipped {i}bad" for i in range(len(kinds))}
    assert json.loads((tmp_path / "cache" / MANIFEST).read_text())["subjects"].keys() == {
        f"{i}good" for i in range(len(kinds))}

    (tmp_path / "empty").mkdir()
    result = run_cli("check", tmp_path / "empty")
    assert result.returncode == 2 and result.stdout.startswith(f"{tmp_path / 'empty'}: no subjects found")
    result = run_cli("prepare", tmp_path / "nowhere", "--out", tmp_path / "cache2", "--size", 16)
    assert result.returncode == 2 and result.stderr.startswith(f"{tmp_path / 'nowhere'}: no such file or directory")
    assert not (tmp_path / "cache2").exists()


def test_cli_check_and_prepare_on_clean_data(tmp_path):
    for i in range(3):
        write_subject(tmp_path / "raw", f"BraTS-GLI-0000{i}-000", "brats2023", seed=i)
    result = run_cli("check", tmp_path / "raw")
    assert result.returncode == 0 and result.stdout.count("\n") == 1 and result.stdout.startswith("ok:")

    result = run_cli("prepare", tmp_path / "raw", "--out", tmp_path / "cache", "--size", 16, "--workers", 2,
                     "--modalities", "flair", "t1ce")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert manifest["shape"] == [2, 16, 16, 16] and manifest["params"]["modalities"] == ["t2f", "t1c"]
    assert len(manifest["subjects"]) == 3
    assert manifest["params_hash"] == PreprocessParams(size=16, modalities=("t2f", "t1c")).hash

    result = run_cli("prepare", tmp_path / "raw", "--out", tmp_path / "cache2", "--size", 0)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "size" in result.stderr


# ---------------------------------------------------------------------------
# Cache


def test_cache_is_reused_when_valid_and_rebuilt_when_a_source_changes(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    for i in range(3):
        write_subject(raw, f"s{i}", seed=i)
    first = prepare(raw, cache, SMALL, workers=2)
    assert first.reused == []
    same = {i: np.load(cache / f"{i}.npy") for i in first.subject_ids}
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    again = prepare(raw, cache, SMALL)
    assert again.reused == ["s0", "s1", "s2"] and again == first
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps

    changed = modality_path(raw / "s1", "t1c")
    save(changed, brain(channel=0, seed=7))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = prepare(raw, cache, SMALL)
    assert rebuilt.reused == ["s0", "s2"]
    assert (cache / "s0.npy").stat().st_mtime_ns == stamps["s0.npy"]
    assert not np.array_equal(np.load(cache / "s1.npy")[0], same["s1"][0])
    assert rebuilt.entries["s1"]["sources"]["t1c"]["mtime_ns"] == changed.stat().st_mtime_ns

    assert prepare(raw, cache, PreprocessParams(size=8)).reused == []  # new params: everything again
    assert np.load(cache / "s0.npy").shape == (4, 8, 8, 8)


def test_an_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    for i in range(2):
        write_subject(raw, f"s{i}", seed=i)
    prepare(raw, cache, SMALL)
    (cache / ".s0.npy.k1ll3d.tmp").write_bytes(b"half an array")  # from a run killed mid-write

    def save_then_die(file, array, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("vae.data.cache.np.save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, cache, PreprocessParams(size=8))
    # The old arrays are intact, no temporary file is left, and no manifest claims the new params.
    assert sorted(p.name for p in cache.iterdir()) == ["s0.json", "s0.npy", "s0.seg.npy", "s1.json", "s1.npy",
                                                       "s1.seg.npy"]
    assert np.load(cache / "s0.npy").shape == (4, 16, 16, 16)

    monkeypatch.undo()
    assert prepare(raw, cache, PreprocessParams(size=8)).reused == []
    assert np.load(cache / "s1.npy").shape == (4, 8, 8, 8)


# ---------------------------------------------------------------------------
# Split and dataset


def test_split_is_seeded_disjoint_and_recorded(tmp_path):
    ids = [f"case{i:03d}" for i in range(40)]
    train, val = split_subjects(ids, 0.2, seed=5)
    assert len(val) == 8 and len(train) == 32
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert split_subjects(list(reversed(ids)), 0.2, seed=5) == (train, val)
    assert split_subjects(ids, 0.2, seed=6) != (train, val)

    save_split(tmp_path / "split.json", train, val, seed=5, val_fraction=0.2)
    assert load_split(tmp_path / "split.json") == (train, val)
    save_split(tmp_path / "bad.json", train, val)
    record = json.loads((tmp_path / "bad.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**record, "val": val + train[:1]}))
    with pytest.raises(DataError, match=train[0]):
        load_split(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    for i in range(5):
        write_subject(root / "raw", f"s{i}", seed=i, seg=False)
    prepare(root / "raw", root / "cache", PreprocessParams(size=8))
    return root / "cache"


def test_dataset_returns_float16_volumes_and_reproducible_flips(cache):
    plain = CachedVolumes(cache)
    assert len(plain) == 5 and plain.ids == ["s0", "s1", "s2", "s3", "s4"]
    x = plain[3]
    assert x.dtype == torch.float16 and x.shape == (4, 8, 8, 8)  # as cached; the loop converts on its device
    np.testing.assert_array_equal(x.numpy(), np.load(cache / "s3.npy"))

    flipped = CachedVolumes(cache, flip=True, seed=1)
    seen = set()
    for epoch in range(4):
        flipped.set_epoch(epoch)
        for i in range(len(flipped)):
            y = flipped[i]
            assert torch.equal(y, flipped[i])  # the same draw for the same (seed, epoch, index)
            matches = [dims for dims in _axis_subsets() if torch.equal(y, torch.flip(plain[i], dims))]
            assert matches, "every item is the stored volume flipped along some spatial axes"
            seen.add(matches[0])
    assert len(seen) >= 4  # the flips vary across items and epochs

    restored = pickle.loads(pickle.dumps(flipped))
    assert torch.equal(restored[2], flipped[2])


def _axis_subsets() -> list[tuple[int, ...]]:
    return [tuple(a for a in (1, 2, 3) if mask >> (a - 1) & 1) for mask in range(8)]


def test_dataset_under_distributed_sampler_covers_every_subject(cache):
    dataset = CachedVolumes(cache, subject_ids=["s4", "s0", "s2", "s1", "s3"])
    reference = {i: dataset[i] for i in range(len(dataset))}
    covered = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=rank)  # rank 1 via a worker process
        batches = list(loader)
        indices = list(sampler)
        assert torch.equal(torch.cat(batches), torch.stack([reference[i] for i in indices]))
        covered += indices
    assert sorted(set(covered)) == list(range(len(dataset)))
    assert len(covered) == 6  # 5 padded to 3 per rank

    with pytest.raises(DataError, match="nope"):
        CachedVolumes(cache, subject_ids=["s0", "nope"])
