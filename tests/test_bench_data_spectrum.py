"""``bench/data_spectrum.py``: its synthetic volumes have the spectrum it claims, and the exact reference is exact."""
import numpy as np

from bench.data_spectrum import DIRECTIONS, exact_eigenvalues, write_volumes
from vae.data.spectrum import top_eigenvalues


def test_the_benchmark_volumes_and_its_exact_reference(tmp_path):
    paths = write_volumes(tmp_path, 12, (2, 8, 8, 8))
    volumes = np.stack([np.load(p).astype(np.float64).reshape(-1) for p in paths])
    assert volumes.shape == (12, 1024) and np.load(paths[0]).dtype == np.float16
    reference = np.sort(np.linalg.eigvalsh(np.cov(volumes.T)))[::-1][:11]  # numpy's D x D covariance
    np.testing.assert_allclose(exact_eigenvalues(paths)[:11], reference, rtol=1e-9)
    streamed = top_eigenvalues(lambda i: np.load(paths[i], mmap_mode="r"), len(paths))
    np.testing.assert_allclose(streamed.eigenvalues[:DIRECTIONS], reference[:DIRECTIONS], rtol=1e-4)
