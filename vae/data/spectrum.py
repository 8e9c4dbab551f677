"""The data's spectrum: the largest eigenvalues of the training subjects' covariance.

A latent direction of a VAE survives only if the data vary along it by more than the
decoder's effective variance sigma^2_eff (probabilistic PCA: Tipping & Bishop 1999; a VAE
with a linear decoder has the same stationary points, Lucas et al. 2019). The quantity that
decides it is the variance of the *best* direction, the top eigenvalue lambda_1 of the
across-subject covariance of the (z-scored) volumes -- far below their total variance,
which is about one per voxel.

The volumes are N rows of D = C * S^3 values; N is small (hundreds) and D large (8.4 million
at 4 x 128^3), so the covariance is never formed. A randomised range finder with subspace
iterations (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1) reads the cached volumes
a few times in chunks of voxels, holding one D x l float32 block (l = eigenvalues asked +
oversampling = 24: 0.8 GB at 4 x 128^3); with l >= N the result is exact. Computed once per cache and training set, stored beside the
cache as ``spectrum-<key>.json`` (atomically, with what it was computed from, so that a
rebuilt subject makes it stale).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vae.run_files import atomic_write

from .cache import Manifest
from .checks import ProgressBar

# Eigenvalues kept (the prediction needs lambda_1; the next ones show how fast the spectrum falls).
TOP = 16
OVERSAMPLE = 8
POWER_ITERATIONS = 2
BLOCK_VALUES = 2**25  # values read at once (all subjects x a chunk of voxels): 128 MB as float32
SPECTRUM_VERSION = 1


@dataclass(frozen=True)
class Spectrum:
    """The top eigenvalues of the training subjects' covariance, in z-scored units (variance per voxel)."""

    eigenvalues: tuple[float, ...]  # descending
    total_variance: float  # the trace of the covariance: the sum of every voxel's variance
    subjects: int  # N, the training subjects it rests on
    dim: int  # D = C * S^3, values per volume

    @property
    def top(self) -> float:
        """lambda_1: the variance of the direction along which the subjects vary most."""
        return self.eigenvalues[0] if self.eigenvalues else 0.0

    def surviving(self, sigma2_eff: float) -> int:
        """How many of the stored directions hold more variance than ``sigma2_eff`` (pPCA's survivors)."""
        return sum(1 for value in self.eigenvalues if value > sigma2_eff)

    def describe(self) -> str:
        shown = ", ".join(f"{v:.3g}" for v in self.eigenvalues[:3])
        return (f"data spectrum over {self.subjects} training subjects: lambda_1..3 = {shown} "
                f"(top direction {self.top / self.total_variance:.1%} of the total variance {self.total_variance:.4g}, "
                f"D = {self.dim})")

    def to_json(self) -> dict:
        return asdict(self) | {"eigenvalues": list(self.eigenvalues)}

    @staticmethod
    def from_json(data: dict) -> Spectrum:
        return Spectrum(tuple(float(v) for v in data["eigenvalues"]), float(data["total_variance"]),
                        int(data["subjects"]), int(data["dim"]))


