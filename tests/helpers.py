"""What several test modules share (fixtures are in conftest.py): Ray scratch folders, sweep files,
command lines and outputs, processes and their sessions, and small synthetic NIfTI subjects.
"""
from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import yaml

from bench.chaos import kill_session

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- Ray


RAY_FOLDERS: list[str] = []  # every folder ray_folder made; conftest removes them when the session ends


def ray_folder() -> dict[str, str]:
    """Environment of one Ray instance: a short scratch folder (Ray's socket paths must be
    short) holding its temp files and an auth token, so no test touches ``~/.ray``."""
    base = tempfile.mkdtemp(prefix="r", dir="/tmp")
    RAY_FOLDERS.append(base)
    Path(base, "token").write_text(secrets.token_hex(32))
    return {"RAY_TMPDIR": base, "RAY_AUTH_TOKEN_PATH": f"{base}/token", "TMPDIR": base}


def ray_env(scratch: Path) -> dict[str, str]:
    """The environment of one sweep driver: its own Ray folder and token, the shared data cache."""
    return {**os.environ, **ray_folder(), "COLLAPSE_SWEEP_CACHE": str(scratch / "cache")}


# --------------------------------------------------------------------------- sweeps

# A 16^3 phantom with 2 modalities and a tiny model: an epoch takes about a second.
SMALL = {
    "data.size": 16, "data.modalities": ["t1c", "t2f"], "data.batch_size": 2, "data.num_workers": 0,
    "data.val_fraction": 0.34, "data.phantom.subjects": 12,
    "model.z_dim": 8, "model.base_filters": 4, "model.depth": 2, "model.norm_groups": 2, "model.broadcast_grid": 4,
    # DIP-II from the start, at full weight from the second epoch on.
    "objective.dip.start_epoch": 0.0, "objective.dip.warmup_epochs": 1.0,
    "optim.lr": 3.0e-3, "train.mixed_precision": False, "train.checkpoint_every": 1, "train.image_every": 10,
}
SOUND = {**SMALL, "objective.likelihood": "gaussian", "objective.sigma2": 0.01}
BETA = {"objective.kl.beta": {"low": 0.01, "high": 0.1, "log": True}}
# A valid sweep (no Ray needed to load it); error cases break it in one place.
MINIMAL = {
    "experiment": "exp1_baseline_vae",
    "overrides": {"data.size": 16, "model.depth": 2, "model.z_dim": 8},
    "space": {"objective.kl.beta": {"low": 0.1, "high": 10.0, "log": True}},
    "budget": {"num_samples": 2, "max_epochs": 2},
}


def write_yaml(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def write_sweep(folder: Path, name: str, overrides: dict, space: dict, resources: dict, budget: dict,
                **sections) -> Path:
    """``folder/<name>.yaml``: a sweep of exp2 with ``overrides``, ``space``, no early stop unless ``sections`` say."""
    raw = {
        "experiment": "exp2_dipvae_sbd", "overrides": overrides, "space": space, "early_stop": {"mode": "none"},
        "resources": resources, "budget": budget, **sections,
    }
    return write_yaml(folder / f"{name}.yaml", raw)


def sweep_command(path: Path | str, results: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / "run.py"), str(path), "--results", str(results), "--no-dashboard",
            *args]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load_study(out_dir: Path) -> optuna.Study:
    record = json.loads((out_dir / "sweep.json").read_text())
    return optuna.load_study(study_name=record["study"], storage=f"sqlite:///{out_dir / 'study.db'}")


def params_of(row: dict[str, str]) -> dict[str, str]:
    """The ``param/...`` cells of a ``trials.csv`` row."""
    return {key: value for key, value in row.items() if key.startswith("param/")}


# --------------------------------------------------------------------------- processes


def mid_sweep(out_dir: Path) -> bool:
    """A trial has ended and two others run side by side, each with an epoch written (read from the
    trials' own ``epochs.csv``, never racing the study's creation)."""
    from vae.run_files import read_epochs

    last = [rows[-1].get("status") for rows in map(read_epochs, (out_dir / "trials").glob("trial-*")) if rows]
    return "completed" in last and last.count("running") >= 2


