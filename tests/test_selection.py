"""The best trial: one rule (best on the first objective, ties broken by the next, then the earlier
trial) for best.yaml and summary.json (from the study), the report (from trials.csv) and the
stopping benchmark (from recorded curves)."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from bench.stopping import Curve, best_of
from sweeps import report
from sweeps.outputs import best_trial
from sweeps.selection import best_index, pareto_front
from sweeps.collapse_rule import ScheduleTargets

OBJECTIVES = [("au", "max"), ("recon_mu", "min")]
MODES = [mode for _, mode in OBJECTIVES]


@pytest.mark.parametrize(
    "points, expected",
    [
        ([[3, 0.5], [5, 0.9], [5, 0.7], [1, 0.1]], 2),  # best AU, the tie broken by recon(mu)
        ([[5, 0.7], [5, 0.7]], 0),  # an exact tie: the earlier trial
        ([[math.nan, 0.1], [2, math.inf], [1, 0.9]], 2),  # a non-finite value never wins
        ([], None),
        ([[math.nan, math.nan]], None),
    ],
)
def test_best_index(points, expected):
    assert best_index(points, MODES) == expected


def test_the_best_is_on_the_pareto_front_of_random_points():
    rng = np.random.default_rng(0)
    for _ in range(200):
        points = rng.integers(0, 4, size=(rng.integers(1, 9), 2)).astype(float)
        for modes in (["max", "min"], ["min", "min"], ["max", "max"]):
            assert best_index(points, modes) in pareto_front(points, modes).tolist()


def test_study_report_and_benchmark_name_the_same_trial(tmp_path):
    """Equal AU, different recon(mu): the report once broke the tie by order, best.yaml by recon(mu)."""
    values = {"t0": (4.0, 0.30), "t1": (6.0, 0.40), "t2": (6.0, 0.20), "t3": (1.0, 0.05)}
    study = optuna.create_study(directions=["maximize", "minimize"])
    beta = FloatDistribution(0.01, 10.0, log=True)
    for i, (au, recon) in enumerate(values.values()):
        study.add_trial(create_trial(params={"beta": 0.1 * (i + 1)}, distributions={"beta": beta}, values=[au, recon]))
    study.add_trial(create_trial(params={"beta": 9.0}, distributions={"beta": beta}, state=TrialState.PRUNED))
    from_study = best_trial(study, OBJECTIVES).number

    def row(number: int, status: str, au: float, recon: float) -> report.Trial:
        return report.Trial(trial_id=f"t{number}", number=number, status=status, epochs=3, stop_reason="",
                            run_dir=None, params={}, final={"au": au, "recon_mu": recon}, best={}, audited=False)

    trials = [row(i, "completed", au, recon) for i, (au, recon) in enumerate(values.values())]
    trials.append(row(4, "collapsed", 9.0, 0.01))  # never the best
    from_table = report.best_trial(trials, OBJECTIVES).number

    curves = [Curve(t.trial_id, t.number, {}, ScheduleTargets(1.0, None, False),
                    ({"epoch": 3.0, **t.final},), {"epoch": "3", "status": "completed"}, "completed")
              for t in trials[:4]]
    from_benchmark = best_of(curves, OBJECTIVES).number
    assert from_study == from_table == from_benchmark == 2


def test_a_trial_that_breaks_a_constraint_is_never_best(tmp_path):
    """The otherwise best trial (t2) breaks the prior-regularity bound: the study, Optuna's own Pareto front
    and the report all pass it over; a trial that meets it exactly (excess 0) still counts."""
    values = {"t0": (4.0, 0.30), "t1": (6.0, 0.40), "t2": (6.0, 0.20), "t3": (1.0, 0.05)}
    excess = {"t0": -0.5, "t1": 0.0, "t2": 22.5, "t3": -0.9}
    study = optuna.create_study(directions=["maximize", "minimize"])
    beta = FloatDistribution(0.01, 10.0, log=True)
    for i, name in enumerate(values):
        study.add_trial(create_trial(params={"beta": 0.1 * (i + 1)}, distributions={"beta": beta},
                                     values=list(values[name]),
                                     system_attrs={"constraints:prior_kl_dim_max": excess[name]}))
    assert best_trial(study, OBJECTIVES).number == 1
    assert 2 not in {t.number for t in study.best_trials}

    trials = [report.Trial(trial_id=name, number=i, status="completed", epochs=3, stop_reason="", run_dir=None,
                           params={}, final={"au": au, "recon_mu": recon}, best={}, audited=False,
                           feasible=excess[name] <= 0)
              for i, (name, (au, recon)) in enumerate(values.items())]
    assert report.best_trial(trials, OBJECTIVES).number == 1
    assert 2 not in {t.number for t in report.front_trials(trials, OBJECTIVES)}
