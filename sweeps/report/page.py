"""``index.html`` of the sweep report, laid out in the order a person reads it.

1. Summary, one screen: trials by status and the Optuna study's states (with a note when the
   study holds interrupted trials continued under the same names), the best trial beside the
   audited configuration, the Pareto front, and the AU/KL_raw curves.
2. Trials: one compact row per trial, the best, audited and front rows marked.
3. Figures, each with a caption.
4. Left out: the pictures that could not be drawn, and why.

Numbers show 3 significant digits. An estimate outside the range its quantity can take
(``VALID_RANGES``: MI or KL_raw below 0, AU above the latent size) shows the nearest valid
value with the raw estimate beside it, so estimator noise is neither hidden nor read as a
result. The page is self-contained: no scripts, no external links.
"""
from __future__ import annotations

import html
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence

import optuna
from optuna.trial import TrialState

from ..outputs import FINAL_METRICS, param_labels
from ..space import RUN_NAME
from .figures import CURVES_PNG, RECON_AUDITED_PNG, RECON_BEST_PNG, ordered_statuses, status_colour
from .tables import FINAL_PREFIX, Objective, Trial, to_float

# The sweep's best trial: best on the first objective, ties broken by the next (best.yaml's).
BEST_HEADING = "Best trial (best.yaml)"
AUDITED_HEADING = "Audited configuration"
MISSING = "—"
MINUS = "\u2212"
SIGNIFICANT_DIGITS = 3

METRIC_LABELS = {
    "au": "AU", "kl_raw": "KL_raw", "recon_mu": "recon(μ)", "recon_zero": "recon(0)", "mi": "MI",
    "z_sensitivity": "z-sensitivity", "semantic_r2": "semantic R²", "channel_nats": "channel (nats)",
    "prior_kl_dim_max": "max KL to prior/dim",
}
# Words of a parameter label written as the symbol the docs use (lambda_od -> λ_od).
SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "lambda": "λ", "mu": "μ", "sigma": "σ",
           "sigma2": "σ²"}
# What each estimate can be: MI (nats) and KL are never negative and at most z_dim units can be
# active. An estimate outside comes from estimator noise (MI from a few validation volumes).
# "z_dim" stands for the trial's latent size; None for no bound.
VALID_RANGES: dict[str, tuple[float | None, float | str | None]] = {
    "au": (0.0, "z_dim"), "kl_raw": (0.0, None), "mi": (0.0, None),
}
# The metrics the summary compares for the best and the audited trial, after the objectives.
SUMMARY_METRICS = ("semantic_r2", "au", "kl_raw", "recon_mu", "prior_kl_dim_max")

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1400px;color:#222}"
    "h1{margin:0 0 .2em}h2{margin:1.6em 0 .4em;border-bottom:1px solid #ccc}h3{margin:1em 0 .3em}"
    "nav a{margin-right:1em}.meta,.legend,figcaption{color:#555;font-size:.92em}"
    "table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #ccc;padding:2px 7px;text-align:left}"
    "th{background:#f3f3f3;font-weight:600}.status{white-space:nowrap}"
    # The summary: blocks side by side, wrapping on a narrow window; compact tables to fit one screen.
    ".cols{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}"
    ".block{max-width:30em}.block h3{overflow-wrap:anywhere}.block table{font-size:.88em}"
    ".block td,.block th{padding:1px 6px}.block td{max-width:18em}.curves img{max-width:min(100%,900px)}"
    ".note{font-size:.92em;background:#fff8e1;border-left:4px solid #f0b429;padding:.4em .8em}"
    # The trials table: one line per trial, scrolling sideways when the parameters do not fit.
    ".scroll{overflow-x:auto}.trials{font-size:.88em;white-space:nowrap}"
    ".trials td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".trials td.reason{white-space:normal;min-width:18em;color:#555}"
    "tr.best td{background:#e6f4ea}tr.audited td{background:#fdecea}"
    ".tag{font-size:.8em;border:1px solid #888;border-radius:3px;padding:0 3px;margin-right:2px}"
    ".dot{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.35em}"
    ".flag{color:#b45309;font-size:.85em}img{max-width:100%}figure{margin:1em 0}"
)


