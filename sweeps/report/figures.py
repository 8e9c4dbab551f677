"""Every picture of the sweep report, drawn with matplotlib figures (no pyplot, so no global figure state).

Each function takes :class:`~sweeps.report.tables.Trial` records (and curves or the study)
and returns a :class:`~matplotlib.figure.Figure`, or raises :class:`Skipped` saying why the
picture cannot be drawn from what the sweep has written. Every picture colours a trial by
its final status, the same colour everywhere (``STATUS_COLOURS``).

Pictures (all in ``<out_dir>/report/``):

- ``curves.png``       AU and KL_raw per epoch, one line per trial, coloured by final status
- ``pareto.png``       two objectives: every trial's final values and the Pareto front;
                       one objective: its value per trial number and the best so far
- ``rate_distortion.png`` every trial's rate (KL_raw) against its distortion (recon(mu)), and
                       what its code carries of the tumour (semantic_r2) against the rate
- ``importances.png``  Optuna's fANOVA parameter importances per objective
- ``recon_best.png``   the best trial's last reconstruction panel (copied)
- ``recon_audited.png`` the audited configuration's last reconstruction panel (copied)
- ``params.png``       final AU (or the first objective) against each parameter
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vae.panels import LATEST_PANEL

from ..outputs import EPOCHS_CSV, TRIALS_CSV
from .tables import Curves, Objective, Skipped, Trial, front_trials, objective_values, to_float

CURVES_PNG = "curves.png"
PARETO_PNG = "pareto.png"
RATE_DISTORTION_PNG = "rate_distortion.png"
IMPORTANCES_PNG = "importances.png"
RECON_BEST_PNG = "recon_best.png"
RECON_AUDITED_PNG = "recon_audited.png"
PARAMS_PNG = "params.png"

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


def status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status, OTHER_STATUS_COLOUR)


def ordered_statuses(statuses: set[str]) -> list[str]:
    """``statuses`` in the canonical order of ``STATUS_COLOURS``, unknown ones last (alphabetically)."""
    return [s for s in STATUS_COLOURS if s in statuses] + sorted(statuses - set(STATUS_COLOURS))


def status_handles(statuses: set[str]) -> list[Line2D]:
    """Legend entries for ``statuses``, in the canonical order, unknown ones last."""
    return [Line2D([], [], color=status_colour(s), marker="o", label=s) for s in ordered_statuses(statuses)]


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


def rate_distortion_figure(trials: Sequence[Trial]) -> Figure:
    """Left: rate (KL_raw, nats) against distortion (recon(mu)) per trial. Right: the through-channel
    semantic probe R^2 against the same rate, when the trials report it. Infeasible trials (outside
    the sweep's constraints) are drawn hollow."""
    rate, distortion = objective_values(trials, "kl_raw"), objective_values(trials, "recon_mu")
    if not (np.isfinite(rate) & np.isfinite(distortion)).any():
        raise Skipped("no trial has finite final values of both kl_raw and recon_mu")
    semantic = objective_values(trials, "semantic_r2")
    panels = 2 if np.isfinite(semantic).any() else 1
    fig = Figure(figsize=(6.2 * panels, 5), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    shown: set[str] = set()
    labels = ("recon(μ) (distortion, lower is better)", "semantic R² through the channel (higher is better)")
    for ax, y, label in zip(axes, (distortion, semantic), labels):
        shown |= status_scatter(ax, trials, rate, y)
        hollow = [i for i, t in enumerate(trials) if t.breaks_constraints and np.isfinite(rate[i] + y[i])]
        ax.scatter(rate[hollow], y[hollow], s=28, c="white", zorder=3,
                   edgecolors=[status_colour(trials[i].status) for i in hollow])
        mark_audited(ax, trials, rate, y)
        scale, scale_args = kl_scale(rate)
        ax.set_xscale(scale, **scale_args)
        ax.set(xlabel="KL_raw (rate, nats)", ylabel=label)
    axes[0].set_title("rate–distortion: collapse sits at rate 0, an autoencoder far right")
    if panels == 2:
        axes[1].set_title("what the code carries needs rate, but rate alone is not enough")
    handles = status_handles(shown)
    if any(t.breaks_constraints for t in trials):
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec="0.3", label="breaks a constraint"))
    axes[0].legend(handles=handles, fontsize=8)
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


