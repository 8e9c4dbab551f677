"""What a sweep leaves in ``results/<sweep>/<run>/``, and the lines it prints while it runs.

    sweep.json    the sweep as run (spec, base experiment, study name and storage): --resume reads it
    study.db      the Optuna study (SQLite, unless --storage named another database)
    trials.csv    one row per trial: parameters, status, epochs run, final and best metrics
    epochs.csv    every trial-epoch: the rows of each trial's own epochs.csv, with its trial_id
    summary.json  counts by status and Optuna state, the best trial, the Pareto front, wall time
    best.yaml     the best trial's experiment, ready for ``collapse-sweep train``
    report/       pictures and index.html (sweeps.report)
    trials/       one run directory per trial (epochs.csv, checkpoint, reconstruction panels)
    tune/         the Tune experiments, one per start of the sweep

Everything is rebuilt from the study and the trials' run directories, so the outputs of
a resumed sweep cover its earlier starts too.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from vae.config import dump_experiment
from vae.run_files import NONFINITE_SENTINEL, atomic_write, csv_bytes, read_epochs

from .selection import best_index
from .space import RUN_NAME
from .spec import Sweep

RECORD_JSON, STUDY_DB = "sweep.json", "study.db"
TRIALS_CSV, EPOCHS_CSV, SUMMARY_JSON, BEST_YAML = "trials.csv", "epochs.csv", "summary.json", "best.yaml"
TRIALS_DIR = "trials"
# Final values every trial row carries, besides the objectives.
FINAL_METRICS = (
    "au", "kl_raw", "recon_mu", "semantic_r2", "channel_nats", "prior_kl_dim_max", "mi", "recon_zero", "z_sensitivity",
)


# --------------------------------------------------------------------------- trials


def trial_status(trial: FrozenTrial) -> str:
    """The status the searcher recorded; for a trial without one, what its Optuna state says."""
    if "status" in trial.user_attrs:
        return trial.user_attrs["status"]
    return {TrialState.RUNNING: "running", TrialState.COMPLETE: "completed"}.get(trial.state, "failed")


def latest_trials(study: optuna.Study) -> list[FrozenTrial]:
    """One Optuna trial per run directory: the latest, as a continued trial replaces the interrupted one."""
    latest: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        run_name = trial.user_attrs.get(RUN_NAME)
        if trial.state != TrialState.WAITING and run_name:
            latest[run_name] = trial  # trials come in number order
    return sorted(latest.values(), key=lambda t: t.number)


def _float(text: str | None) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if abs(value) < NONFINITE_SENTINEL else math.nan  # the sentinel of a non-finite value


def trial_row(trial: FrozenTrial, sweep: Sweep, epochs: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The ``trials.csv`` row of ``trial`` with its run's ``epochs`` rows."""
    last = epochs[-1] if epochs else {}
    row: dict[str, Any] = {
        "trial_id": trial.user_attrs[RUN_NAME], "number": trial.number, "status": trial_status(trial),
        "stop_reason": trial.user_attrs.get("stop_reason", ""), "state": trial.state.name,
        "epochs": last.get("epoch", 0), "first_epoch": trial.user_attrs.get("first_epoch", ""),
        "run_dir": f"{TRIALS_DIR}/{trial.user_attrs[RUN_NAME]}",
        "enqueued": trial.user_attrs.get("enqueued", ""), "audited": "true" if trial.user_attrs.get("audited") else "",
    }
    row["feasible"] = feasibility(trial)
    row |= {f"param/{name}": trial.params.get(name, "") for name in sweep.space.names}
    constrained = (c.metric for c in sweep.spec.constraints)
    for metric in dict.fromkeys([*FINAL_METRICS, *(m for m, _ in sweep.objectives), *constrained]):
        row[f"final/{metric}"] = last.get(metric, "")
    for metric, mode in sweep.objectives:
        values = [v for v in (_float(r.get(metric)) for r in epochs) if not math.isnan(v)]
        row[f"best/{metric}"] = (max if mode == "max" else min)(values) if values else ""
    return row


def feasibility(trial: FrozenTrial) -> str:
    """``true`` when the trial met every constraint of its sweep, ``false`` when not, empty when none was
    judged (no constraints, or it failed or is still running)."""
    if not trial.constraints:
        return ""
    return "true" if all(v <= 0 for v in trial.constraints.values()) else "false"


def best_trial(study: optuna.Study, objectives: Sequence[tuple[str, str]]) -> FrozenTrial | None:
    """The sweep's best trial (:func:`sweeps.selection.best_index` over the values of the COMPLETE trials
    that meet the sweep's constraints, as Optuna's ``best_trials`` takes them)."""
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if feasibility(t) != "false"]
    best = best_index([t.values for t in completed], [mode for _, mode in objectives])
    return None if best is None else completed[best]