def start_sweep(path: Path, results: Path, log: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``python sweeps/run.py`` in a session of its own (so that it can be killed with its Ray instance)."""
    with log.open("w") as out:
        return subprocess.Popen(
            sweep_command(path, results, *args), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen, log: Path, timeout: float, expected: int = 0) -> str:
    """Wait for ``process`` (killing its session if it overruns); its log, once it ended with ``expected``."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_session(process.pid)
    text = log.read_text()
    assert process.returncode == expected, text[-5000:]
    return text


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail (with the log's end) if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.05)


# --------------------------------------------------------------------------- NIfTI subjects

FILE_NAMES = {  # canonical modality -> name in each convention
    "brats2021": {"t1c": "t1ce", "t1n": "t1", "t2f": "flair", "t2w": "t2", "seg": "seg"},
    "brats2023": {"t1c": "t1c", "t1n": "t1n", "t2f": "t2f", "t2w": "t2w", "seg": "seg"},
}
SEPARATOR = {"brats2021": "_", "brats2023": "-"}
CHANNELS = ("t1c", "t1n", "t2f", "t2w")
SHAPE = (28, 32, 24)  # voxels at 1 mm


def brain(shape=SHAPE, voxel_mm=1.0, channel=0, seed=0) -> np.ndarray:
    """A float32 ellipsoid brain on a grid centred at 0 mm: smooth contrast, zero outside."""
    rng = np.random.default_rng(seed)
    phase, tilt = rng.uniform(0, np.pi), rng.uniform(0.5, 1.5)
    x, y, z = ((np.indices(shape, dtype=np.float64)[i] - (shape[i] - 1) / 2) * voxel_mm for i in range(3))
    # Semi-axes just under whole multiples of 2 mm: bounding boxes at 1 and 2 mm then span the same mm.
    inside = (x / 11.9) ** 2 + (y / 13.9) ** 2 + (z / 9.9) ** 2 <= 1
    value = 100 * (1 + channel) + 25 * np.sin(x / 4 + phase + channel) + 20 * np.cos(y / 5) + 10 * tilt * z
    return np.where(inside, value, 0).astype(np.float32)


def ras_affine(shape, voxel_mm=1.0) -> np.ndarray:
    """Voxel centres at (i - (n - 1) / 2) * voxel_mm: the same world grid as :func:`brain`."""
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = [-(n - 1) / 2 * voxel_mm for n in shape]
    return affine


def write_subject(root: Path, case: str, naming="brats2021", ext=".nii.gz", seed=0, volumes=None, affine=None,
                  seg=True) -> Path:
    """A case directory with the four modalities (and a seg); returns the directory."""
    folder = root / case
    folder.mkdir(parents=True, exist_ok=True)
    volumes = volumes or {m: brain(channel=c, seed=seed) for c, m in enumerate(CHANNELS)}
    if seg:
        volumes = {**volumes, "seg": (next(iter(volumes.values())) > 150).astype(np.uint8)}
    for kind, volume in volumes.items():
        nib.save(nib.Nifti1Image(volume, ras_affine(volume.shape) if affine is None else affine),
                 folder / f"{case}{SEPARATOR[naming]}{FILE_NAMES[naming][kind]}{ext}")
    return folder


def modality_path(folder: Path, kind: str, naming="brats2021", ext=".nii.gz") -> Path:
    return folder / f"{folder.name}{SEPARATOR[naming]}{FILE_NAMES[naming][kind]}{ext}"


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def save(path: Path, volume: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(volume, ras_affine(volume.shape[:3]) if affine is None else affine), path)
    return path


def make_bad(kind: str, root: Path, prefix: str = "") -> Path:
    """Break one subject ``<prefix>bad`` under ``root`` (beside ``<prefix>good``); returns the file to blame."""
    write_subject(root, f"{prefix}good", seed=9)
    folder = write_subject(root, f"{prefix}bad")
    t2f = modality_path(folder, "t2f")
    if kind == "truncated gzip":
        return truncate(t2f)
    if kind == "corrupt gzip":
        data = bytearray(t2f.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        t2f.write_bytes(bytes(data))
        return t2f
    if kind == "not NIfTI":
        t2f.unlink()
        text = folder / f"{folder.name}_flair.nii"
        text.write_text("subject,notes\n" * 50)
        return text
    if kind == "missing modality":
        t2f.unlink()
        return folder
    if kind == "4D":
        return save(t2f, np.stack([brain(), brain()], axis=-1))
    if kind == "shape":
        return save(t2f, np.pad(brain(), 1), affine=ras_affine(SHAPE))
    if kind == "affine":
        shifted = ras_affine(SHAPE)
        shifted[0, 3] += 3.0  # 3 mm along x
        return save(t2f, brain(), affine=shifted)
    if kind == "NaN/Inf":
        volume = brain()
        volume[3, 4, 5], volume[12, 14, 10] = np.nan, np.inf
        return save(t2f, volume)
    if kind == "all zero":
        return save(t2f, np.zeros(SHAPE, np.float32))
    if kind == "duplicate":
        return write_subject(root / "again", folder.name)
    raise AssertionError(kind)


BAD_INPUTS = {  # kind -> words the message must contain
    "truncated gzip": "truncated gzip",
    "corrupt gzip": "corrupt gzip",
    "not NIfTI": "not a NIfTI file",
    "missing modality": "missing modality t2f",
    "4D": "4D image",
    "shape": "shape (30, 34, 26) differs",
    "affine": "affine differs",
    "NaN/Inf": "2 NaN/Inf voxels",
    "all zero": "all voxels are zero",
    "duplicate": "duplicate subject id",
}
