"""Experiment configs: the audited values load, and every kind of mistake names its key."""
from pathlib import Path

import pytest

from vae.config import (
    ConfigError,
    ExperimentConfig,
    dump_experiment,
    experiment_names,
    load_experiment,
)


def test_audited_experiments_carry_the_audited_values():
    assert {"exp1_baseline_vae", "exp2_dipvae_sbd"} <= set(experiment_names())
    for name in ("exp1_baseline_vae", "exp2_dipvae_sbd"):
        cfg = load_experiment(name)
        assert cfg.name == name
        assert (cfg.model.z_dim, cfg.model.base_filters, cfg.model.norm) == (128, 32, "group")
        assert (cfg.data.size, cfg.data.batch_size, cfg.in_channels) == (128, 8, 4)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip_norm) == (1e-4, 0.01, 5.0)
        assert cfg.model.posterior_logvar_min == -6.0
        # 0.05 nats x 128 dims: the audited 6.4-nat floor
        assert (cfg.objective.free_bits.floor, cfg.objective.free_bits.mode) == (0.05, "batch_mean")
        assert (cfg.objective.kl.beta, cfg.objective.kl.schedule) == (1.0, "constant")
        assert cfg.objective.likelihood == "mse_mean"
        assert cfg.train.epochs == 200 and cfg.train.mixed_precision
    exp2 = load_experiment("exp2_dipvae_sbd")
    assert (exp2.model.decoder, exp2.model.broadcast_grid) == ("broadcast", 8)
    dip = exp2.objective.dip
    # DIP from epoch 0, warming up linearly to lambda over 40 epochs
    assert (dip.kind, dip.lambda_od, dip.lambda_diag, dip.start_epoch, dip.warmup_epochs) == ("ii", 10, 5, 0, 40)


def test_collapse_settings_are_flagged_in_the_yaml_not_fixed():
    text = (Path(__file__).parents[1] / "vae/configs/exp1_baseline_vae.yaml").read_text()
    assert "COLLAPSE" in text and "likelihood: mse_mean" in text


def test_dotted_overrides_are_typed():
    cfg = load_experiment("exp2_dipvae_sbd", ["model.z_dim=16", "objective.kl.beta=1e-3", "data.modalities=[t1c]"])
    assert cfg.model.z_dim == 16 and isinstance(cfg.model.z_dim, int)
    assert cfg.objective.kl.beta == pytest.approx(1e-3)
    assert cfg.in_channels == 1


def test_dump_round_trips(tmp_path):
    cfg = load_experiment("exp2_dipvae_sbd", ["objective.dip.lambda_d_ratio=null", "train.epochs=3"])
    path = tmp_path / "best.yaml"
    path.write_text(dump_experiment(cfg))
    assert load_experiment(path) == cfg


def test_lambda_d_ratio_and_default():
    cfg = load_experiment("exp2_dipvae_sbd", ["objective.dip.lambda_d=null", "objective.dip.lambda_d_ratio=0.5"])
    assert cfg.objective.dip.lambda_diag == 5.0
    cfg = load_experiment("exp2_dipvae_sbd", ["objective.dip.lambda_d=null", "objective.dip.kind=i"])
    assert cfg.objective.dip.lambda_diag == 100.0  # Kumar et al.: 10 x lambda_od for DIP-I


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.zdim=3"], "unknown key 'zdim' in model"),
        (["modle.z_dim=3"], "unknown key 'modle' in top level"),
        (["model.z_dim=abc"], "model.z_dim: Input should be a valid integer"),
        (["objective.likelihood=mse_sum"], "objective.likelihood: Input should be"),
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
        (["data.size=100"], "data.size 100 must be divisible by 2**model.depth"),
        (["model.broadcast_grid=12", "data.size=64", "model.depth=2"], "broadcast_grid 12 must divide"),
        (["objective.dip.lambda_d_ratio=2"], "objective.dip: give lambda_d or lambda_d_ratio, not both"),
        (["model.posterior_logvar_max=-7"], "posterior_logvar_max must be greater"),
        (["z_dim"], "expected key=value"),
    ],
)
def test_bad_values_name_their_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_experiment("exp2_dipvae_sbd", overrides)
    assert expected in str(err.value)
    assert "Traceback" not in str(err.value)


def test_unknown_key_and_yaml_errors_in_files(tmp_path):
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("base: exp1_baseline_vae\nobjective:\n  kl:\n    betta: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: objective.kl.betta: unknown key"):
        load_experiment(bad_key)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  z_dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: YAML syntax error"):
        load_experiment(broken)
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*exp1_baseline_vae"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "missing.yaml")


def test_defaults_validate():
    cfg = ExperimentConfig()
    assert cfg.objective.likelihood == "gaussian"  # the package default is not the collapsed one
