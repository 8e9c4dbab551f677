"""Scoring a trained run by what its code carries: probes through the channel, and the evaluate command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vae.config import ExperimentConfig
from vae.data.sources import prepared_cache, training_datasets
from vae.data.subject_factors import LOCATION_FACTORS, SEG_FACTORS
from vae.evaluate import EVALUATION_JSON, EVALUATION_PNG, evaluate_run, main
from vae.data.subject_factors import FactorTable
from vae.evaluation.probes import SAMPLES, channel_probe_metrics, draw_samples, probe_key, probe_r2
from vae.run_files import read_epochs
from vae.training import fit

# --------------------------------------------------------------------------- probes


def test_a_linear_factor_is_recovered_from_the_means():
    rng = np.random.default_rng(0)
    factor = rng.uniform(-1, 1, 40)
    mu = np.stack([factor, rng.normal(size=40), rng.normal(size=40)], axis=1)
    r2, predicted = probe_r2(mu, factor)
    assert r2 > 0.99 and predicted == pytest.approx(factor, abs=0.05)


def test_a_collapsed_encoder_scores_through_its_means_but_not_through_its_channel():
    """Var(mu) ~ 1e-4 against sigma = 1: a probe on standardised mu scales the motion up; samples drown it."""
    rng = np.random.default_rng(1)
    factor = rng.uniform(-1, 1, 60)
    mu = 0.01 * np.stack([factor, rng.normal(size=60)], axis=1)
    logvar = np.zeros_like(mu)
    on_mu, _ = probe_r2(mu, factor)
    through, _ = probe_r2(draw_samples(mu, logvar, 10, seed=2), factor)
    assert on_mu > 0.95 and through < 0.05
    # the same code with sharp posteriors passes the channel
    sharp, _ = probe_r2(draw_samples(mu, np.full_like(mu, math.log(1e-6)), 10, seed=2), factor)
    assert sharp > 0.9


def test_probe_r2_is_out_of_fold_against_the_grand_mean():
    """A target unrelated to the features scores about 0 or below, never the in-sample fit's optimism."""
    rng = np.random.default_rng(3)
    r2, _ = probe_r2(rng.normal(size=(30, 20)), rng.normal(size=30))
    assert r2 < 0.1
    assert math.isnan(probe_r2(rng.normal(size=(4, 2)), rng.normal(size=4))[0])  # too few subjects
    assert math.isnan(probe_r2(rng.normal(size=(10, 2)), np.ones(10))[0])  # nothing to predict


def test_channel_probe_metrics_of_a_code_with_a_known_through_channel_r2():
    """mu_0 = 2 f with sigma 1 passes R^2 = 4 / (4 + 1) = 0.8 of f; a dimension of noise passes nothing."""
    rng = np.random.default_rng(4)
    n = 200
    centre, size = rng.standard_normal(n), rng.standard_normal(n)
    mu = np.column_stack([2 * centre, 0.01 * size, rng.standard_normal(n)])
    table = FactorTable(("tumour_centroid_x", "tumour_log_volume", "age"),
                        np.column_stack([centre, size, np.where(np.arange(n) < 150, 1.0 * np.arange(n), np.nan)]))
    metrics = channel_probe_metrics(mu, np.zeros_like(mu), table, seed=0)
    assert metrics["probe_r2/tumour_centroid_x"] == pytest.approx(0.8, abs=0.05)
    assert metrics["probe_r2/tumour_log_volume"] < 0.05  # its mu moves (0.01 f) but the channel drowns it
    assert metrics["location_r2"] == metrics["probe_r2/tumour_centroid_x"]
    assert metrics["size_r2"] == metrics["probe_r2/tumour_log_volume"]
    assert metrics["semantic_r2"] == pytest.approx((metrics["location_r2"] + metrics["size_r2"]) / 2)
    assert metrics["probe_subjects"] == n  # the headline factors' subjects; age's 150 do not count


def test_channel_probe_metrics_are_finite_when_nothing_can_be_probed():
    rng = np.random.default_rng(5)
    assert channel_probe_metrics(rng.normal(size=(9, 2)), np.zeros((9, 2)), None) == {
        "semantic_r2": 0.0, "location_r2": 0.0, "size_r2": 0.0, "probe_subjects": 0.0}
    few = FactorTable(("tumour_log_volume",), rng.normal(size=(4, 1)))
    metrics = channel_probe_metrics(rng.normal(size=(4, 2)), np.zeros((4, 2)), few)
    assert metrics["semantic_r2"] == 0.0 and metrics["probe_r2/tumour_log_volume"] == 0.0
    assert metrics["probe_subjects"] == 4  # says why: fewer than 5
    with pytest.raises(ValueError, match="3 posteriors for 4 rows"):
        channel_probe_metrics(rng.normal(size=(3, 2)), np.zeros((3, 2)), few)


# --------------------------------------------------------------------------- the command


