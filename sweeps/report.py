"""Pictures and one HTML page for a finished or partial sweep: ``<out_dir>/report/index.html``.

Reads ``trials.csv`` (one row per trial), ``epochs.csv`` (one row per trial-epoch), each
trial's ``recon_latest.png`` and, when given, the Optuna study. Only ``trials.csv`` is
required: a picture whose inputs are missing or unusable is left out and the page says why,
so the report of a sweep killed half-way shows whatever there is.

Pictures (all in ``<out_dir>/report/``):

- ``curves.png``       AU and KL_raw per epoch, one line per trial, coloured by final status
- ``pareto.png``       two objectives: every trial's final values and the Pareto front;
                       one objective: its value per trial number and the best so far
- ``importances.png``  Optuna's fANOVA parameter importances per objective
- ``recon_best.png``   the best trial's last reconstruction panel (copied)
- ``recon_audited.png`` the audited configuration's last reconstruction panel (copied)
- ``params.png``       final AU (or the first objective) against each parameter
"""
from __future__ import annotations

import csv
import html
import io
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vae.panels import LATEST_PANEL
from vae.run_files import NONFINITE_SENTINEL, atomic_write

from .outputs import EPOCHS_CSV, TRIALS_CSV
from .selection import best_index, check_modes, pareto_front

REPORT_DIR = "report"
INDEX_HTML = "index.html"
CURVES_PNG = "curves.png"
PARETO_PNG = "pareto.png"
IMPORTANCES_PNG = "importances.png"
RECON_BEST_PNG = "recon_best.png"
RECON_AUDITED_PNG = "recon_audited.png"
# The sweep's best trial: best on the first objective, ties broken by the next (best.yaml's).
BEST_HEADING = "Best trial (best.yaml)"
PARAMS_PNG = "params.png"

PARAM_PREFIX, FINAL_PREFIX, BEST_PREFIX = "param/", "final/", "best/"
# Final trial statuses in the order the page lists them, with one colour each in every picture.
STATUS_COLOURS = {
    "completed": "#2ca02c",
    "collapsed": "#d62728",
    "diverged": "#000000",
    "asha_stopped": "#ff7f0e",
    "failed": "#9e9e9e",
    "running": "#1f77b4",
}
OTHER_STATUS_COLOUR = "#9467bd"
# A parameter or objective spanning this ratio or more (all positive) is shown on a log axis.
LOG_AXIS_RATIO = 100.0

Objective = tuple[str, str]  # (metric, "min" | "max")
Curves = dict[str, dict[str, np.ndarray]]  # trial_id -> {"epoch" | metric: [E]}


class Skipped(Exception):
    """A picture that cannot be drawn from what the sweep has written; its message goes in the page."""


@dataclass(frozen=True)
class Trial:
    """One row of ``trials.csv``: parameters keep their text; metrics are floats, NaN when missing."""

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

    @property
    def label(self) -> str:
        return f"trial {self.number}" if self.number is not None else self.trial_id

    def metric(self, name: str) -> float:
        """``name`` as ``au`` or ``final/au`` (the final value) or ``best/au``; NaN when absent."""
        if name.startswith(BEST_PREFIX):
            return self.best.get(name.removeprefix(BEST_PREFIX), math.nan)
        return self.final.get(name.removeprefix(FINAL_PREFIX), math.nan)


# --------------------------------------------------------------------------- reading the tables


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


