"""What the data spectrum costs at sweep start: time, memory and accuracy of the streamed randomised SVD.

    python -m bench.data_spectrum [--subjects 40] [--size 128] [--modalities 4]

Writes ``--subjects`` float16 volumes ``[C, S, S, S]`` (a few strong directions plus noise, as the
cache stores them) to a temporary folder, computes their top eigenvalues with
:func:`vae.data.spectrum.top_eigenvalues` reading one memory-mapped volume at a time (as a sweep
does), and checks them against the exact eigenvalues of the float64 Gram matrix.
"""
from __future__ import annotations

import argparse
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.results import machine, publish
from vae.data.spectrum import OVERSAMPLE, POWER_ITERATIONS, TOP, top_eigenvalues

HERE = Path(__file__).resolve().parent
SECTION = "bench/data_spectrum.py"
DIRECTIONS = 6  # strong directions in the synthetic volumes


def write_volumes(folder: Path, subjects: int, shape: tuple[int, ...], seed: int = 0) -> list[Path]:
    """``subjects`` float16 volumes: ``DIRECTIONS`` random patterns with falling scales, plus unit noise."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    patterns = rng.standard_normal((DIRECTIONS, size), dtype=np.float32)
    scales = np.geomspace(4.0, 0.5, DIRECTIONS).astype(np.float32)
    paths = []
    for i in range(subjects):
        volume = (rng.standard_normal(DIRECTIONS).astype(np.float32) * scales) @ patterns
        volume += rng.standard_normal(size, dtype=np.float32)
        paths.append(folder / f"s{i:04d}.npy")
        np.save(paths[-1], volume.reshape(shape).astype(np.float16))
    return paths


def exact_eigenvalues(paths: Sequence[Path]) -> np.ndarray:
    """The covariance's eigenvalues from the float64 Gram matrix, a block of volumes at a time."""
    n = len(paths)
    mean = sum(np.load(p).astype(np.float64).reshape(-1) for p in paths) / n
    gram = np.zeros((n, n))
    rows = [np.load(p).astype(np.float64).reshape(-1) - mean for p in paths]
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = rows[i] @ rows[j]
    return np.sort(np.linalg.eigvalsh(gram / (n - 1)))[::-1]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kilobytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_spectrum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--modalities", type=int, default=4)
    args = parser.parse_args(argv)
    shape = (args.modalities,) + (args.size,) * 3
    with tempfile.TemporaryDirectory(prefix="spectrum-") as folder:
        paths = write_volumes(Path(folder), args.subjects, shape)
        before = peak_rss_gb()
        started = time.perf_counter()
        spectrum = top_eigenvalues(lambda i: np.load(paths[i], mmap_mode="r"), len(paths))
        seconds = time.perf_counter() - started
        peak = peak_rss_gb()
        exact = exact_eigenvalues(paths)
    shown = min(DIRECTIONS, len(spectrum.eigenvalues))
    errors = np.abs(np.array(spectrum.eigenvalues[:shown]) / exact[:shown] - 1)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": shlex.join(["python", "-m", "bench.data_spectrum", *sys.argv[1:]]),
        "subjects": args.subjects, "shape": list(shape), "top": TOP, "oversample": OVERSAMPLE,
        "passes": 2 + 2 * POWER_ITERATIONS, "seconds": seconds, "peak_rss_gb": peak,
        "peak_rss_before_gb": before, "eigenvalues": list(spectrum.eigenvalues[:shown]),
        "exact": exact[:shown].tolist(), "max_relative_error": float(errors.max()),
    }
    section = "\n".join([
        "## The data spectrum at sweep start (`bench/data_spectrum.py`)",
        "",
        f"- Date: {result['date']}; machine: {result['machine']}",
        f"- Command: `{result['command']}`",
        f"- {args.subjects} volumes of {'x'.join(map(str, shape))} (float16, memory-mapped as in the cache), "
        f"top {TOP} eigenvalues with {OVERSAMPLE} extra sketch columns and {POWER_ITERATIONS} subspace iterations "
        f"({result['passes']} passes over the volumes): **{seconds:.0f} s**, peak resident memory "
        f"**{peak:.1f} GB** (the process held {before:.1f} GB before); the {shown} strong eigenvalues within "
        f"{100 * result['max_relative_error']:.2g} % of the exact float64 ones.",
    ])
    publish(HERE, SECTION, result, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
