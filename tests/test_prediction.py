"""Collapse predicted from sigma^2_eff against the data's spectrum: the numbers, the exemptions, the verdict."""
from dataclasses import replace

import pytest
import yaml

from helpers import MINIMAL
from sweeps.collapse_rule import CollapseRule, trial_outcome
from sweeps.prediction import exemption, free_nats, predict, sigma2_eff
from sweeps.spec import load_sweep
from vae.config import validate_experiment
from vae.data.spectrum import Spectrum

VOXELS = 4 * 16**3
SPECTRUM = Spectrum((1000.0, 300.0), total_variance=6000.0, subjects=20, dim=VOXELS)
RULE = CollapseRule(kl_min=1.0, channel_min=0.1)


def _cfg(**objective):
    return validate_experiment({"data": {"size": 16}, "model": {"depth": 2, "z_dim": 8}, "objective": objective})


@pytest.mark.parametrize(("objective", "expected"), [
    ({"likelihood": "mse_mean", "kl": {"beta": 0.5}}, 0.5 * VOXELS / 2),
    ({"likelihood": "gaussian", "sigma2": 0.2, "kl": {"beta": 4.0}}, 0.8),
    # capacity: gamma * |KL - C| weighs a nat of KL by gamma, not beta
    ({"likelihood": "gaussian", "sigma2": 0.2, "kl": {"beta": 4.0, "capacity_max": 0.5, "capacity_gamma": 50.0}}, 10.0),
])
def test_sigma2_eff_of_each_likelihood(objective, expected):
    assert sigma2_eff(_cfg(**objective)) == pytest.approx(expected)


def test_the_sigma_vae_is_known_after_its_first_epoch():
    cfg = _cfg(likelihood="sigma_vae", kl={"beta": 3.0})
    assert sigma2_eff(cfg) is None and predict(cfg, SPECTRUM, RULE, 2.0) is None
    assert sigma2_eff(cfg, {"recon_mu": 0.25}) == pytest.approx(0.75)
    assert sigma2_eff(cfg, {"recon_mu": float("nan")}) is None
    assert not predict(cfg, SPECTRUM, RULE, 2.0, {"recon_mu": 0.25}).collapses


def test_predicted_exactly_from_margin_times_lambda_1():
    at = _cfg(likelihood="gaussian", sigma2=1.0, kl={"beta": 2000.0})  # sigma^2_eff 2000 = 2 x 1000
    below = _cfg(likelihood="gaussian", sigma2=1.0, kl={"beta": 1999.0})
    assert predict(at, SPECTRUM, RULE, 2.0).collapses and not predict(below, SPECTRUM, RULE, 2.0).collapses
    assert predict(below, SPECTRUM, RULE, 1.0).collapses
    reason = predict(at, SPECTRUM, RULE, 2.0).reason()
    assert reason == "predicted: sigma^2_eff >= lambda_1: sigma^2_eff 2000 vs 2 x lambda_1 1000 of the data's spectrum"
    assert predict(at, None, RULE, 2.0) is None  # no spectrum, no prediction


def test_a_kl_floor_above_the_rule_and_dip_i_are_exempt():
    audited = {"likelihood": "mse_mean", "kl": {"beta": 1.0}}
    # free bits 0.1 x 8 dims = 0.8 nats, within the rule's 1 nat: the optimum is still collapsed
    assert free_nats(_cfg(**audited, free_bits={"floor": 0.1})) == pytest.approx(0.8)
    assert exemption(_cfg(**audited, free_bits={"floor": 0.1}), RULE) is None
    assert "KL floor of 1.6 nats" in exemption(_cfg(**audited, free_bits={"floor": 0.2}), RULE)
    capacity = {"likelihood": "mse_mean", "kl": {"beta": 1.0, "capacity_max": 5.0}}
    assert "KL floor of 5 nats" in exemption(_cfg(**capacity), RULE)
    assert predict(_cfg(**capacity), SPECTRUM, RULE, 2.0) is None
    dip_i = _cfg(**audited, dip={"kind": "i", "lambda_od": 10.0, "lambda_d": 5.0})
    assert "DIP-I" in exemption(dip_i, RULE) and predict(dip_i, SPECTRUM, RULE, 2.0) is None
    dip_ii = _cfg(**audited, dip={"kind": "ii", "lambda_od": 10.0, "lambda_d": 5.0})  # the identity at collapse
    assert exemption(dip_ii, RULE) is None and predict(dip_ii, SPECTRUM, RULE, 2.0).collapses


def test_the_audited_point_is_exempt_unless_asked(tmp_path):
    raw = {**MINIMAL, "space": {"objective.likelihood": {"choices": ["mse_mean", "gaussian"]},
                                "objective.kl.beta": {"low": 0.1, "high": 10.0, "log": True}},
           "enqueue": [{"name": "audited", "audited": True,
                        "params": {"objective.likelihood": "mse_mean", "objective.kl.beta": 1.0}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    sweep = replace(load_sweep(str(path)), spectrum=SPECTRUM)
    audited = {"objective.likelihood": "mse_mean", "objective.kl.beta": 1.0}
    other = {"objective.likelihood": "mse_mean", "objective.kl.beta": 1.5}
    assert sweep.is_audited(audited) and not sweep.is_audited(other)
    assert sweep.predicted_collapse(audited) is None and sweep.predicted_collapse(other).collapses
    asked = load_sweep(str(path), changes={"early_stop.predict_audited": True})
    assert replace(asked, spectrum=SPECTRUM).predicted_collapse(audited).collapses
    off = load_sweep(str(path), changes={"early_stop.predict": "off"})
    assert replace(off, spectrum=SPECTRUM).predicted_collapse(other) is None
    assert not load_sweep(str(path), changes={"early_stop.mode": "none"}).spec.early_stop.stops_predicted
    assert not load_sweep(str(path), changes={"early_stop.predict": "warn"}).spec.early_stop.stops_predicted


def test_a_prediction_is_a_collapse_unless_the_trial_failed_or_diverged():
    reason = "predicted: sigma^2_eff >= lambda_1: ..."
    last = {"epoch": 1, "status": "running"}
    assert trial_outcome(last, False, 0, RULE, False, False, reason).status == "collapsed"
    assert trial_outcome(last, False, 0, RULE, False, False, reason).reason == reason
    assert trial_outcome(last, True, 0, RULE, False, False, reason).status == "failed"
    assert trial_outcome({"epoch": 1, "status": "diverged"}, False, 0, RULE, False, False, reason).status == "diverged"
    assert trial_outcome(None, False, 0, RULE, False, False, reason).status == "interrupted"
