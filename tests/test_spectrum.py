"""The data's spectrum: the streamed randomised eigenvalues against numpy's float64 ones, and its store in the cache."""
import json

import numpy as np
import pytest

from vae.config import DataConfig
from vae.data import Manifest
from vae.data.dataset import split_subjects
from vae.data.sources import prepared_cache, training_spectrum
from vae.data.spectrum import Spectrum, cached_spectrum, reads_needed, spectrum_path, top_eigenvalues


def _covariance_eigenvalues(rows: np.ndarray) -> np.ndarray:
    """Descending eigenvalues of the sample covariance (divisor N - 1), float64, through the N x N Gram matrix."""
    centred = rows.astype(np.float64) - rows.mean(axis=0, dtype=np.float64)
    return np.sort(np.linalg.eigvalsh(centred @ centred.T / (len(rows) - 1)))[::-1]


def _low_rank_plus_noise(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.array([40.0, 25.0, 12.0, 6.0, 3.0])[:, None]
    return rng.standard_normal((n, 5)) @ (rng.standard_normal((5, dim)) * scales) + rng.standard_normal((n, dim))


def test_with_as_many_sketch_columns_as_subjects_it_is_exact():
    rows = _low_rank_plus_noise(12, 3000).astype(np.float32)
    spectrum = top_eigenvalues(lambda i: rows[i], len(rows), top=32)
    reference = _covariance_eigenvalues(rows)
    assert len(spectrum.eigenvalues) == 11  # rank N - 1 once centred
    np.testing.assert_allclose(spectrum.eigenvalues, reference[:11], rtol=1e-4)
    assert spectrum.total_variance == pytest.approx(rows.astype(np.float64).var(axis=0, ddof=1).sum(), rel=1e-9)
    assert (spectrum.subjects, spectrum.dim) == (12, 3000)
    # read in chunks of 7 voxels (uneven: 3000 = 428 x 7 + 4), the same numbers
    chunked = top_eigenvalues(lambda i: rows[i], len(rows), top=32, block_values=12 * 7)
    np.testing.assert_allclose(chunked.eigenvalues, spectrum.eigenvalues, rtol=1e-5)
    assert chunked.total_variance == pytest.approx(spectrum.total_variance, rel=1e-9)


def test_more_subjects_than_the_sketch_finds_the_top_of_the_spectrum():
    """60 subjects, a sketch of 4 + 10 columns: the separated top eigenvalues to 0.1 %."""
    rows = _low_rank_plus_noise(60, 4000, seed=1)
    spectrum = top_eigenvalues(lambda i: rows[i].reshape(4, 10, 100), len(rows), top=4)  # any shape, flattened
    np.testing.assert_allclose(spectrum.eigenvalues, _covariance_eigenvalues(rows)[:4], rtol=1e-3)
    assert spectrum.top == spectrum.eigenvalues[0] and spectrum.surviving(spectrum.eigenvalues[2]) == 2


def test_the_progress_bar_counts_every_read():
    rows = _low_rank_plus_noise(7, 1000)
    calls = []
    top_eigenvalues(lambda i: calls.append(i) or rows[i], len(rows))
    assert len(calls) == reads_needed(len(rows), 1000) and set(calls) == set(range(7))


def test_a_covariance_needs_two_subjects():
    with pytest.raises(ValueError, match="at least 2 subjects"):
        top_eigenvalues(lambda i: np.zeros(5), 1)


def test_the_spectrum_is_stored_with_the_cache_and_follows_its_volumes(tmp_path):
    data = DataConfig(size=16, cache_dir=str(tmp_path / "cache"), phantom={"subjects": 8}, val_fraction=0.25)
    cache = prepared_cache(data)
    manifest = Manifest.load(cache)
    train_ids = split_subjects(manifest.subject_ids, 0.25, data.split_seed)[0]
    spectrum = training_spectrum(data, cache)
    volumes = np.stack([np.load(cache / manifest.entries[s]["file"]).astype(np.float64) for s in sorted(train_ids)])
    np.testing.assert_allclose(spectrum.eigenvalues, _covariance_eigenvalues(volumes.reshape(len(volumes), -1))[:5],
                               rtol=1e-4)
    assert spectrum.dim == 4 * 16**3 and spectrum.subjects == len(train_ids) == 6
    stored = spectrum_path(cache, train_ids)
    assert Spectrum.from_json(json.loads(stored.read_text())["spectrum"]) == spectrum
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # written atomically: no temporaries
    stamp = stored.stat().st_mtime_ns
    assert training_spectrum(data, cache) == spectrum and stored.stat().st_mtime_ns == stamp  # read back
    # a volume rebuilt (another size or time) makes the stored spectrum stale: computed again
    first = cache / manifest.entries[sorted(train_ids)[0]]["file"]
    np.save(first, np.load(first) * np.float16(2))
    changed = cached_spectrum(cache, train_ids)
    assert changed.total_variance != spectrum.total_variance and stored.stat().st_mtime_ns != stamp
    # an unreadable file is computed again, not an error
    stored.write_text("{")
    assert cached_spectrum(cache, train_ids) == changed


def test_fewer_than_two_training_subjects_have_no_spectrum(tmp_path):
    data = DataConfig(size=16, cache_dir=str(tmp_path / "cache"), phantom={"subjects": 4}, val_fraction=0.75)
    assert training_spectrum(data, prepared_cache(data)) is None