@dataclass(frozen=True)
class Interruptions:
    """The study's interrupted trials: how many, and the names continued or still waiting to continue."""

    count: int
    continued: list[str]
    waiting: list[str]


@dataclass(frozen=True)
class PageContent:
    """Everything the page shows. ``pictures`` maps each drawn picture's file name to its caption,
    in page order; ``notes`` maps each picture left out to why."""

    title: str
    source: str
    generated: str
    objectives: Sequence[Objective]
    trials: Sequence[Trial]
    best: Trial | None
    audited: Trial | None
    front: Sequence[Trial] | None  # None with one objective: there is no front to show
    study: optuna.Study | None
    pictures: Mapping[str, str]
    notes: Mapping[str, str]

    @cached_property
    def interrupted(self) -> Interruptions:
        """The study's interrupted trials (none without a study)."""
        return interruptions(self.study) if self.study is not None else Interruptions(0, [], [])


# --------------------------------------------------------------------------- numbers and labels


def significant(value: float) -> str:
    """``value`` to 3 significant digits: positional from 1e-4 to 1e6, else as ``1.23e−7``; ``—`` for NaN."""
    if math.isnan(value):
        return MISSING
    if value == 0:
        return "0"
    if math.isinf(value):
        return "∞" if value > 0 else f"{MINUS}∞"
    rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")  # rounds first: 999.7 is 1000, not 999.7
    exponent = math.floor(math.log10(abs(rounded)))
    if -4 <= exponent < 6:
        text = f"{rounded:.{max(0, SIGNIFICANT_DIGITS - 1 - exponent)}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
    else:
        mantissa, power = f"{rounded:.{SIGNIFICANT_DIGITS - 1}e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(power)}"
    return text.replace("-", MINUS)


def param_text(cell: str) -> str:
    """A parameter cell: a number to 3 significant digits, a choice as it is, ``—`` when not set."""
    value = to_float(cell)
    if math.isfinite(value):
        return significant(value)
    return cell.strip() or MISSING


def metric_name(metric: str) -> str:
    """``final/mi`` and ``mi`` both as ``mi``; ``best/au`` keeps its prefix."""
    return metric.removeprefix(FINAL_PREFIX)


def metric_label(metric: str) -> str:
    """``recon_mu`` as ``recon(μ)``, ``best/au`` as ``AU (best)``; unknown names as they are."""
    prefix, _, name = metric_name(metric).rpartition("/")
    label = METRIC_LABELS.get(name, name)
    return f"{label} ({prefix})" if prefix else label


def objective_label(objective: Objective) -> str:
    metric, mode = objective
    return f"{metric_label(metric)} {'↑' if mode == 'max' else '↓'}"


def pretty_param_labels(names: Sequence[str]) -> dict[str, str]:
    """The terminal table's short labels (:func:`sweeps.outputs.param_labels`) with Greek words as symbols."""
    return {name: "".join(SYMBOLS.get(part, part) for part in re.split(r"([._])", label))
            for name, label in param_labels(names).items()}


def param_names(trials: Sequence[Trial]) -> list[str]:
    """Every parameter of ``trials``, in the order trials.csv has them."""
    return list(dict.fromkeys(name for trial in trials for name in trial.params))


def valid_range(metric: str, z_dim: int | None) -> tuple[float, float]:
    """The values ``metric`` can take for a trial with latent size ``z_dim``; unbounded when not known."""
    low, high = VALID_RANGES.get(metric_name(metric).rpartition("/")[2], (None, None))
    if high == "z_dim":
        high = z_dim
    return (-math.inf if low is None else float(low)), (math.inf if high is None else float(high))


def metric_html(trial: Trial, metric: str) -> str:
    """``trial``'s value of ``metric``; outside its valid range, clipped and flagged with the raw estimate."""
    value = trial.metric(metric)
    if math.isnan(value):
        return MISSING
    low, high = valid_range(metric, trial.z_dim)
    shown = min(max(value, low), high)
    if shown == value:
        return significant(value)
    return f'{significant(shown)} <span class="flag">(estimate {significant(value)} clipped)</span>'


# --------------------------------------------------------------------------- HTML pieces