def parse_trial(row: dict[str, str], out_dir: Path) -> Trial:
    run_dir = row.get("run_dir", "").strip()
    return Trial(
        trial_id=row["trial_id"],
        number=to_int(row.get("number")),
        status=row["status"].strip() or "running",
        epochs=to_int(row.get("epochs")),
        stop_reason=row.get("stop_reason", ""),
        run_dir=out_dir / run_dir if run_dir else None,  # an absolute run_dir stays as it is
        params=columns_with_prefix(row, PARAM_PREFIX),
        final={key: to_float(value) for key, value in columns_with_prefix(row, FINAL_PREFIX).items()},
        best={key: to_float(value) for key, value in columns_with_prefix(row, BEST_PREFIX).items()},
        audited=to_bool(row.get("audited")),
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
    return [parse_trial(row, out_dir) for row in rows]


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


# --------------------------------------------------------------------------- selection


def objective_values(trials: Sequence[Trial], metric: str) -> np.ndarray:
    """``[N]`` final values of ``metric``, NaN where a trial has none."""
    return np.array([trial.metric(metric) for trial in trials], dtype=float)


def best_trial(trials: Sequence[Trial], objectives: Sequence[Objective]) -> Trial | None:
    """The sweep's best trial, as ``best.yaml`` names it (:func:`sweeps.selection.best_index` over the
    completed trials' final values)."""
    completed = [t for t in trials if t.status == "completed"]
    points = [[t.metric(metric) for metric, _ in objectives] for t in completed]
    best = best_index(points, [mode for _, mode in objectives])
    return None if best is None else completed[best]


def front_trials(trials: Sequence[Trial], objectives: Sequence[Objective]) -> list[Trial]:
    """The completed trials on the Pareto front of ``objectives``, in table order."""
    completed = [t for t in trials if t.status == "completed"]
    points = np.stack([objective_values(completed, metric) for metric, _ in objectives], axis=1)
    return [completed[i] for i in pareto_front(points, [mode for _, mode in objectives])]


# --------------------------------------------------------------------------- pictures


def status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status, OTHER_STATUS_COLOUR)


def status_handles(statuses: set[str]) -> list[Line2D]:
    """Legend entries for ``statuses``, in the canonical order, unknown ones last."""
    ordered = [s for s in STATUS_COLOURS if s in statuses] + sorted(statuses - set(STATUS_COLOURS))
    return [Line2D([], [], color=status_colour(s), marker="o", label=s) for s in ordered]


def is_log_like(values: np.ndarray) -> bool:
    """Whether the finite ``values`` are all positive and span ``LOG_AXIS_RATIO`` or more."""
    finite = values[np.isfinite(values)]
    return finite.size > 1 and bool((finite > 0).all()) and finite.max() / finite.min() >= LOG_AXIS_RATIO


