"""The files of a run, and how they are written: one place for what every run directory holds.

A run directory (one experiment, or one trial of a sweep under ``<sweep run>/trials/trial-NNNN``)::

    config.yaml       the full experiment it trains, written before its first epoch
    epochs.csv        one row of metrics per epoch (the chief writes it before reporting the epoch)
    latents.jsonl     per-dimension KL and Var(mu) per epoch
    recon_*.png       reconstruction panels (vae.panels)
    checkpoint/       the latest checkpoint (vae.checkpoint)
    split.json        the subjects of its training and validation sets

Everything a reader may see while it is written goes through :func:`atomic_write`. Metrics
are written finite (:func:`finite_metrics`): a NaN must never reach a sweep.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Sequence

from vae.config import ConfigError

EPOCHS_CSV = "epochs.csv"
CONFIG_YAML = "config.yaml"
LATENTS_JSONL = "latents.jsonl"
SPLIT_JSON = "split.json"
# Stands in for a non-finite value: large enough to lose any comparison a search makes.
NONFINITE_SENTINEL = 1e30
_TEMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------- writing safely


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` all at once.

    The bytes go to a hidden temporary file in the same folder (:func:`is_temporary`), are
    flushed to disk, and the file is renamed into place: a reader sees the old file or the
    whole new one, and a killed writer leaves at most a temporary file.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (left behind only by a killed writer)."""
    return path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX)


def csv_bytes(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> bytes:
    """A CSV table of ``rows`` under the header ``columns`` (a missing cell is empty), for :func:`atomic_write`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def check_writable(folder: Path, flag: str) -> None:
    """:class:`~vae.config.ConfigError` naming ``flag`` unless ``folder`` exists or can be created, and written.

    For commands that check their output folder before they start anything.
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag}: cannot create {folder}: {existing} is a file, not a folder; choose another folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # the honest test: permissions, read-only mounts, quotas
    except OSError as err:
        raise ConfigError(f"{flag}: cannot write in {existing} ({err.strerror}); choose a writable folder") from None


# --------------------------------------------------------------------------- metrics

Metrics = dict[str, float | int | str]


def finite(value: float) -> float:
    """``value``, or for NaN and +inf ``NONFINITE_SENTINEL``, for -inf its negative."""
    if math.isfinite(value):
        return value
    return -NONFINITE_SENTINEL if value == -math.inf else NONFINITE_SENTINEL


def finite_metrics(metrics: Mapping[str, float | int | str]) -> tuple[Metrics, str | None]:
    """``metrics`` with every non-finite float made :func:`finite`, and the first key that held one (or None).

    A NaN reported to Tune leaves the Optuna trial RUNNING forever and is never stopped by ASHA.
    """
    nonfinite = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    out = {key: finite(value) if key in nonfinite else value for key, value in metrics.items()}
    return out, nonfinite[0] if nonfinite else None


# --------------------------------------------------------------------------- per-epoch logs


def write_run_config(run_dir: Path, yaml_text: str) -> None:
    """The run's ``config.yaml``: the experiment it trains, complete, so that it can be trained again."""
    header = f"# The experiment of this run; train it again with: collapse-sweep train {run_dir / CONFIG_YAML}\n"
    atomic_write(run_dir / CONFIG_YAML, (header + yaml_text).encode())


def read_epochs(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's ``epochs.csv`` (values as text); empty when the run has none yet."""
    path = Path(run_dir) / EPOCHS_CSV
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_csv_row(path: Path, row: Mapping[str, float | int | str]) -> None:
    """Append ``row`` to a CSV file whose header, written with its first row, fixes the columns."""
    if path.is_file() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        if header != list(row):
            raise ValueError(
                f"{path}: its columns differ from this run's metrics (a different experiment in the same "
                f"directory?); new or missing: {sorted(set(header) ^ set(row))}. Use a new run directory"
            )
        lines = [list(row.values())]
    else:
        lines = [list(row), list(row.values())]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(lines)
    with path.open("a") as f:
        f.write(text.getvalue())


def append_json_line(path: Path, record: Mapping) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def drop_epochs_after(run_dir: Path, epoch: int) -> None:
    """Remove the rows of epochs after ``epoch`` from ``epochs.csv`` and ``latents.jsonl``.

    A resumed run writes those epochs again; rewritten atomically, a file left without
    rows is removed.
    """
    def rewrite(path: Path, header: list[str], rows: list[str]) -> None:
        if rows:
            atomic_write(path, "".join(header + rows).encode())
        else:
            path.unlink()

    table = run_dir / EPOCHS_CSV
    if table.is_file():
        header, *rows = table.read_text().splitlines(keepends=True)
        column = next(csv.reader([header])).index("epoch")
        rewrite(table, [header], [row for row in rows if int(next(csv.reader([row]))[column]) <= epoch])
    latents = run_dir / LATENTS_JSONL
    if latents.is_file():
        lines = latents.read_text().splitlines(keepends=True)
        rewrite(latents, [], [line for line in lines if json.loads(line)["epoch"] <= epoch])


