"""What the report reads: ``trials.csv`` as :class:`Trial` records, ``epochs.csv`` as per-trial curves,
the latent size from ``sweep.json``, and which trials are best (through :mod:`sweeps.selection`).

Only ``trials.csv`` is required. A missing or unusable ``epochs.csv`` raises :class:`Skipped`,
whose message the page shows in place of the picture that needed it.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vae.run_files import NONFINITE_SENTINEL

from ..outputs import RECORD_JSON, TRIALS_CSV
from ..selection import best_index, pareto_front

PARAM_PREFIX, FINAL_PREFIX, BEST_PREFIX = "param/", "final/", "best/"
# The searched parameter that sets a trial's latent size, when a sweep searches it.
Z_DIM_PARAM = "model.z_dim"

Objective = tuple[str, str]  # (metric, "min" | "max")
Curves = dict[str, dict[str, np.ndarray]]  # trial_id -> {"epoch" | metric: [E]}


class Skipped(Exception):
    """A picture that cannot be drawn from what the sweep has written; its message goes in the page."""


@dataclass(frozen=True)
class Trial:
    """One row of ``trials.csv``: parameters keep their text; metrics are floats, NaN when missing.

    ``z_dim`` is the trial's latent size when known (it bounds AU), else None.
    """

    trial_id: str
    number: int | None
    status: str
    epochs: int | None
    stop_reason: str
    run_dir: Path | None
    params: dict[str, str]
    final: dict[str, float]
    best: dict[str, float]
    audited: bool
    z_dim: int | None = None
    feasible: bool = True  # met the sweep's constraints (or it has none); a collapsed trial never does

    @property
    def breaks_constraints(self) -> bool:
        """Healthy, but outside the sweep's constraints (a collapsed trial is told it breaks them all)."""
        return not self.feasible and self.status != "collapsed"

    @property
    def label(self) -> str:
        return f"trial {self.number}" if self.number is not None else self.trial_id

    def metric(self, name: str) -> float:
        """``name`` as ``au`` or ``final/au`` (the final value) or ``best/au``; NaN when absent."""
        if name.startswith(BEST_PREFIX):
            return self.best.get(name.removeprefix(BEST_PREFIX), math.nan)
        return self.final.get(name.removeprefix(FINAL_PREFIX), math.nan)


# --------------------------------------------------------------------------- cells


def to_float(cell: str | None) -> float:
    """A table cell as a float: NaN for an empty or non-numeric cell and for the non-finite sentinel."""
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    # Runs report NaN/inf as +-NONFINITE_SENTINEL; drawn as a number it would flatten every axis.
    return value if abs(value) < NONFINITE_SENTINEL else math.nan


def to_int(cell: str | None) -> int | None:
    value = to_float(cell)
    return int(value) if math.isfinite(value) else None


def to_bool(cell: str | None) -> bool:
    return (cell or "").strip().lower() in {"1", "true", "t", "yes", "y"}


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file (an empty file has neither); a missing trailing cell reads as ``""``."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [{key: value or "" for key, value in row.items() if key is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def columns_with_prefix(row: dict[str, str], prefix: str) -> dict[str, str]:
    return {key.removeprefix(prefix): value for key, value in row.items() if key.startswith(prefix)}


# --------------------------------------------------------------------------- trials.csv