def esc(value: object) -> str:
    return html.escape(str(value))


def td(content: str, css: str = "") -> str:
    return f'<td class="{css}">{content}</td>' if css else f"<td>{content}</td>"


def th(content: str, title: str = "") -> str:
    return f'<th title="{esc(title)}">{content}</th>' if title else f"<th>{content}</th>"


def tr(cells: Sequence[str], css: str = "") -> str:
    return (f'<tr class="{css}">' if css else "<tr>") + "".join(cells) + "</tr>"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table of plain values, each escaped."""
    return ("<table>" + tr([th(esc(h)) for h in header])
            + "".join(tr([td(esc(v)) for v in row]) for row in rows) + "</table>")


def status_html(status: str) -> str:
    dot = f'<span class="dot" style="background:{status_colour(status)}"></span>'
    return f'<span class="status">{dot}{esc(status)}</span>'


def figure_html(name: str, caption: str, css: str = "") -> str:
    opening = f'<figure class="{css}">' if css else "<figure>"
    return f'{opening}<img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------- the study


def interruptions(study: optuna.Study) -> Interruptions:
    """The trials the study closed as interrupted, and what became of their names: continued by a
    later Optuna trial under the same name, or enqueued again and waiting for the sweep to resume."""
    trials = study.get_trials(deepcopy=False)
    interrupted = [t for t in trials if t.user_attrs.get("status") == "interrupted"]
    latest = {t.user_attrs.get(RUN_NAME): t for t in trials}  # trials come in number order
    names = [name for name in dict.fromkeys(t.user_attrs.get(RUN_NAME) for t in interrupted) if name]
    waiting = [name for name in names if latest[name].state == TrialState.WAITING]
    continued = [name for name in names
                 if name not in waiting and latest[name].user_attrs.get("status") != "interrupted"]
    return Interruptions(len(interrupted), continued, waiting)


def interruptions_note(found: Interruptions) -> str:
    """Why the study counts more trials (and FAIL states) than the sweep has trials, when it does."""
    if not found.count:
        return ""
    one = found.count == 1
    lines = [f"FAIL includes {plural(found.count, 'interrupted Optuna trial')}: the sweep stopped while "
             f"{'it' if one else 'they'} ran, so {'it was' if one else 'each was'} closed as FAIL and enqueued "
             "again to continue from its checkpoint under the same name."]
    if found.continued:
        lines.append(f"Continued by later Optuna trials: {', '.join(found.continued)}. The trials table "
                     "(like trials.csv) shows only the latest Optuna trial of each name, so the study holds "
                     "more trials than the table.")
    if found.waiting:
        lines.append(f"Waiting to continue when the sweep is resumed (--resume): {', '.join(found.waiting)}.")
    return '<p class="note">' + " ".join(esc(line) for line in lines) + "</p>"


# --------------------------------------------------------------------------- summary


def status_counts(trials: Sequence[Trial]) -> str:
    counts = Counter(t.status for t in trials)
    rows = [[status, counts[status]] for status in ordered_statuses(set(counts))] + [["total", len(trials)]]
    out = f"<h3>Trials by status</h3>{text_table(['status', 'trials'], rows)}"
    if counts["interrupted"]:
        out += ('<p class="note">interrupted: the sweep stopped while these trials ran; resuming it '
                "(--resume) continues them from their checkpoints under the same names.</p>")
    return out


def study_states(study: optuna.Study, interrupted: Interruptions) -> str:
    states = Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
    return (f"<h3>Optuna study {esc(study.study_name)}</h3>{text_table(['state', 'trials'], sorted(states.items()))}"
            + interruptions_note(interrupted))


def summary_metrics(objectives: Sequence[Objective]) -> list[str]:
    """The objectives, then AU, KL_raw and recon(μ) unless an objective already is one of them."""
    metrics = [metric_name(metric) for metric, _ in objectives]
    return metrics + [m for m in SUMMARY_METRICS if m not in metrics]


def side_by_side(content: PageContent) -> str:
    """The best trial beside the audited configuration: status, objectives, the main metrics, parameters."""
    heading = f"<h3>{esc(BEST_HEADING)} and the audited configuration</h3>"
    pair = [content.best, content.audited]
    if not any(pair):
        return heading + "<p>no completed trial has finite objectives yet, and no trial is marked audited</p>"
    modes = {metric_name(metric): mode for metric, mode in content.objectives}
    labels = pretty_param_labels(param_names(content.trials))

    def row(label: str, value, title: str = "") -> str:
        return tr([th(esc(label), title)] + [td(value(t) if t else MISSING) for t in pair])

    rows = [
        row("trial id", lambda t: esc(t.trial_id)),
        row("Optuna", lambda t: esc(t.label)),
        row("status", lambda t: status_html(t.status)),
        row("stop reason", lambda t: esc(t.stop_reason or MISSING)),
        row("epochs", lambda t: esc(MISSING if t.epochs is None else t.epochs)),
    ]
    for metric in summary_metrics(content.objectives):
        label = objective_label((metric, modes[metric])) if metric in modes else metric_label(metric)
        rows.append(row(label, lambda t, m=metric: metric_html(t, m), "objective" if metric in modes else ""))
    for name in param_names([t for t in pair if t]):
        rows.append(row(labels[name], lambda t, n=name: esc(param_text(t.params.get(n, ""))), name))
    header = tr([th("")] + [th(esc("Best trial" if content.best else no_best(content.trials))),
                            th(esc(AUDITED_HEADING if content.audited else "no audited trial"))])
    return heading + "<table>" + header + "".join(rows) + "</table>"


def no_best(trials: Sequence[Trial]) -> str:
    completed = [t for t in trials if t.status == "completed"]
    if completed and not any(t.feasible for t in completed):
        return "no best trial: no completed trial meets the constraints"
    return "no best trial yet"


def trial_name(trial: Trial) -> str:
    """``trial 5 (trial-0003)``: the label the pictures use, and the run name when it differs."""
    return trial.label if trial.label == trial.trial_id else f"{trial.label} ({trial.trial_id})"


def front_summary(front: Sequence[Trial]) -> str:
    body = (f"<p>{esc(', '.join(trial_name(t) for t in front))}: marked “front” in the trials table.</p>"
            if front else "<p>no completed trial with finite values of both objectives</p>")
    return f"<h3>Pareto front (completed trials)</h3>{body}"


def summary_section(content: PageContent) -> str:
    """Counts, the best trial beside the audited one and the Pareto front in one row, the curves below:
    one screen on a laptop."""
    blocks = [status_counts(content.trials)]
    if content.study is not None:
        blocks.append(study_states(content.study, content.interrupted))
    blocks.append(side_by_side(content) + (front_summary(content.front) if content.front is not None else ""))
    if CURVES_PNG in content.pictures:
        curves = figure_html(CURVES_PNG, content.pictures[CURVES_PNG], css="curves")
    else:
        curves = f"<p>{esc(CURVES_PNG)} could not be drawn: {esc(content.notes.get(CURVES_PNG, MISSING))}</p>"
    columns = "".join(f'<div class="block">{block}</div>' for block in blocks)
    return f'<section id="summary"><h2>Summary</h2><div class="cols">{columns}</div>{curves}</section>'


# --------------------------------------------------------------------------- the trials table


def trials_legend(content: PageContent) -> str:
    marks = ["best = the trial best.yaml names", "audited = the audited configuration"]
    if content.front is not None:
        marks.append("front = on the Pareto front of the completed trials")
    if any(t.breaks_constraints for t in content.trials):
        marks.append("infeasible = breaks the sweep's constraints (summary.json lists them): never best")
    if content.interrupted.continued:
        marks.append("↻ = continued after an interruption")
    return (f'<p class="legend">One row per trial, as in trials.csv; final values to 3 significant digits; '
            f"↑/↓ an objective, higher/lower is better. Marks: {esc('; '.join(marks))}.</p>")


def table_metrics(content: PageContent) -> list[str]:
    """The objectives, then the final metrics the sweep records that any trial has a value of."""
    metrics = [metric_name(metric) for metric, _ in content.objectives]
    recorded = [m for m in FINAL_METRICS if any(not math.isnan(t.metric(m)) for t in content.trials)]
    return metrics + [m for m in recorded if m not in metrics]


def trial_marks(trial: Trial, content: PageContent) -> tuple[list[str], str]:
    """The tags of ``trial``'s row and the row's class (best wins over audited for the colour)."""
    tags = []
    if trial is content.best:
        tags.append("best")
    if trial.audited:
        tags.append("audited")
    if content.front is not None and any(trial is t for t in content.front):
        tags.append("front")
    if trial.breaks_constraints:
        tags.append("infeasible")
    css = "best" if "best" in tags else "audited" if "audited" in tags else ""
    return tags, css


def param_cell(cell: str) -> str:
    """A parameter's table cell: numbers right-aligned like the metrics, choices left-aligned as words."""
    return td(esc(param_text(cell)), "n" if math.isfinite(to_float(cell)) else "")


