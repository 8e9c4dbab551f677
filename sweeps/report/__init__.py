"""Pictures and one HTML page for a finished or partial sweep: ``<out_dir>/report/index.html``.

Reads ``trials.csv`` (one row per trial), ``epochs.csv`` (one row per trial-epoch), each
trial's ``recon_latest.png`` and, when given, the Optuna study. Only ``trials.csv`` is
required: a picture whose inputs are missing or unusable is left out and the page says why,
so the report of a sweep killed half-way shows whatever there is.

- :mod:`.tables`   reads trials.csv and epochs.csv into :class:`Trial` records and curves, and
                   names the best trial and the Pareto front (through :mod:`sweeps.selection`)
- :mod:`.figures`  draws every picture (the list is in its docstring)
- :mod:`.page`     assembles index.html
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import optuna

from vae.panels import figure_png
from vae.run_files import atomic_write

from ..outputs import EPOCHS_CSV
from ..selection import check_modes, pareto_front
from .figures import (
    CURVES_PNG,
    IMPORTANCES_PNG,
    PARAMS_PNG,
    PARETO_PNG,
    RATE_DISTORTION_PNG,
    RECON_AUDITED_PNG,
    RECON_BEST_PNG,
    curves_figure,
    importances_figure,
    kl_scale,
    objectives_figure,
    panel_png,
    param_importances,
    params_figure,
    pareto_figure,
    progress_figure,
    rate_distortion_figure,
)
from .page import BEST_HEADING, PageContent, render_page
from .tables import Objective, Skipped, Trial, best_trial, front_trials, load_curves, load_trials

__all__ = [
    "BEST_HEADING", "CURVES_PNG", "IMPORTANCES_PNG", "INDEX_HTML", "PARAMS_PNG", "PARETO_PNG", "RATE_DISTORTION_PNG",
    "RECON_AUDITED_PNG", "RECON_BEST_PNG", "REPORT_DIR", "Skipped", "Trial", "best_trial", "curves_figure",
    "front_trials", "kl_scale", "load_curves", "load_trials", "param_importances", "pareto_figure", "pareto_front",
    "progress_figure", "rate_distortion_figure", "write_report",
]

REPORT_DIR = "report"
INDEX_HTML = "index.html"

Picture = tuple[str, str, Callable[[], bytes]]  # (file name, caption, draw it as PNG bytes)


def check_objectives(objectives: Sequence[Objective]) -> None:
    if not 1 <= len(objectives) <= 2:
        raise ValueError(f"the sweep report draws one or two objectives, got {len(objectives)}: {objectives}")
    check_modes([mode for _, mode in objectives])


def pictures_to_draw(out_dir: Path, trials: Sequence[Trial], study: optuna.Study | None,
                     objectives: Sequence[Objective], best: Trial | None, audited: Trial | None) -> list[Picture]:
    """Every picture of the report with its caption, in page order; drawing one may raise :class:`Skipped`."""
    first = objectives[0][0]
    au_or_first = "au" if any("au" in t.final for t in trials) else first
    return [
        (CURVES_PNG, "Active units and KL_raw per epoch, one line per trial, coloured by final status; "
                     "collapse is a KL_raw near 0 (the audited run sat at 1.2 nats with AU 0).",
         lambda: figure_png(curves_figure(trials, load_curves(out_dir / EPOCHS_CSV, ("au", "kl_raw"))))),
        (PARETO_PNG, "Final objective values per trial" + (" and the Pareto front of the completed trials."
                                                            if len(objectives) == 2 else " and the best so far."),
         lambda: figure_png(objectives_figure(trials, objectives))),
        (RATE_DISTORTION_PNG, "Rate (KL_raw) against distortion (recon(μ)) per trial, and the semantic probe "
                              "(tumour location and size, R² on samples of q(z|x)) against the rate; hollow: breaks "
                              "the sweep's constraints.",
         lambda: figure_png(rate_distortion_figure(trials))),
        (IMPORTANCES_PNG, "Optuna fANOVA parameter importances per objective (completed trials).",
         lambda: figure_png(importances_figure(param_importances(study, objectives)))),
        (PARAMS_PNG, f"Final {au_or_first} against each parameter, coloured by status.",
         lambda: figure_png(params_figure(trials, au_or_first))),
        (RECON_BEST_PNG, "Last reconstruction panel of the best trial"
                         + (f" ({best.label})" if best else "") + ": input, x̂(μ), x̂(z), x̂(0).",
         lambda: panel_png(best, "best trial")),
        (RECON_AUDITED_PNG, "Last reconstruction panel of the audited configuration"
                            + (f" ({audited.label})" if audited else "") + "; x̂(μ) = x̂(0) is collapse.",
         lambda: panel_png(audited, "audited trial")),
    ]


def draw_pictures(report: Path, pictures: Sequence[Picture]) -> tuple[dict[str, str], dict[str, str]]:
    """Write each picture into ``report``; return the captions of those drawn and why the others are not."""
    drawn, left_out = {}, {}
    for name, caption, draw in pictures:
        try:
            atomic_write(report / name, draw())
            drawn[name] = caption
        except Skipped as why:
            left_out[name] = str(why)
            (report / name).unlink(missing_ok=True)  # an older picture would contradict the page
    return drawn, left_out


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
    best = best_trial(trials, objectives)
    audited = next((t for t in trials if t.audited), None)
    drawn, left_out = draw_pictures(report, pictures_to_draw(out_dir, trials, study, objectives, best, audited))
    content = PageContent(
        title=f"Sweep report: {out_dir.name}", source=str(out_dir),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), objectives=objectives,
        trials=trials, best=best, audited=audited,
        front=front_trials(trials, objectives) if len(objectives) == 2 else None,
        study=study, pictures=drawn, notes=left_out,
    )
    index = report / INDEX_HTML
    atomic_write(index, render_page(content).encode())
    return index