def recorded_z_dim(out_dir: Path) -> int | None:
    """The base experiment's latent size as ``sweep.json`` records it; None without a readable record."""
    try:
        record = json.loads((out_dir / RECORD_JSON).read_text())
        return int(record["experiment"]["model"]["z_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parse_trial(row: dict[str, str], out_dir: Path, z_dim: int | None = None) -> Trial:
    """One ``trials.csv`` row; ``z_dim`` is the sweep's latent size, unless the row searched its own."""
    run_dir = row.get("run_dir", "").strip()
    params = columns_with_prefix(row, PARAM_PREFIX)
    return Trial(
        trial_id=row["trial_id"],
        number=to_int(row.get("number")),
        status=row["status"].strip() or "running",
        epochs=to_int(row.get("epochs")),
        stop_reason=row.get("stop_reason", ""),
        run_dir=out_dir / run_dir if run_dir else None,  # an absolute run_dir stays as it is
        params=params,
        final={key: to_float(value) for key, value in columns_with_prefix(row, FINAL_PREFIX).items()},
        best={key: to_float(value) for key, value in columns_with_prefix(row, BEST_PREFIX).items()},
        audited=to_bool(row.get("audited")),
        z_dim=to_int(params.get(Z_DIM_PARAM)) or z_dim,
        feasible=row.get("feasible", "").strip() != "false",
    )


def load_trials(out_dir: Path) -> list[Trial]:
    """Every row of ``out_dir/trials.csv``; an empty file (a sweep killed before its first trial) gives ``[]``."""
    path = out_dir / TRIALS_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the sweep report is drawn from the sweep's trials table; pass the run "
            f"directory of a sweep that has written {TRIALS_CSV}"
        )
    header, rows = read_table(path)
    missing = {"trial_id", "status"} - set(header)
    if header and missing:
        raise ValueError(f"{path} has no column {sorted(missing)}: it is not a sweep trials table")
    z_dim = recorded_z_dim(out_dir)
    return [parse_trial(row, out_dir, z_dim) for row in rows]


# --------------------------------------------------------------------------- epochs.csv


def load_curves(path: Path, metrics: Sequence[str]) -> Curves:
    """Per trial, ``epoch`` and ``metrics`` from ``epochs.csv`` as ``[E]`` arrays sorted by epoch.

    A metric column the file lacks reads as NaN. Raises :class:`Skipped` when the file is
    missing or has no ``trial_id``/``epoch`` column.
    """
    if not path.is_file():
        raise Skipped(f"{path.name} not found (no trial has finished an epoch yet?)")
    header, rows = read_table(path)
    missing = {"trial_id", "epoch"} - set(header)
    if header and missing:
        raise Skipped(f"{path.name} has no column {sorted(missing)}")
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(row["trial_id"], []).append(row)
    curves: Curves = {}
    for trial_id, trial_rows in grouped.items():
        table = np.array([[to_float(row.get(key)) for key in ("epoch", *metrics)] for row in trial_rows])
        table = table[np.argsort(table[:, 0], kind="stable")]
        curves[trial_id] = {key: table[:, i] for i, key in enumerate(("epoch", *metrics))}
    return curves


# --------------------------------------------------------------------------- which trials are best


def objective_values(trials: Sequence[Trial], metric: str) -> np.ndarray:
    """``[N]`` final values of ``metric``, NaN where a trial has none."""
    return np.array([trial.metric(metric) for trial in trials], dtype=float)


def eligible_trials(trials: Sequence[Trial]) -> list[Trial]:
    """The trials that ran to the end and meet the sweep's constraints: the only ones that can be best or
    on the front (as in the study)."""
    return [t for t in trials if t.status == "completed" and t.feasible]


def best_trial(trials: Sequence[Trial], objectives: Sequence[Objective]) -> Trial | None:
    """The sweep's best trial, as ``best.yaml`` names it (:func:`sweeps.selection.best_index` over the
    eligible trials' final values)."""
    eligible = eligible_trials(trials)
    points = [[t.metric(metric) for metric, _ in objectives] for t in eligible]
    best = best_index(points, [mode for _, mode in objectives])
    return None if best is None else eligible[best]


def front_trials(trials: Sequence[Trial], objectives: Sequence[Objective]) -> list[Trial]:
    """The eligible trials on the Pareto front of ``objectives`` (:func:`sweeps.selection.pareto_front`), in table
    order."""
    eligible = eligible_trials(trials)
    points = np.stack([objective_values(eligible, metric) for metric, _ in objectives], axis=1)
    return [eligible[i] for i in pareto_front(points, [mode for _, mode in objectives])]