def tiny_experiment(cache_dir, epochs: int = 2) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "tiny",
        "data": {"size": 16, "modalities": ["t1c", "t2f"], "batch_size": 4, "val_fraction": 0.25, "num_workers": 0,
                 "cache_dir": str(cache_dir), "phantom": {"subjects": 24, "vary": "tumour"}},
        "model": {"z_dim": 4, "base_filters": 4, "depth": 2, "norm_groups": 2},
        "objective": {"likelihood": "gaussian", "sigma2": 0.05},
        "optim": {"lr": 3e-3},
        "train": {"epochs": epochs, "checkpoint_every": 1, "image_every": 10, "mixed_precision": False},
    })


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_experiment(folder / "cache")
    cache = prepared_cache(cfg.data)
    train_set, val_set = training_datasets(cfg.data, cache)
    torch.set_num_threads(1)
    fit(cfg, train_set, val_set, folder / "run", device=torch.device("cpu"))
    return folder / "run"


def test_evaluate_scores_every_subject_and_every_segmentation_factor(trained_run, tmp_path):
    record, _ = evaluate_run(trained_run)
    assert record["subjects"] == 24
    assert set(record["factors"]) == set(SEG_FACTORS)
    for name, scores in record["factors"].items():
        assert set(scores) == {"subjects", "probe_r2_z", "probe_r2_mu", "mig", "dci_informativeness"}
        assert 5 <= scores["subjects"] <= 24  # a subject without tumour has no centroid or fractions
    metrics = record["metrics"]
    assert {"au", "channel_nats", "mi", "kl_raw", "prior_kl", "recon_mu", "recon_zero", "z_sensitivity"} <= set(metrics)
    assert len(metrics["channel_nats_per_dim"]) == 4 and sum(metrics["channel_nats_per_dim"]) == pytest.approx(
        metrics["channel_nats"])
    location = np.mean([record["factors"][n]["probe_r2_z"] for n in LOCATION_FACTORS])
    assert metrics["location_r2"] == pytest.approx(location)
    assert metrics["semantic_r2"] == pytest.approx((metrics["location_r2"] + metrics["size_r2"]) / 2)
    again, _ = evaluate_run(trained_run)
    assert again["factors"] == record["factors"]  # seeded draws and folds


def test_each_epoch_reports_the_probes_its_checkpoint_gives_on_the_validation_subjects(trained_run):
    """The last epoch's probe columns equal probes recomputed from the final checkpoint's posteriors of the
    validation subjects, with the factors looked up by subject id."""
    from torch.utils.data import DataLoader

    from vae.data import Manifest
    from vae.evaluate import run_experiment, trained_model
    from vae.training import validate

    rows = read_epochs(trained_run)
    assert [name for name in rows[0] if name.startswith("probe_r2/")] == [probe_key(n) for n in sorted(SEG_FACTORS)]
    cfg = run_experiment(trained_run, None)
    cache = prepared_cache(cfg.data)
    _, val_set = training_datasets(cfg.data, cache)
    val = validate(trained_model(cfg, trained_run, torch.device("cpu")), DataLoader(val_set, batch_size=1), cfg,
                   epoch=0.0, dataset_size=1, keep_posteriors=True)
    mu, logvar = (t.double().numpy() for t in val.posteriors)
    z = draw_samples(mu, logvar, SAMPLES, cfg.train.seed)
    factors = Manifest.load(cache).factors
    last = rows[-1]
    assert float(last["probe_subjects"]) == min(
        sum(math.isfinite(factors[s][n]) for s in val_set.ids) for n in ("tumour_log_volume", *LOCATION_FACTORS))
    for name in SEG_FACTORS:
        truth = np.array([factors[s][name] for s in val_set.ids])
        defined = np.isfinite(truth)
        expected, _ = probe_r2(z[defined], truth[defined], seed=cfg.train.seed)
        expected = expected if math.isfinite(expected) else 0.0
        assert float(last[probe_key(name)]) == pytest.approx(expected, abs=1e-6), name


def test_the_command_writes_its_files_and_takes_a_factor_table(trained_run, tmp_path, capsys):
    table = tmp_path / "extra.csv"
    ids = json.loads((next(trained_run.parent.glob("cache/prepared/*/manifest.json"))).read_text())["subjects"]
    table.write_text("subject,age\n" + "".join(f"{s},{40 + i}\n" for i, s in enumerate(ids)))
    assert main([str(trained_run), "--factors", str(table), "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / EVALUATION_JSON).read_text())
    assert record["factors"]["age"]["subjects"] == 24
    assert (tmp_path / "out" / EVALUATION_PNG).read_bytes().startswith(b"\x89PNG")
    assert "semantic R²" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, words",
    [
        ("no run", "no such run folder"),
        ("no config", "no config.yaml"),
        ("no checkpoint", "no checkpoint/"),
        ("table for other data", "none of its 1 subjects (e.g. 'someone')"),
        ("text in a factor column", "column 'age' is not numeric"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, case, words, no_ray):
    run, argv = trained_run, []
    if case == "no run":
        run = tmp_path / "nowhere"
    elif case in ("no config", "no checkpoint"):
        run = tmp_path / "run"
        run.mkdir()
        if case == "no checkpoint":
            (run / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    else:
        table = tmp_path / "table.csv"
        table.write_text("subject,age\nsomeone,3\n" if case == "table for other data" else "subject,age\nx,old\n")
        argv = ["--factors", str(table)]
    assert main([str(run), *argv, "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and words in line
    assert not (tmp_path / "out").exists()