def trials_section(content: PageContent) -> str:
    if not content.trials:
        return '<section id="trials"><h2>Trials</h2><p>no trial in trials.csv yet</p></section>'
    modes = {metric_name(metric): mode for metric, mode in content.objectives}
    metrics = table_metrics(content)
    names = param_names(content.trials)
    labels = pretty_param_labels(names)
    continued = set(content.interrupted.continued)
    header = tr(
        [th(""), th("trial"), th("Optuna #"), th("status"), th("epochs")]
        + [th(esc(objective_label((m, modes[m]))), "objective") if m in modes else th(esc(metric_label(m)))
           for m in metrics]
        + [th(esc(labels[name]), name) for name in names] + [th("stop reason")]
    )
    rows = []
    for trial in content.trials:
        tags, css = trial_marks(trial, content)
        trial_id = esc(trial.trial_id) + (' <span title="continued after an interruption">↻</span>'
                                          if trial.trial_id in continued else "")
        cells = [td("".join(f'<span class="tag">{tag}</span>' for tag in tags)), td(trial_id),
                 td(esc(MISSING if trial.number is None else trial.number), "n"), td(status_html(trial.status)),
                 td(esc(MISSING if trial.epochs is None else trial.epochs), "n")]
        cells += [td(metric_html(trial, m), "n") for m in metrics]
        cells += [param_cell(trial.params.get(name, "")) for name in names]
        cells.append(td(esc(trial.stop_reason), "reason"))
        rows.append(tr(cells, css))
    table = f'<div class="scroll"><table class="trials">{header}{"".join(rows)}</table></div>'
    return f'<section id="trials"><h2>Trials</h2>{trials_legend(content)}{table}</section>'


