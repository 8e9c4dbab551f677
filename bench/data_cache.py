"""Benchmark: NIfTI decode + preprocess per subject vs reading the prepared cache.

Writes a few synthetic BraTS-sized subjects (4 x int16 240x240x155 ``.nii.gz``) to a temporary
directory, then times, per subject and output size N in 32, 64, 128:

* decode: the pipeline's read of the four files (gunzip, NIfTI parse, RAS, float32);
* decode + preprocess: ``preprocess_subject`` (decode, crop/pad/resample, z-score, float16);
* cached read: ``np.load`` of the ``[4, N, N, N]`` float16 ``.npy``, whole and memory-mapped
  (then copied to float32, the conversion the training loop does on its device), warm (page cache)
  and cold (pages dropped); ``CachedVolumes[i]`` returns the float16 tensor.

Results go to ``bench/data_cache.json`` and to this script's section of ``bench/RESULTS.md``.

    python -m bench.data_cache [--subjects 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import scipy

from bench.results import cpu_model, publish
from vae.data import CachedVolumes, PreprocessParams, discover, prepare, preprocess_subject
from vae.data.preprocess import load_canonical

HERE = Path(__file__).resolve().parent
SIZES = (32, 64, 128)
SHAPE = (240, 240, 155)
NAMES = {"t1c": "t1ce", "t1n": "t1", "t2f": "flair", "t2w": "t2"}


def write_subject(root: Path, index: int) -> None:
    """A BraTS 2021-named subject: an ellipsoid brain with smooth contrast and 2 % noise, LPS affine."""
    rng = np.random.default_rng(index)
    x, y, z = np.ogrid[-119.5:120.5, -119.5:120.5, -77:78]
    a, b, c = rng.uniform(60, 72), rng.uniform(75, 90), rng.uniform(55, 65)
    inside = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS files are believed to be LPS
    case = f"BraTS2021_{index:05d}"
    (root / case).mkdir(parents=True)
    for channel, name in enumerate(NAMES.values()):
        base = 400 * (1 + channel) + 120 * np.sin(x / 9 + channel) * np.cos(y / 11) + 2 * z
        volume = np.where(inside, base * (1 + 0.02 * rng.standard_normal(SHAPE)), 0)
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), root / case / f"{case}_{name}.nii.gz")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold(fn: Callable[[Path], object], paths: list[Path]) -> float:
    """Median ms of ``fn(path)`` right after ``path`` was dropped from the page cache."""
    times = []
    for path in paths:
        drop_from_page_cache(path)
        start = time.perf_counter()
        fn(path)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)




def run(subjects: int, repeats: int, work: Path) -> dict:
    raw = work / "raw"
    for i in range(subjects):
        write_subject(raw, i)
    found = discover(raw)
    source_mb = sum(p.stat().st_size for s in found for p in s.paths.values()) / len(found) / 1e6
    modalities = tuple(NAMES)

    decode = statistics.median(timed(lambda s=s: load_canonical(s, modalities), repeats) for s in found)
    rows = []
    for size in SIZES:
        params = PreprocessParams(size=size)
        preprocess = statistics.median(timed(lambda s=s: preprocess_subject(s, params), repeats) for s in found)
        cache = work / f"cache{size}"
        start = time.perf_counter()
        prepare(raw, cache, params)
        prepare_ms = (time.perf_counter() - start) * 1e3 / len(found)
        files = sorted(cache.glob("*.npy"))
        dataset = CachedVolumes(cache)
        reads = 20 * repeats
        full = statistics.median(timed(lambda f=f: np.load(f), reads) for f in files)
        mapped = statistics.median(
            timed(lambda f=f: np.asarray(np.load(f, mmap_mode="r"), dtype=np.float32), reads) for f in files
        )
        item = statistics.median(timed(lambda i=i: dataset[i], reads) for i in range(len(dataset)))
        full_cold = cold(np.load, files * repeats)
        rows.append({
            "size": size,
            "cache_mb": files[0].stat().st_size / 1e6,
            "decode_preprocess_ms": preprocess,
            "prepare_ms_per_subject": prepare_ms,
            "npy_full_warm_ms": full,
            "npy_full_cold_ms": full_cold,
            "npy_mmap_float32_warm_ms": mapped,
            "dataset_item_ms": item,
            "speedup_full_warm": preprocess / full,
            "speedup_full_cold": preprocess / full_cold,
        })
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.data_cache", *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "scipy": scipy.__version__, "nibabel": nib.__version__},
        "subjects": subjects,
        "repeats": repeats,
        "source": {"shape": list(SHAPE), "dtype": "int16", "modalities": 4, "mb_per_subject": source_mb},
        "decode_ms": decode,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "## Data pipeline: NIfTI decode + preprocess vs cached read (`bench/data_cache.py`)",
        "",
        f"- Date: {result['date']}; command: `{result['command']}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, numpy {machine['numpy']}, "
        f"scipy {machine['scipy']}, nibabel {machine['nibabel']}",
        f"- Source: {result['subjects']} synthetic subjects, 4 x int16 {'x'.join(map(str, result['source']['shape']))} "
        f"`.nii.gz` ({result['source']['mb_per_subject']:.1f} MB per subject); medians of {result['repeats']} runs per "
        "subject (cached reads: 20x as many), single process.",
        f"- Decode alone (gunzip + parse + RAS + float32, 4 files): **{result['decode_ms']:.0f} ms** per subject.",
        "",
        "| N | cache file | decode + preprocess | `prepare` per subject (check + preprocess + write) "
        "| `np.load` warm | `np.load` cold | mmap + float32 warm | `CachedVolumes[i]` | speed-up warm / cold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['size']}^3 | {row['cache_mb']:.2f} MB | {row['decode_preprocess_ms']:.0f} ms "
            f"| {row['prepare_ms_per_subject']:.0f} ms | {row['npy_full_warm_ms']:.2f} ms "
            f"| {row['npy_full_cold_ms']:.2f} ms "
            f"| {row['npy_mmap_float32_warm_ms']:.2f} ms | {row['dataset_item_ms']:.2f} ms "
            f"| {row['speedup_full_warm']:.0f}x / {row['speedup_full_cold']:.0f}x |"
        )
    target = all(row["speedup_full_warm"] >= 100 for row in result["rows"])
    verdict = "met" if target else "NOT met"
    item = ", ".join(f"{r['decode_preprocess_ms'] / r['dataset_item_ms']:.0f}x at {r['size']}^3" for r in result["rows"])
    lines += [
        "",
        f"Target (cached `np.load` >= 100x faster than decode + preprocess, warm): {verdict}. "
        f"`CachedVolumes[i]` (the float16 tensor a loader moves; the loop converts on its device): {item}.",
    ]
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        result = run(args.subjects, args.repeats, Path(work))
    publish(HERE, "bench/data_cache.py", result, markdown(result))


if __name__ == "__main__":
    main()
