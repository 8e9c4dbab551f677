"""The simulated parallel sweep of ``bench/samplers.py``: duplicates, the response model, the ask-and-tell loop."""
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from bench.samplers import near_duplicates, response, run_sweep
from sweeps.spec import load_sweep

DISTRIBUTIONS = {"beta": FloatDistribution(0.01, 10.0, log=True), "kind": CategoricalDistribution(["i", "ii"])}


def _trial(number: int, beta: float, kind: str) -> optuna.trial.FrozenTrial:
    trial = create_trial(params={"beta": beta, "kind": kind}, distributions=DISTRIBUTIONS, value=0.0)
    trial.number = number
    return trial


def test_near_duplicates_share_every_choice_and_lie_within_two_percent_on_the_sampled_scale():
    span = 3.0  # decades of beta's log range: 2 % of it is a factor 10^0.06 = 1.148
    trials = [_trial(0, 1.0, "i"), _trial(1, 1.0 * 10 ** (0.019 * span), "i"), _trial(2, 1.0, "ii"),
              _trial(3, 1.0 * 10 ** (0.03 * span), "ii")]
    assert near_duplicates(trials) == 1  # only trial 1; trial 2 differs in kind, trial 3 by 3 % of the range


def test_the_response_follows_the_prediction():
    sweep = load_sweep("dip_sbd", overrides=[("data.size", 32)])
    audited = next(p.params for p in sweep.spec.enqueue if p.audited)
    assert response(sweep, audited).collapsed and response(sweep, audited).epochs == 20  # its free bits: the rule's
    predicted = {**audited, "free_bits": "none"}
    predicted.pop("objective.free_bits.floor"), predicted.pop("objective.free_bits.mode")
    assert response(sweep, predicted).collapsed and response(sweep, predicted).epochs == 1
    gaussian = {**predicted, "objective.likelihood": "gaussian", "objective.sigma2": 0.8, "objective.kl.beta": 9.0}
    open_code = response(sweep, gaussian)
    assert not open_code.collapsed and open_code.prior_kl <= 1.0 and 0.3 < open_code.semantic <= 0.9
    sharp = response(sweep, {**gaussian, "objective.sigma2": 0.01, "objective.kl.beta": 0.01})
    assert sharp.prior_kl > 1.0  # an autoencoder's code breaks the prior constraint


def test_a_simulated_sweep_tells_every_trial():
    sweep = load_sweep("dip_sbd", overrides=[("data.size", 32)])
    result = run_sweep(sweep, optuna.samplers.TPESampler(seed=0), trials=12, concurrent=4, seed=0,
                       constraint_max=1.0)
    assert result["trials"] == 12 and result["unfinished"] == 0  # every trial asked was told
    assert result["collapsed"] >= 1  # the audited point, asked first
    assert 0 <= result["near_duplicates"] < 12 and result["feasible"] <= 12 - result["collapsed"]
    assert result["best_semantic"] is None or 0.0 <= result["best_semantic"] <= 0.9