def kl_scale(values: np.ndarray) -> tuple[str, dict[str, float]]:
    """A y scale for KL values spanning decades: log, or symlog when some are zero, linear with nothing positive."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size == 0:
        return "linear", {}
    if positive.size == finite.size:
        return "log", {}
    return "symlog", {"linthresh": float(positive.min())}


def figure_png(fig: Figure) -> bytes:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def curves_figure(trials: Sequence[Trial], curves: Curves) -> Figure:
    """AU and KL_raw against epoch, one line per trial in its status colour; the audited trial thick and dashed."""
    drawn = {trial_id: series for trial_id, series in curves.items() if np.isfinite(series["epoch"]).any()}
    if not drawn:
        raise Skipped(f"{EPOCHS_CSV} has no epochs yet")
    by_id = {trial.trial_id: trial for trial in trials}
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_au, ax_kl = fig.subplots(1, 2)
    statuses, audited_label = set(), None
    for trial_id, series in drawn.items():
        trial = by_id.get(trial_id)
        status = trial.status if trial else "running"  # not in trials.csv yet: still running
        audited = trial is not None and trial.audited
        statuses.add(status)
        style = dict(
            color=status_colour(status), lw=2.8 if audited else 1.0, ls="--" if audited else "-",
            alpha=1.0 if audited else 0.7, zorder=3 if audited else 2, markersize=4,
        )
        for ax, metric in ((ax_au, "au"), (ax_kl, "kl_raw")):
            single = np.isfinite(series[metric]).sum() == 1  # one point draws no line: show a dot
            ax.plot(series["epoch"], series[metric], marker="o" if single else None, **style)
            if audited:
                annotate_last_point(ax, series["epoch"], series[metric], "audited")
        if audited:
            audited_label = f"audited ({trial.label})"
    scale, scale_args = kl_scale(np.concatenate([series["kl_raw"] for series in drawn.values()]))
    ax_kl.set_yscale(scale, **scale_args)
    ax_au.set(xlabel="epoch", ylabel="active units", title="AU per epoch")
    ax_kl.set(xlabel="epoch", ylabel="KL_raw (nats)", title="KL_raw per epoch")
    handles = status_handles(statuses)
    if audited_label:
        handles.append(Line2D([], [], color="0.3", lw=2.8, ls="--", label=audited_label))
    ax_au.legend(handles=handles, fontsize=8, title="final status", title_fontsize=8)
    without = sum(trial.trial_id not in drawn for trial in trials)
    fig.suptitle(f"{len(drawn)} trials" + (f" ({without} without epochs not drawn)" if without else ""))
    return fig


def annotate_last_point(ax, x: np.ndarray, y: np.ndarray, text: str) -> None:
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if finite.size:
        ax.annotate(text, (x[finite[-1]], y[finite[-1]]), xytext=(4, 4), textcoords="offset points", fontsize=8)


def axis_label(objective: Objective) -> str:
    metric, mode = objective
    return f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)"


def status_scatter(ax, trials: Sequence[Trial], x: np.ndarray, y: np.ndarray) -> set[str]:
    """Trials at ``(x, y)`` ``[N]`` in their status colours, points with a NaN left out; returns the statuses shown."""
    shown = [i for i in range(len(trials)) if math.isfinite(x[i]) and math.isfinite(y[i])]
    ax.scatter(x[shown], y[shown], c=[status_colour(trials[i].status) for i in shown], s=28, alpha=0.8, zorder=2)
    return {trials[i].status for i in shown}


def pareto_figure(trials: Sequence[Trial], objectives: Sequence[Objective]) -> Figure:
    """Every trial's two final objective values and the Pareto front of the completed trials, joined as a staircase."""
    x, y = (objective_values(trials, metric) for metric, _ in objectives)
    if not (np.isfinite(x) & np.isfinite(y)).any():
        raise Skipped(f"no trial has finite final values of both {objectives[0][0]} and {objectives[1][0]}")
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.subplots()
    shown = status_scatter(ax, trials, x, y)
    front = sorted(front_trials(trials, objectives), key=lambda t: t.metric(objectives[0][0]))
    if front:
        fx, fy = (objective_values(front, metric) for metric, _ in objectives)
        # The staircase bounds the dominated region: each corner takes the worse x of its two
        # neighbours (sorted by x: the right one when x is minimised, the left one when maximised).
        steps = "steps-post" if objectives[0][1] == "min" else "steps-pre"
        ax.plot(fx, fy, color="0.2", lw=1.2, drawstyle=steps, zorder=1)
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="0.1", linewidths=1.5, zorder=3)
        for trial, px, py in zip(front, fx, fy):
            ax.annotate(trial.label, (px, py), xytext=(5, 5), textcoords="offset points", fontsize=7)
    front_handle = Line2D([], [], color="0.2", marker="o", mfc="none", mec="0.1", label="Pareto front (completed)")
    ax.legend(handles=status_handles(shown) + [front_handle], fontsize=8)
    mark_audited(ax, trials, x, y)
    for set_scale, values in ((ax.set_xscale, x), (ax.set_yscale, y)):
        if is_log_like(values):
            set_scale("log")
    ax.set(xlabel=axis_label(objectives[0]), ylabel=axis_label(objectives[1]),
           title=f"{len(front)} trials on the Pareto front")
    return fig


def mark_audited(ax, trials: Sequence[Trial], x: np.ndarray, y: np.ndarray) -> None:
    for trial, px, py in zip(trials, x, y):
        if trial.audited and math.isfinite(px) and math.isfinite(py):
            ax.scatter([px], [py], marker="*", s=220, facecolors="none", edgecolors="0.1", zorder=4)
            ax.annotate(f"audited ({trial.label})", (px, py), xytext=(6, -12), textcoords="offset points", fontsize=8)