# --------------------------------------------------------------------------- figures and notes


def figures_section(pictures: Mapping[str, str]) -> str:
    """Every picture but the curves (in the summary); the two reconstruction panels side by side."""
    panels = [RECON_BEST_PNG, RECON_AUDITED_PNG]
    wide = [figure_html(name, caption) for name, caption in pictures.items() if name not in (CURVES_PNG, *panels)]
    pair = [f"<div>{figure_html(name, pictures[name])}</div>" for name in panels if name in pictures]
    body = "".join(wide) + (f'<div class="cols">{"".join(pair)}</div>' if pair else "")
    return f'<section id="figures"><h2>Figures</h2>{body or "<p>no figure could be drawn</p>"}</section>'


def notes_section(notes: Mapping[str, str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(f'{name}: {why}')}</li>" for name, why in notes.items())
    return f'<section id="left-out"><h2>Left out</h2><ul>{items}</ul></section>'


def navigation() -> str:
    links = [("summary", "Summary"), ("trials", "Trials"), ("figures", "Figures")]
    return "<nav>" + "".join(f'<a href="#{anchor}">{text}</a>' for anchor, text in links) + "</nav>"


def render_page(content: PageContent) -> str:
    """The whole of index.html."""
    objectives = ", ".join(f"{metric_label(metric)} ({'higher' if mode == 'max' else 'lower'} is better)"
                           for metric, mode in content.objectives)
    meta = f'<p class="meta">{esc(content.source)}, generated {esc(content.generated)}; objectives: {esc(objectives)}</p>'
    body = "".join([
        f"<h1>{esc(content.title)}</h1>", meta, navigation(), summary_section(content),
        trials_section(content), figures_section(content.pictures), notes_section(content.notes),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(content.title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