def no_best_reason(study: optuna.Study, sweep: Sweep) -> str:
    """Why a sweep names no best trial: none completed, or none of those met the constraints (naming the
    one that came closest)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return "no trial completed its epochs"
    closest = min(completed, key=lambda t: sum(max(0.0, v) for v in t.constraints.values()))
    bounds = ", ".join(c.describe() for c in sweep.spec.constraints)
    excess = ", ".join(f"{name} {value:+.3g}" for name, value in closest.constraints.items() if value > 0)
    return (f"no completed trial met the constraints ({bounds}); the closest, {closest.user_attrs.get(RUN_NAME)}, "
            f"exceeds them by {excess}")


def best_yaml(sweep: Sweep, trial: FrozenTrial, out_dir: Path) -> str:
    cfg = sweep.experiment_for(trial.params)
    cfg = cfg.model_copy(update={"name": f"{sweep.name}-{trial.user_attrs[RUN_NAME]}"})
    values = ", ".join(f"{metric} {value:.4g}" for (metric, _), value in zip(sweep.objectives, trial.values))
    header = (
        f"# Best trial of sweep {sweep.name} ({out_dir.name}): Optuna trial {trial.number}, "
        f"{trial.user_attrs[RUN_NAME]}: {values}\n"
        f"# Train it with: collapse-sweep train {out_dir / BEST_YAML}\n"
    )
    return header + dump_experiment(cfg)


# --------------------------------------------------------------------------- everything


def write_outputs(
    out_dir: Path, sweep: Sweep, study: optuna.Study, info: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write trials.csv, epochs.csv, best.yaml and summary.json (with ``info`` merged in).

    Returns the summary and the rows of trials.csv (parameters keep their types).
    """
    trials = latest_trials(study)
    histories = {t.user_attrs[RUN_NAME]: read_epochs(out_dir / TRIALS_DIR / t.user_attrs[RUN_NAME]) for t in trials}
    rows = [trial_row(t, sweep, histories[t.user_attrs[RUN_NAME]]) for t in trials]
    columns = list(rows[0]) if rows else ["trial_id", "number", "status", "run_dir"]
    atomic_write(out_dir / TRIALS_CSV, csv_bytes(rows, columns))

    numbers = {t.user_attrs[RUN_NAME]: t.number for t in trials}
    epoch_rows = [{"trial_id": name, "number": numbers[name], **r} for name, h in histories.items() for r in h]
    epoch_columns = dict.fromkeys(["trial_id", "number"])
    for r in epoch_rows:
        epoch_columns.update(dict.fromkeys(r))
    atomic_write(out_dir / EPOCHS_CSV, csv_bytes(epoch_rows, list(epoch_columns)))

    best = best_trial(study, sweep.objectives)
    if best is not None:
        atomic_write(out_dir / BEST_YAML, best_yaml(sweep, best, out_dir).encode())
    summary = {
        **info,
        "objectives": [list(o) for o in sweep.objectives],
        "early_stop": sweep.spec.early_stop.mode,
        "num_samples": sweep.spec.budget.num_samples,
        "epochs": sweep.epochs,
        "trials": len(rows),
        "status_counts": dict(Counter(row["status"] for row in rows)),
        "optuna_states": dict(Counter(t.state.name for t in study.get_trials(deepcopy=False))),
        "constraints": [c.describe() for c in sweep.spec.constraints],
        "infeasible_trials": [r["trial_id"] for r in rows if r["feasible"] == "false" and r["status"] != "collapsed"],
        "best": None if best is None else _describe(best, sweep),
        "best_yaml": None if best is None else str(out_dir / BEST_YAML),
        "no_best": no_best_reason(study, sweep) if best is None else "",
        "pareto_front": [_describe(t, sweep) for t in study.best_trials],
    }
    atomic_write(out_dir / SUMMARY_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    return summary, rows


def _describe(trial: FrozenTrial, sweep: Sweep) -> dict[str, Any]:
    return {
        "number": trial.number, "trial_id": trial.user_attrs.get(RUN_NAME), "params": trial.params,
        "values": dict(zip((m for m, _ in sweep.objectives), trial.values)),
    }


# --------------------------------------------------------------------------- printing


def param_labels(names: Sequence[str]) -> dict[str, str]:
    """Short labels: the shortest dotted suffix of each name that no other name ends with."""
    labels = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            label = ".".join(parts[-k:])
            if not any(other != name and (other == label or other.endswith("." + label)) for other in names):
                break
        labels[name] = label
    return labels


def format_params(params: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    return " ".join(f"{labels.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{labels.get(k, k)}={v}"
                    for k, v in params.items())


TABLE_HEADER = f"{'trial':<11} {'epoch':>7} {'AU':>4} {'KL_raw':>9} {'recon(mu)':>10}  {'status':<12} parameters"


def table_line(
    trial_id: str, epoch: Any, epochs: int, au: Any, kl: Any, recon: Any, status: str, params: str
) -> str:
    def number(value: Any, spec: str) -> str:
        value = _float(str(value)) if value not in ("", None) else math.nan
        return "-" if math.isnan(value) else format(value, spec)

    return (f"{trial_id:<11} {f'{epoch}/{epochs}':>7} {number(au, '.0f'):>4} {number(kl, '.3g'):>9} "
            f"{number(recon, '.4g'):>10}  {status:<12} {params}")


def trial_table(rows: Sequence[Mapping[str, Any]], sweep: Sweep) -> str:
    """The final table of a sweep, one line per row of its ``trials.csv``."""
    labels = param_labels(sweep.space.names)
    lines = [TABLE_HEADER]
    for row in rows:
        params = {name: row[f"param/{name}"] for name in sweep.space.names if row[f"param/{name}"] != ""}
        lines.append(table_line(row["trial_id"], row["epochs"], sweep.epochs, row["final/au"], row["final/kl_raw"],
                                row["final/recon_mu"], row["status"], format_params(params, labels)))
    return "\n".join(lines)