def progress_figure(trials: Sequence[Trial], objective: Objective) -> Figure:
    """One objective's final value per trial number, and the best so far among completed trials."""
    metric, mode = objective
    values = objective_values(trials, metric)
    if not np.isfinite(values).any():
        raise Skipped(f"no trial has a finite final {metric}")
    # Trials without an Optuna number keep their place in the table.
    numbers = np.array([t.number if t.number is not None else i for i, t in enumerate(trials)], dtype=float)
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    shown = status_scatter(ax, trials, numbers, values)
    order = np.argsort(numbers, kind="stable")
    completed = np.array([trials[i].status == "completed" and np.isfinite(values[i]) for i in order])
    if completed.any():
        running_best = np.minimum.accumulate if mode == "min" else np.maximum.accumulate
        ax.plot(numbers[order][completed], running_best(values[order][completed]), color="0.2",
                drawstyle="steps-post", zorder=1)
    best_handle = Line2D([], [], color="0.2", label="best so far (completed)")
    ax.legend(handles=status_handles(shown) + [best_handle], fontsize=8)
    mark_audited(ax, trials, numbers, values)
    if is_log_like(values):
        ax.set_yscale("log")
    ax.set(xlabel="trial number", ylabel=axis_label(objective), title=f"{metric} per trial")
    return fig


def objectives_figure(trials: Sequence[Trial], objectives: Sequence[Objective]) -> Figure:
    return pareto_figure(trials, objectives) if len(objectives) == 2 else progress_figure(trials, objectives[0])


def param_importances(study: optuna.Study | None, objectives: Sequence[Objective]) -> dict[str, dict[str, float] | str]:
    """Per objective label, Optuna's fANOVA importances ``{param: share}``, or why there are none.

    Optuna returns numbers even for one trial or a constant objective, so those cases are
    caught here: importances need at least two completed trials, a parameter that varies
    and an objective that varies.
    """
    if study is None:
        raise Skipped("no Optuna study given")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    labels = [objectives[i][0] if i < len(objectives) else f"objective {i}" for i in range(len(study.directions))]
    names = {name for trial in completed for name in trial.params}
    varies = any(len({repr(t.params.get(name)) for t in completed}) > 1 for name in names)
    out: dict[str, dict[str, float] | str] = {}
    for i, label in enumerate(labels):
        values = {t.values[i] for t in completed}
        if len(completed) < 2:
            out[label] = f"{len(completed)} completed trial(s) in the study; importances need 2 or more"
        elif not varies:
            out[label] = "no parameter varies across the completed trials"
        elif len(values) < 2:
            out[label] = f"{label} is the same ({next(iter(values)):.4g}) for every completed trial"
        else:
            try:
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=lambda trial, i=i: trial.values[i],
                )
                out[label] = {name: float(share) for name, share in importances.items()}
            except (ValueError, RuntimeError) as error:
                out[label] = f"Optuna could not compute importances: {error}"
    return out


def importances_figure(importances: dict[str, dict[str, float] | str]) -> Figure:
    """Horizontal importance bars, one panel per objective; a panel without importances says why."""
    if not any(isinstance(shares, dict) and shares for shares in importances.values()):
        raise Skipped("; ".join(f"{label}: {why}" for label, why in importances.items()) or "no objectives")
    rows = max((len(s) for s in importances.values() if isinstance(s, dict)), default=1)
    fig = Figure(figsize=(6 * len(importances), 1.5 + 0.35 * rows), layout="constrained")
    for ax, (label, shares) in zip(fig.subplots(1, len(importances), squeeze=False)[0], importances.items()):
        if isinstance(shares, str) or not shares:
            ax.text(0.5, 0.5, shares or "no parameters", ha="center", va="center", wrap=True, fontsize=9)
            ax.set_axis_off()
        else:
            names = sorted(shares, key=shares.get)  # largest on top
            ax.barh(names, [shares[name] for name in names], color="#4c72b0")
            ax.set(xlabel="importance (fANOVA)", xlim=(0, 1))
        ax.set_title(f"importance for {label}")
    return fig


def param_axis(values: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """x positions ``[N]`` for one parameter's cells, and category names when the parameter is not numeric.

    Categories sit at 0, 1, ... with a fixed small jitter so that equal points stay visible.
    """
    numbers = np.array([to_float(v) for v in values])
    if all(math.isfinite(n) for n, v in zip(numbers, values) if v.strip()):
        return numbers, None
    categories = sorted({v for v in values if v.strip()})
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(values))
    positions = [categories.index(v) + j if v.strip() else math.nan for v, j in zip(values, jitter)]
    return np.array(positions), categories


