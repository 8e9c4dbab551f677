"""The data an experiment names becomes a prepared cache once, and datasets with a recorded split."""
import json
import os

import numpy as np

from vae.config import DataConfig
from vae.data import Manifest, PreprocessParams, prepare
from vae.data.phantom import anatomy_key, write_phantom_dataset
from vae.data.sources import cache_root, phantom_source, prepared_cache, training_datasets


def _data(tmp_path, **changes) -> DataConfig:
    return DataConfig(**{"size": 16, "cache_dir": str(tmp_path / "cache"), "phantom": {"subjects": 6}, **changes})


def test_phantom_is_the_default_and_is_built_once(tmp_path):
    data = _data(tmp_path)
    cache = prepared_cache(data)
    manifest = Manifest.load(cache)
    assert len(manifest.subject_ids) == 6 and manifest.shape == (4, 16, 16, 16)
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert prepared_cache(data) == cache
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # reused, not rewritten
    # Other phantom settings are another data set, in another directory.
    assert prepared_cache(_data(tmp_path, phantom={"subjects": 6, "vary": "tumour"})) != cache


def test_the_phantom_is_named_after_the_anatomy_it_was_rendered_from(tmp_path):
    """The tissue maps' content is in the phantom's folder name: other maps, another data set."""
    mni = phantom_source(_data(tmp_path))
    assert f"-{anatomy_key('mni')}-" in mni.name
    procedural = phantom_source(_data(tmp_path, phantom={"subjects": 6, "anatomy": "procedural"}))
    assert "-procedural-" in procedural.name and procedural != mni
    factors = json.loads(next(procedural.rglob("factors.json")).read_text())
    assert factors["anatomy"] == "procedural_ellipsoids"


def test_nifti_root_is_prepared_and_a_cache_root_used_as_is(tmp_path):
    raw = write_phantom_dataset(tmp_path / "raw", 4, 16, naming="brats2023", progress=False)
    cache = prepared_cache(_data(tmp_path, root=str(raw), modalities=["t2f", "t1c"]))
    assert cache.parent == cache_root(_data(tmp_path)) / "prepared"
    manifest = Manifest.load(cache)
    assert manifest.params.modalities == ("t2f", "t1c") and len(manifest.subject_ids) == 4
    own = prepare(raw, tmp_path / "mine", PreprocessParams(size=16, modalities=("t2f", "t1c")))
    assert prepared_cache(_data(tmp_path, root=str(tmp_path / "mine"))) == tmp_path / "mine"
    assert own.subject_ids == manifest.subject_ids


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAPSE_SWEEP_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("COLLAPSE_SWEEP_CACHE")
    assert cache_root(DataConfig()) == cache_root(DataConfig(cache_dir="~/.cache/collapse-sweep"))


def test_split_is_recorded_and_reused(tmp_path):
    data = _data(tmp_path, val_fraction=0.34)
    cache = prepared_cache(data)
    split_file = tmp_path / "run" / "split.json"
    split_file.parent.mkdir()
    train, val = training_datasets(data, cache, split_file)
    assert len(train) == 4 and len(val) == 2 and not set(train.ids) & set(val.ids)
    assert json.loads(split_file.read_text())["val"] == val.ids
    # A resumed run with another split seed keeps the recorded split.
    train2, val2 = training_datasets(_data(tmp_path, val_fraction=0.34, split_seed=7), cache, split_file)
    assert (train2.ids, val2.ids) == (train.ids, val.ids)
    x = train[0]
    assert x.shape == (4, 16, 16, 16) and np.isfinite(x.numpy()).all()


def test_concurrent_preparers_build_one_cache(tmp_path):
    """Several workers of one node asking at once: one builds, the others wait and reuse."""
    from concurrent.futures import ProcessPoolExecutor

    data = _data(tmp_path)
    with ProcessPoolExecutor(2) as pool:
        caches = list(pool.map(prepared_cache, [data, data]))
    assert caches[0] == caches[1]
    assert len(Manifest.load(caches[0]).subject_ids) == 6
    assert not [p for p in caches[0].iterdir() if p.name.endswith(".tmp")]
    assert os.path.isfile(caches[0] / "manifest.json")


def test_a_run_is_told_when_its_validation_set_cannot_measure_what_a_code_carries(tmp_path):
    """Too few validation subjects for AU, MI and the probes (MIN_VALIDATION_SUBJECTS, measured by
    bench/probe_subjects.py); validation subjects without segmentation or factors: nothing to probe."""
    from vae.data.sources import validation_has_factors, validation_warnings
    from vae.evaluation.probes import MIN_VALIDATION_SUBJECTS

    small = _data(tmp_path, val_fraction=0.34)
    (warning,) = validation_warnings(small, prepared_cache(small))
    assert "holds 2 of 6 subjects" in warning and f"at least {MIN_VALIDATION_SUBJECTS}" in warning
    assert "data.val_fraction" in warning

    enough = _data(tmp_path, val_fraction=0.8, phantom={"subjects": 30})  # 24 of 30 validate
    assert validation_warnings(enough, prepared_cache(enough)) == []

    raw = write_phantom_dataset(tmp_path / "raw", 4, 16, naming="brats2023", progress=False)
    for seg in raw.rglob("*seg*"):
        seg.unlink()
    plain = _data(tmp_path, root=str(raw))
    cache = prepared_cache(plain)
    assert not validation_has_factors(plain, cache) and validation_has_factors(small, prepared_cache(small))
    assert any("no validation subject has a segmentation" in line for line in validation_warnings(plain, cache))
