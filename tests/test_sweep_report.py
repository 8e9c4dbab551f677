"""The sweep report: Pareto front selection, the pictures, and index.html on full and partial sweeps.

A synthetic sweep directory: a healthy completed trial, a collapsed audited one (AU 0, KL
near 1 nat), a diverged one with two epochs (its last KL is the non-finite sentinel), a
failed one without epochs or number, two more completed ones, an ASHA-stopped one and a
trial that is running (in epochs.csv only); a real Optuna study in SQLite with PRUNED and
FAIL trials beside the completed ones.

The page is also opened in headless Chromium (through selenium and chromedriver): it must load
without console errors and with every picture drawn; that test is skipped only where no
Chromium is installed.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pytest
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeps.report import (
    BEST_HEADING,
    Skipped,
    curves_figure,
    kl_scale,
    load_curves,
    load_trials,
    rate_distortion_figure,
    param_importances,
    pareto_figure,
    pareto_front,
    progress_figure,
    write_report,
)
from sweeps.report.page import significant
from vae.run_files import NONFINITE_SENTINEL

optuna.logging.set_verbosity(optuna.logging.WARNING)

PICTURES = ["curves.png", "pareto.png", "rate_distortion.png", "importances.png", "recon_best.png",
            "recon_audited.png", "params.png"]
TWO_OBJECTIVES = [("au", "max"), ("recon_mu", "min")]
DISTRIBUTIONS = {
    "objective.kl.beta": FloatDistribution(1e-4, 10.0, log=True),
    "objective.likelihood": CategoricalDistribution(["gaussian_sum", "mse_mean"]),
}
# trial_id: (number, status, audited, beta, likelihood, final au, final kl_raw, final recon_mu, run_dir kind)
TRIALS = {
    "t0": ("0", "completed", "", 0.01, "gaussian_sum", "12", "40", "0.02", "relative"),
    "t1": ("1", "collapsed", "true", 4.0, "mse_mean", "0", "1.1", "0.09", "absolute"),
    "t2": ("2", "diverged", "", 0.001, "gaussian_sum", "", str(NONFINITE_SENTINEL), "", "relative"),
    "t3": ("", "failed", "", 0.5, "gaussian_sum", "", "", "", "none"),
    "t4": ("4", "completed", "false", 0.1, "gaussian_sum", "8", "25", "0.015", "relative"),
    "t5": ("5", "completed", "", 1.0, "mse_mean", "5", "10", "0.03", "relative"),
    "t6": ("6", "asha_stopped", "", 0.05, "gaussian_sum", "14", "30", "0.01", "relative"),
}
SEMANTIC = {"t0": 0.62, "t1": -0.05, "t4": 0.4, "t5": 0.7, "t6": 0.5}  # final semantic_r2
INFEASIBLE = {"t5"}  # breaks the sweep's constraints
# trial_id: (au per epoch, kl_raw per epoch)
EPOCHS = {
    "t0": ([2, 5, 8, 10, 12], [5, 15, 25, 35, 40]),
    "t1": ([0, 0, 0, 0, 0], [3.0, 1.5, 1.2, 1.1, 1.1]),
    "t2": ([1, 0], [2.0, NONFINITE_SENTINEL]),
    "t4": ([1, 3, 6, 8], [4, 10, 20, 25]),
    "t5": ([1, 2, 4, 5], [2, 5, 8, 10]),
    "t6": ([3, 9], [12, 30]),
    "t7": ([1], [6]),  # running: not in trials.csv yet
}


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_panel(path: Path, shade: float) -> None:
    """A small stand-in for a reconstruction panel, distinct per trial through ``shade``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(2, 4))
    for row, ax in enumerate(fig.subplots(4, 1)):
        ax.imshow(np.full((8, 8), shade * (row + 1)), cmap="gray", vmin=0, vmax=4)
    fig.savefig(path, format="png", dpi=50)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    out.mkdir()
    rows = []
    for trial_id, (number, status, audited, beta, likelihood, au, kl, recon, kind) in TRIALS.items():
        absolute = str(tmp_path / "elsewhere" / trial_id)
        run_dir = {"relative": f"trials/{trial_id}", "absolute": absolute, "none": ""}[kind]
        rows.append({
            "trial_id": trial_id, "number": number, "status": status, "epochs": len(EPOCHS.get(trial_id, ([],))[0]),
            "stop_reason": "au_zero" if status == "collapsed" else "", "run_dir": run_dir,
            "param/objective.kl.beta": beta, "param/objective.likelihood": likelihood,
            "final/au": au, "final/kl_raw": kl, "final/recon_mu": recon, "best/au": au, "audited": audited,
            "final/semantic_r2": SEMANTIC.get(trial_id, ""), "feasible": "false" if trial_id in INFEASIBLE else "",
        })
    write_csv(out / "trials.csv", rows)
    write_csv(out / "epochs.csv", [
        {"trial_id": trial_id, "epoch": epoch + 1, "au": au, "kl_raw": kl, "recon_mu": 0.1, "status": "running",
         "kl_weight": 1.0}
        for trial_id, (aus, kls) in EPOCHS.items() for epoch, (au, kl) in enumerate(zip(aus, kls))
    ])
    write_panel(out / "trials" / "t0" / "recon_latest.png", 1.0)
    write_panel(tmp_path / "elsewhere" / "t1" / "recon_latest.png", 0.2)
    return out