def params_figure(trials: Sequence[Trial], metric: str) -> Figure:
    """``metric``'s final value against each parameter, one panel per parameter, points in status colours."""
    names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    names = [n for n in names if any(t.params.get(n, "").strip() for t in trials)]
    y = objective_values(trials, metric)
    if not names or not np.isfinite(y).any():
        raise Skipped("no parameters in trials.csv" if not names else f"no trial has a finite final {metric}")
    columns = min(3, len(names))
    panel_rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * panel_rows), layout="constrained")
    axes = fig.subplots(panel_rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        x, categories = param_axis([t.params.get(name, "") for t in trials])
        shown = status_scatter(ax, trials, x, y)
        if ax is axes[0]:  # one status legend is enough
            ax.legend(handles=status_handles(shown), fontsize=8)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        elif is_log_like(x):
            ax.set_xscale("log")
        ax.set(title=name, ylabel=metric)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    return fig


def panel_png(trial: Trial | None, role: str) -> bytes:
    """The bytes of ``trial``'s ``recon_latest.png``; ``role`` names the trial in the reason for a skip."""
    if trial is None:
        raise Skipped(f"no {role}")
    if trial.run_dir is None:
        raise Skipped(f"{role} ({trial.label}) has no run_dir in {TRIALS_CSV}")
    panel = trial.run_dir / LATEST_PANEL
    if not panel.is_file():
        raise Skipped(f"{role} ({trial.label}) has no {panel}")
    return panel.read_bytes()


# --------------------------------------------------------------------------- the page


def cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def status_section(trials: Sequence[Trial], study: optuna.Study | None) -> str:
    counts = Counter(t.status for t in trials)
    ordered = [s for s in STATUS_COLOURS if s in counts] + sorted(set(counts) - set(STATUS_COLOURS))
    rows = [[status, counts[status]] for status in ordered] + [["total", len(trials)]]
    out = f"<h2>Trials by status</h2>{table(['status', 'trials'], rows)}"
    if study is not None:
        states = Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
        out += f"<h3>Optuna study {cell(study.study_name)}</h3>{table(['state', 'trials'], sorted(states.items()))}"
    return out


def trial_section(heading: str, trial: Trial | None, missing: str) -> str:
    """One trial's status, parameters, final and best metrics as a two-column table."""
    if trial is None:
        return f"<h2>{cell(heading)}</h2><p>{cell(missing)}</p>"
    rows: list[list[object]] = [["trial", trial.label], ["trial_id", trial.trial_id], ["status", trial.status],
                                ["epochs", trial.epochs if trial.epochs is not None else "n/a"],
                                ["stop_reason", trial.stop_reason]]
    rows += [[PARAM_PREFIX + name, value] for name, value in trial.params.items()]
    rows += [[FINAL_PREFIX + name, value] for name, value in trial.final.items()]
    rows += [[BEST_PREFIX + name, value] for name, value in trial.best.items()]
    return f"<h2>{cell(heading)}</h2>{table(['', 'value'], rows)}"


def front_section(front: Sequence[Trial], objectives: Sequence[Objective]) -> str:
    names = list(dict.fromkeys(name for trial in front for name in trial.params))
    header = ["trial", *(metric for metric, _ in objectives), *(PARAM_PREFIX + n for n in names)]
    rows = [[t.label, *(t.metric(m) for m, _ in objectives), *(t.params.get(n, "") for n in names)] for t in front]
    body = table(header, rows) if front else "<p>no completed trial with finite values of both objectives</p>"
    return f"<h2>Pareto front (completed trials)</h2>{body}"


def pictures_section(pictures: Sequence[tuple[str, str]]) -> str:
    return "".join(
        f'<figure><img src="{cell(name)}" alt="{cell(name)}"><figcaption>{cell(caption)}</figcaption></figure>'
        for name, caption in pictures
    )


def notes_section(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return "<h2>Left out</h2><ul>" + "".join(f"<li>{cell(note)}</li>" for note in notes) + "</ul>"


def page(title: str, sections: Sequence[str]) -> str:
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}"
        "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#444}"
    )
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{cell(title)}</title>"
            f"<style>{style}</style></head><body><h1>{cell(title)}</h1>{''.join(sections)}</body></html>\n")