def top_eigenvalues(
    read: Callable[[int], np.ndarray],
    count: int,
    top: int = TOP,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
    block_values: int = BLOCK_VALUES,
) -> Spectrum:
    """The ``top`` largest eigenvalues of the sample covariance (divisor N - 1) of ``count`` rows.

    ``read(i)`` returns row ``i`` (any shape, flattened; a memory map is read only where sliced).
    Every pass goes over the values in chunks of voxels, all rows at once (``block_values`` values
    at a time), so that each product is one matrix multiplication: 2 + 2 * ``power_iterations``
    passes in all. The rows are centred on each voxel's mean, found in the first pass.
    """
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 subjects, not {count}")
    width = min(top + oversample, count)
    omega = np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)
    dim = int(np.asarray(read(0)).size)
    chunks = voxel_chunks(count, dim, block_values)

    def centred(part: slice) -> np.ndarray:
        """Rows ``[:, part]`` minus their voxel means, float32 (count x len(part))."""
        block = np.stack([np.asarray(read(i)).reshape(-1)[part] for i in range(count)]).astype(np.float32)
        return block - mean[part]

    # Pass 1: each voxel's mean and variance, and the sketch Y = X_c^T Omega (dim x width).
    mean, trace = np.empty(dim, dtype=np.float32), 0.0
    sketch = np.empty((dim, width), dtype=np.float32)
    for part in chunks:
        block = np.stack([np.asarray(read(i)).reshape(-1)[part] for i in range(count)]).astype(np.float64)
        mean[part] = block.mean(axis=0)
        trace += float(block.var(axis=0, ddof=1).sum())
        sketch[part] = (block - block.mean(axis=0)).astype(np.float32).T @ omega

    basis = _orthonormal(sketch)
    for _ in range(power_iterations):  # Y <- X_c^T orth(X_c Q): sharpens the separation of the spectrum
        left = np.linalg.qr(sum(centred(part) @ basis[part] for part in chunks))[0]
        for part in chunks:
            basis[part] = centred(part).T @ left
        basis = _orthonormal(basis)
    projected = sum(centred(part).astype(np.float64) @ basis[part].astype(np.float64) for part in chunks)
    singular = np.linalg.svd(projected, compute_uv=False)
    eigenvalues = singular[:min(top, count - 1)] ** 2 / (count - 1)  # rank <= N - 1 once centred
    return Spectrum(tuple(float(v) for v in eigenvalues), trace, count, dim)


def voxel_chunks(count: int, dim: int, block_values: int = BLOCK_VALUES) -> list[slice]:
    """The chunks of voxels a pass reads, each from all ``count`` rows at once."""
    step = max(1, block_values // count)
    return [slice(start, min(start + step, dim)) for start in range(0, dim, step)]


def reads_needed(count: int, dim: int, power_iterations: int = POWER_ITERATIONS) -> int:
    """How many times :func:`top_eigenvalues` calls ``read`` (for a progress bar)."""
    return 1 + count * len(voxel_chunks(count, dim)) * (2 + 2 * power_iterations)


def _orthonormal(block: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``block``'s columns, in its own float32 (numpy's QR would work on a
    float64 copy: 1.6 GB more at 4 x 128^3)."""
    from scipy.linalg import qr

    return qr(block, mode="economic", overwrite_a=True, check_finite=False)[0]


# --------------------------------------------------------------------------- stored with the cache


def spectrum_path(cache: Path, subject_ids: Sequence[str]) -> Path:
    key = hashlib.sha256("\n".join(sorted(subject_ids)).encode()).hexdigest()[:12]
    return Path(cache) / f"spectrum-{key}.json"


def _sources(cache: Path, manifest: Manifest, subject_ids: Sequence[str]) -> dict[str, list[int]]:
    """What the spectrum was computed from: each volume file's size and modification time."""
    out = {}
    for subject in sorted(subject_ids):
        stat = (Path(cache) / manifest.entries[subject]["file"]).stat()
        out[subject] = [stat.st_size, stat.st_mtime_ns]
    return out


def cached_spectrum(cache: Path, subject_ids: Sequence[str], top: int = TOP, progress: bool = False) -> Spectrum:
    """The spectrum of ``subject_ids`` in the prepared ``cache``: read back when it was stored for
    these very volumes, else computed (with a progress bar over the volumes read) and stored."""
    cache = Path(cache)
    manifest = Manifest.load(cache)
    path = spectrum_path(cache, subject_ids)
    sources = _sources(cache, manifest, subject_ids)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if (stored.get("version") == SPECTRUM_VERSION and stored.get("sources") == sources
                    and stored.get("top") == top):
                return Spectrum.from_json(stored["spectrum"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: computed again below
    files = [cache / manifest.entries[subject]["file"] for subject in sorted(subject_ids)]
    bar = ProgressBar(reads_needed(len(files), int(np.prod(manifest.shape))), "spectrum", progress, unit="read")

    def read(i: int) -> np.ndarray:
        bar.step(files[i].name)
        return np.load(files[i], mmap_mode="r")

    try:
        spectrum = top_eigenvalues(read, len(files), top=top)
    finally:
        bar.close()
    record = {"version": SPECTRUM_VERSION, "top": top, "spectrum": spectrum.to_json(), "sources": sources}
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())
    return spectrum