def make_study(tmp_path: Path, directions: list[str], trials: dict[str, tuple] = TRIALS) -> optuna.Study:
    """A SQLite study holding the completed and collapsed trials as COMPLETE, plus one PRUNED and one FAIL."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/study.db", directions=directions)
    for number, status, _, beta, likelihood, au, _, recon, _ in trials.values():
        params = {"objective.kl.beta": beta, "objective.likelihood": likelihood}
        if status in ("completed", "collapsed"):
            values = [float(au), float(recon)][: len(directions)]
            study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, values=values))
        elif status == "asha_stopped":
            study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=TrialState.PRUNED))
        elif status == "failed":
            study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=TrialState.FAIL))
    return study


@pytest.fixture(scope="module")
def two_objective_study(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    return make_study(tmp_path_factory.mktemp("study"), ["maximize", "minimize"])


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= 50, (path, image.shape)


def section(page: str, heading: str) -> str:
    """The HTML from ``heading`` up to the next heading."""
    start = page.index(heading)
    following = re.search(r"<h[23]>", page[start + len(heading):])
    return page[start: start + len(heading) + following.start() if following else None]


# --------------------------------------------------------------------------- Pareto front


@pytest.mark.parametrize(
    "points, modes, expected",
    [
        # (3, 4) is beaten by (2, 3); (5, 5) by everything below it
        ([[1, 5], [2, 3], [3, 4], [4, 1], [5, 5]], ("min", "min"), [0, 1, 3]),
        # same points, x maximised: (5, 5) has the largest x, (4, 1) the smallest y
        ([[1, 5], [2, 3], [3, 4], [4, 1], [5, 5]], ("max", "min"), [3, 4]),
        ([[1, 1], [2, 2]], ("max", "max"), [1]),
        # equal points do not dominate each other: both stay
        ([[1, 1], [1, 1], [2, 0], [2, 2]], ("min", "min"), [0, 1, 2]),
        # a tie in one objective and better in the other dominates
        ([[1, 2], [1, 3]], ("min", "min"), [0]),
        # a NaN row is never on the front and beats nothing
        ([[math.nan, 0], [1, 1], [0, 2]], ("min", "min"), [1, 2]),
        (np.zeros((0, 2)), ("min", "max"), []),
    ],
)
def test_pareto_front_hand_made(points, modes, expected):
    assert pareto_front(np.array(points, dtype=float), modes).tolist() == expected


def test_pareto_front_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 5, size=(40, 2)).astype(float)  # many ties
    for modes in itertools.product(("min", "max"), repeat=2):
        better = [(lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b) for mode in modes]
        expected = [
            i for i, p in enumerate(points)
            if not any(
                all(not better[k](p[k], q[k]) for k in range(2)) and any(better[k](q[k], p[k]) for k in range(2))
                for q in points
            )
        ]
        assert pareto_front(points, modes).tolist() == expected, modes


@pytest.mark.parametrize(
    "points, modes, message",
    [([[1, 2]], ("min", "maximize"), "'min' or 'max'"), ([[1, 2, 3]], ("min", "min"), r"\[N, 2\]")],
)
def test_pareto_front_rejects_bad_input(points, modes, message):
    with pytest.raises(ValueError, match=message):
        pareto_front(np.array(points, dtype=float), modes)


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 10.0, 300.0], ("log", {})),
        ([0.0, 0.5, 40.0, math.nan], ("symlog", {"linthresh": 0.5})),
        ([0.0, 0.0, math.nan], ("linear", {})),
    ],
)
def test_kl_scale(values, expected):
    assert kl_scale(np.array(values)) == expected


def test_load_trials_reads_cells(sweep_dir: Path, tmp_path: Path):
    trials = {t.trial_id: t for t in load_trials(sweep_dir)}
    assert trials["t0"].run_dir == sweep_dir / "trials" / "t0"
    assert trials["t1"].run_dir == tmp_path / "elsewhere" / "t1" and trials["t1"].audited
    assert trials["t3"].number is None and trials["t3"].run_dir is None and math.isnan(trials["t3"].metric("au"))
    assert math.isnan(trials["t2"].metric("final/kl_raw"))  # the non-finite sentinel
    assert trials["t0"].params == {"objective.kl.beta": "0.01", "objective.likelihood": "gaussian_sum"}
    assert trials["t0"].metric("best/au") == 12.0 and not trials["t4"].audited


def test_curves_figure_lines(sweep_dir: Path):
    trials = load_trials(sweep_dir)
    fig = curves_figure(trials, load_curves(sweep_dir / "epochs.csv", ("au", "kl_raw")))
    ax_au, ax_kl = fig.axes
    assert len(ax_au.get_lines()) == len(EPOCHS)  # the failed trial has no epochs
    dashed = [line for line in ax_kl.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_color() == "#d62728"  # the audited trial, collapsed: red
    assert np.allclose(dashed[0].get_ydata(), EPOCHS["t1"][1])
    assert ax_kl.get_yscale() == "log"  # the sentinel is dropped, every other KL is positive
    assert "1 without epochs" in fig.get_suptitle()


@pytest.mark.parametrize("au_mode, steps", [("max", "steps-pre"), ("min", "steps-post")])
def test_pareto_figure_front(sweep_dir: Path, au_mode: str, steps: str):
    fig = pareto_figure(load_trials(sweep_dir), [("au", au_mode), ("recon_mu", "min")])
    (front_line,) = fig.axes[0].get_lines()
    # max AU: trials 4 (8, 0.015) and 0 (12, 0.02); min AU: the collapsed trial is not completed and trial 5
    # (5, 0.03) breaks the constraints, so trial 4 alone
    expected = {"max": ([8, 12], [0.015, 0.02]), "min": ([8], [0.015])}[au_mode]
    assert (front_line.get_xdata().tolist(), front_line.get_ydata().tolist()) == expected
    assert front_line.get_drawstyle() == steps


def test_rate_distortion_figure(sweep_dir: Path):
    """Rate against distortion, and the semantic probe against rate; the infeasible trial drawn hollow."""
    fig = rate_distortion_figure(load_trials(sweep_dir))
    left, right = fig.axes
    rates = {tuple(np.round(p, 6)) for p in np.concatenate([c.get_offsets() for c in left.collections])}
    assert {(40.0, 0.02), (1.1, 0.09), (25.0, 0.015)} <= rates  # KL_raw and recon(mu) of t0, t1, t4
    assert right.get_ylabel().startswith("semantic R²")
    hollow = [c for c in right.collections  # white-filled points (the audited star is unfilled)
              if len(c.get_offsets()) and len(c.get_facecolors()) and np.allclose(c.get_facecolors()[:, :3], 1.0)]
    assert [tuple(np.round(p, 6)) for c in hollow for p in c.get_offsets()] == [(10.0, 0.7)]  # t5
    assert left.get_xscale() == "log"


def test_progress_figure_best_so_far(sweep_dir: Path):
    fig = progress_figure(load_trials(sweep_dir), ("au", "max"))
    (best_line,) = fig.axes[0].get_lines()
    # completed trials 0, 4, 5 with AU 12, 8, 5: the best so far stays 12
    assert best_line.get_xdata().tolist() == [0, 4, 5] and best_line.get_ydata().tolist() == [12, 12, 12]


def test_importances_per_objective(two_objective_study: optuna.Study):
    importances = param_importances(two_objective_study, TWO_OBJECTIVES)
    assert list(importances) == ["au", "recon_mu"]
    for shares in importances.values():
        assert set(shares) == set(DISTRIBUTIONS) and sum(shares.values()) == pytest.approx(1.0)


def test_importances_name_what_is_missing(tmp_path: Path):
    constant = {key: (*row[:5], "3", *row[6:]) for key, row in TRIALS.items()}  # AU 3 everywhere
    importances = param_importances(make_study(tmp_path, ["maximize", "minimize"], constant), TWO_OBJECTIVES)
    assert "same (3) for every completed trial" in importances["au"] and isinstance(importances["recon_mu"], dict)
    with pytest.raises(Skipped, match="no Optuna study"):
        param_importances(None, TWO_OBJECTIVES)


# --------------------------------------------------------------------------- the report


def test_report_two_objectives(sweep_dir: Path, tmp_path: Path, two_objective_study: optuna.Study):
    index = write_report(sweep_dir, two_objective_study, TWO_OBJECTIVES)
    assert index == sweep_dir / "report" / "index.html"
    page = index.read_text()
    for name in PICTURES:
        assert_png(sweep_dir / "report" / name)
        assert f'src="{name}"' in page
    assert "<script" not in page and "http" not in page  # self-contained
    counts = dict(re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td></tr>", section(page, "Trials by status")))
    assert counts == {"completed": "3", "collapsed": "1", "diverged": "1", "asha_stopped": "1", "failed": "1",
                      "total": "7"}
    states = dict(re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td></tr>", section(page, "Optuna study")))
    assert states == {"COMPLETE": "4", "PRUNED": "1", "FAIL": "1"}
    best = section(page, "Best trial (best.yaml)")  # best on AU; recon(mu) would pick trial 4, which is on the front
    assert "trial 0" in best and "<td>0.01</td>" in best and "gaussian_sum" in best
    front = section(page, "Pareto front")  # t6 would dominate both but is not completed; t5 is dominated
    assert "trial 0" in front and "trial 4" in front and "trial 5" not in front and "trial 6" not in front
    assert "mse_mean" in section(page, "Audited configuration")
    (t5_row,) = [row for row in page.split("<tr") if "<td>t5</td>" in row]
    assert '<span class="tag">infeasible</span>' in t5_row  # never best, said in the table
    best_panel, audited_panel = sweep_dir / "trials/t0/recon_latest.png", tmp_path / "elsewhere/t1/recon_latest.png"
    assert (sweep_dir / "report" / "recon_best.png").read_bytes() == best_panel.read_bytes()
    assert (sweep_dir / "report" / "recon_audited.png").read_bytes() == audited_panel.read_bytes()
    assert "Left out" not in page


def test_report_single_objective(sweep_dir: Path, tmp_path: Path):
    page = write_report(sweep_dir, make_study(tmp_path, ["maximize"]), [("au", "max")]).read_text()
    for name in PICTURES:
        assert_png(sweep_dir / "report" / name)
    assert "Pareto front" not in page and "best so far" in page


def test_report_without_study_or_epochs(sweep_dir: Path):
    write_report(sweep_dir, None, TWO_OBJECTIVES)
    assert (sweep_dir / "report" / "curves.png").is_file()
    (sweep_dir / "epochs.csv").unlink()
    (sweep_dir / "trials" / "t0" / "recon_latest.png").unlink()
    page = write_report(sweep_dir, None, TWO_OBJECTIVES).read_text()
    left_out = section(page, "Left out")
    for name, reason in [("curves.png", "epochs.csv not found"), ("importances.png", "no Optuna study given"),
                         ("recon_best.png", "best trial (trial 0) has no")]:
        assert not (sweep_dir / "report" / name).exists(), name  # the earlier picture is gone too
        assert f"{name}: {reason}" in left_out and f'src="{name}"' not in page
    for name in ["pareto.png", "recon_audited.png", "params.png"]:
        assert_png(sweep_dir / "report" / name)


def test_report_partial_sweeps(tmp_path: Path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "trials.csv").write_text("trial_id,number,status,run_dir\n")  # killed before the first trial ended
    page = write_report(out, None, [("au", "max")]).read_text()
    assert "<td>total</td><td>0</td>" in page and not list((out / "report").glob("*.png"))
    write_csv(out / "trials.csv", [{"trial_id": "a", "number": 0, "status": "completed", "run_dir": "",
                                    "param/objective.kl.beta": 0.1, "final/au": 3, "final/recon_mu": ""}])
    (out / "epochs.csv").write_text("trial_id,au\na,3\n")
    page = write_report(out, None, TWO_OBJECTIVES).read_text()
    assert "pareto.png: no trial has finite final values of both au and recon_mu" in page
    assert "curves.png: epochs.csv has no column [&#x27;epoch&#x27;]" in page
    assert_png(out / "report" / "params.png")


def test_report_requires_trials_table(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="trials.csv"):
        write_report(tmp_path, None, [("au", "max")])
    (tmp_path / "trials.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="trial_id"):
        write_report(tmp_path, None, [("au", "max")])
    with pytest.raises(ValueError, match="one or two"):
        write_report(tmp_path, None, [])


# --------------------------------------------------------------------------- the page as a person reads it


def test_page_reads_summary_then_trials_then_figures(sweep_dir: Path, two_objective_study: optuna.Study):
    page = write_report(sweep_dir, two_objective_study, TWO_OBJECTIVES).read_text()
    landmarks = ["Trials by status", "Optuna study", BEST_HEADING, "Pareto front", 'src="curves.png"',
                 "<h2>Trials</h2>", 'src="pareto.png"', 'src="importances.png"', 'src="params.png"',
                 'src="recon_best.png"', 'src="recon_audited.png"']
    places = [page.index(landmark) for landmark in landmarks]
    assert places == sorted(places), landmarks
    trials = section(page, "<h2>Trials</h2>")
    rows = re.findall(r"<tr(?: class=\"(\w+)\")?>(.*?)</tr>", trials)
    assert len(rows) == 1 + len(TRIALS)  # the header, then one row per trial
    marked = {row_class: cells for row_class, cells in rows if row_class}
    assert set(marked) == {"best", "audited"} and "<td>t0</td>" in marked["best"] and "<td>t1</td>" in marked["audited"]
    header = rows[0][1]
    for label in ("AU ↑", "recon(μ) ↓", "KL_raw", 'title="objective.kl.beta">β<', ">likelihood<"):
        assert label in header, label
    assert "interrupted" not in page  # no interruption: no note


@pytest.mark.parametrize(
    "value, text",
    [(1.5478914484799877, "1.55"), (0.01, "0.01"), (12.0, "12"), (-0.2522, "−0.252"), (999.7, "1000"),
     (123456.0, "123000"), (1.234e-7, "1.23e−7"), (2.5e7, "2.5e7"), (0.0, "0"), (math.nan, "—")],
)
def test_numbers_show_three_significant_digits(value: float, text: str):
    assert significant(value) == text


def test_estimates_outside_their_range_are_clipped_and_flagged(tmp_path: Path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"experiment": {"model": {"z_dim": 16}}}))
    write_csv(out / "trials.csv", [{
        "trial_id": "a", "number": 0, "status": "completed", "run_dir": "", "param/objective.kl.beta": 1.5478914484799877,
        "final/au": 20, "final/kl_raw": -0.01, "final/recon_mu": 0.0312345, "final/mi": -0.2522,
    }])
    page = write_report(out, None, TWO_OBJECTIVES).read_text()
    for part in (section(page, BEST_HEADING), section(page, "<h2>Trials</h2>")):
        assert "16 <span class=\"flag\">(estimate 20 clipped)</span>" in part  # AU above z_dim
        assert "0 <span class=\"flag\">(estimate −0.01 clipped)</span>" in part  # KL_raw below 0
        assert ">0.0312</td>" in part and ">1.55</td>" in part
    assert "0 <span class=\"flag\">(estimate −0.252 clipped)</span>" in section(page, "<h2>Trials</h2>")  # MI below 0
    assert "1.5478914484799877" not in page and "0.0312345" not in page


def test_interrupted_trials_are_explained_beside_the_study(sweep_dir: Path, tmp_path: Path):
    study = make_study(tmp_path, ["maximize", "minimize"])
    params = {"objective.kl.beta": 0.1, "objective.likelihood": "gaussian_sum"}

    def add(run_name: str, state: TrialState, **attrs) -> None:
        values = [8.0, 0.015] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=state, values=values,
                                     user_attrs={"run_name": run_name, **attrs}))

    add("t4", TrialState.FAIL, status="interrupted", stop_reason="interrupted: the sweep was stopped")
    add("t4", TrialState.COMPLETE)  # t4 continued under the same name
    add("t6", TrialState.FAIL, status="interrupted")
    study.enqueue_trial(params, user_attrs={"run_name": "t6", "continues": 9})  # t6 waits for --resume
    page = write_report(sweep_dir, study, TWO_OBJECTIVES).read_text()
    optuna_section = section(page, "Optuna study")
    states = dict(re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td></tr>", optuna_section))
    assert states == {"COMPLETE": "5", "PRUNED": "1", "FAIL": "3", "WAITING": "1"}
    assert "FAIL includes 2 interrupted Optuna trials" in optuna_section
    assert "Continued by later Optuna trials: t4." in optuna_section
    assert "resumed (--resume): t6." in optuna_section
    assert "<td>t4 <span title=\"continued after an interruption\">↻</span></td>" in section(page, "<h2>Trials</h2>")


# --------------------------------------------------------------------------- the page in a real browser

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_CHROMIUM = "apt-get install -y chromium chromium-driver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven through WebDriver (selenium with the system's chromedriver), keeping console messages.

    Skipped only when no Chromium is installed; Chromium without chromedriver or selenium fails.
    """
    binary = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    if binary is None:
        pytest.skip(f"no Chromium installed to open the report in (Debian: {APT_CHROMIUM})")
    driver_path = shutil.which("chromedriver")
    assert driver_path, f"{binary} is installed but chromedriver is not (Debian: {APT_CHROMIUM})"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        pytest.fail(f"selenium is missing (pip install -e '.[dev]'): {error}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: selenium never tries to download a driver or a browser.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(browser, index: Path) -> tuple[list[list], list[dict]]:
    """Load ``index`` (returns once the page and its images have loaded); its pictures as
    ``[src, complete, naturalWidth]`` and the console's errors since the last call."""
    browser.get(index.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    return images, errors


def test_report_page_loads_in_a_browser(browser, sweep_dir: Path, two_objective_study: optuna.Study):
    images, errors = open_page(browser, write_report(sweep_dir, two_objective_study, TWO_OBJECTIVES))
    assert not errors
    assert sorted(src for src, _, _ in images) == sorted(PICTURES)
    assert all(complete and width > 0 for _, complete, width in images), images
    # The summary is one screen: the best trial beside the audited one, and the curves begin, above the fold.
    layout = browser.execute_script(
        "const table = [...document.querySelectorAll('h3')].find(h => h.textContent.startsWith(arguments[0]))"
        ".nextElementSibling.getBoundingClientRect();"
        "return [table.bottom, document.querySelector('img[src=\"curves.png\"]').getBoundingClientRect().top,"
        " window.innerHeight];", BEST_HEADING)
    table_bottom, curves_top, height = layout
    assert table_bottom <= height and curves_top < height, layout


def test_partial_report_loads_in_a_browser(browser, sweep_dir: Path):
    (sweep_dir / "epochs.csv").unlink()
    (sweep_dir / "trials" / "t0" / "recon_latest.png").unlink()
    images, errors = open_page(browser, write_report(sweep_dir, None, TWO_OBJECTIVES))
    assert not errors
    assert sorted(src for src, _, _ in images) == ["params.png", "pareto.png", "rate_distortion.png", "recon_audited.png"]
    assert all(complete and width > 0 for _, complete, width in images), images