# --------------------------------------------------------------------------- entry point


def check_objectives(objectives: Sequence[Objective]) -> None:
    if not 1 <= len(objectives) <= 2:
        raise ValueError(f"the sweep report draws one or two objectives, got {len(objectives)}: {objectives}")
    check_modes([mode for _, mode in objectives])


def write_report(out_dir: Path, study: optuna.Study | None, objectives: list[tuple[str, str]]) -> Path:
    """Write ``out_dir/report/`` (PNGs and ``index.html``) for the sweep in ``out_dir``; return the page's path.

    ``objectives`` are ``[(metric, "min" | "max"), ...]``, one or two, named as in ``trials.csv``
    (``au`` or ``final/au`` for the final value, ``best/au`` for the best). Every piece
    except ``trials.csv`` may be missing: what cannot be drawn is listed in the page, and a
    picture left from an earlier call that cannot be drawn now is removed.
    """
    out_dir = Path(out_dir)
    check_objectives(objectives)
    trials = load_trials(out_dir)
    report = out_dir / REPORT_DIR
    report.mkdir(exist_ok=True)
    first = objectives[0][0]
    best = best_trial(trials, objectives)
    audited = next((t for t in trials if t.audited), None)
    au_or_first = "au" if any("au" in t.final for t in trials) else first
    pieces: list[tuple[str, str, Callable[[], bytes]]] = [
        (CURVES_PNG, "Active units and KL_raw per epoch, one line per trial, coloured by final status; "
                     "collapse is AU = 0 with KL_raw near 1 nat.",
         lambda: figure_png(curves_figure(trials, load_curves(out_dir / EPOCHS_CSV, ("au", "kl_raw"))))),
        (PARETO_PNG, "Final objective values per trial" + (" and the Pareto front of the completed trials."
                                                            if len(objectives) == 2 else " and the best so far."),
         lambda: figure_png(objectives_figure(trials, objectives))),
        (IMPORTANCES_PNG, "Optuna fANOVA parameter importances per objective (completed trials).",
         lambda: figure_png(importances_figure(param_importances(study, objectives)))),
        (RECON_BEST_PNG, "Last reconstruction panel of the best trial"
                         + (f" ({best.label})" if best else "") + ": input, x_hat(mu), x_hat(z), x_hat(0).",
         lambda: panel_png(best, "best trial")),
        (RECON_AUDITED_PNG, "Last reconstruction panel of the audited configuration"
                            + (f" ({audited.label})" if audited else "") + "; x_hat(mu) = x_hat(0) is collapse.",
         lambda: panel_png(audited, "audited trial")),
        (PARAMS_PNG, f"Final {au_or_first} against each parameter, coloured by status.",
         lambda: figure_png(params_figure(trials, au_or_first))),
    ]
    pictures, notes = [], []
    for name, caption, make in pieces:
        try:
            atomic_write(report / name, make())
            pictures.append((name, caption))
        except Skipped as why:
            notes.append(f"{name}: {why}")
            (report / name).unlink(missing_ok=True)  # an older picture would contradict the page
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<p>{cell(str(out_dir))}, generated {generated}; objectives: "
        + ", ".join(cell(axis_label(o)) for o in objectives) + "</p>",
        status_section(trials, study),
        trial_section(BEST_HEADING, best, "no completed trial has finite objectives"),
        front_section(front_trials(trials, objectives), objectives) if len(objectives) == 2 else "",
        trial_section("Audited configuration", audited, "no trial is marked audited"),
        pictures_section(pictures),
        notes_section(notes),
    ]
    index = report / INDEX_HTML
    atomic_write(index, page(f"Sweep report: {out_dir.name}", sections).encode())
    return index
