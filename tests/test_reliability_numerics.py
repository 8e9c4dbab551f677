"""Numerics under mixed precision, on the CPU: float16 overflow is the grad scaler's business, not a
divergence, and the DIP penalty of the training loss stays float32 under float16 autocast.

Covered elsewhere, with real runs: a sweep whose overflowing trial ends ``diverged`` (Optuna
FAIL) while the others complete or collapse (``test_sweep_run.py::test_study_matches_the_trials_table``);
the overflowing loss with 1 and 2 workers under Tune
(``test_trainables.py::test_overflowing_loss_ends_trial_as_diverged``); NaN in a batch
(``test_train.py::test_nan_in_the_data_ends_the_run_as_diverged``); the DIP covariance under
bfloat16 autocast (``test_objectives.py::test_dip_covariance_is_float32_under_bf16_autocast``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae import objectives as obj
from vae.config import ExperimentConfig, load_experiment
from vae.loss import compute_loss
from vae.models import build_model
from vae.training import Precision, train_epoch

TINY = [
    "data.size=16", "data.modalities=[t1c, t2f]", "model.z_dim=4", "model.base_filters=4", "model.depth=2",
    "model.norm_groups=2", "model.broadcast_grid=4", "objective.dip.start_epoch=0", "objective.dip.warmup_epochs=0",
]
HALF = Precision(torch.float16)
# float16 tops out at 65504: a loss scaled by 2^40 overflows in the backward pass, whatever the data.
HUGE_SCALE, SANE_SCALE = 2.0**40, 2.0**8


def tiny() -> tuple[ExperimentConfig, torch.nn.Module]:
    cfg = load_experiment("exp2_dipvae_sbd", TINY)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.in_channels, cfg.data.size)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_float16_overflow_is_skipped_by_the_scaler_and_is_no_divergence():
    cfg, model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE)
    batches = [torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))]
    before = weights(model)

    overflow = train_epoch(model, batches, optimizer, cfg, 0, 2, HALF, scaler)
    assert overflow.diverged_term is None  # the run goes on
    assert scaler.get_scale() == HUGE_SCALE / 2  # an inf gradient was found: the scale backs off
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert math.isfinite(overflow.means["loss"]) and overflow.means["grad_norm"] == 0.0  # no finite gradient

    scaler.update(new_scale=SANE_SCALE)
    taken = train_epoch(model, batches, optimizer, cfg, 0, 2, HALF, scaler)
    assert taken.diverged_term is None and scaler.get_scale() == SANE_SCALE
    assert 0 < taken.means["grad_norm"] < math.inf
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # now the step is taken


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_penalty_of_the_loss_is_float32_under_float16_autocast(kind):
    cfg, model = tiny()
    objective = cfg.objective.model_copy(update={"dip": cfg.objective.dip.model_copy(update={"kind": kind})})
    x = torch.randn(4, 2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), HALF.autocast(x.device):
        out = model(x)
        terms = compute_loss(x, out.x_hat.float(), out.mu, out.logvar, out.z, objective, epoch=1.0,
                             total_epochs=2, dataset_size=8)
    assert out.x_hat.dtype == torch.float16  # autocast was on: the decoder ran in float16
    assert out.mu.dtype == out.logvar.dtype == torch.float32  # the encoder's latent head leaves autocast
    assert terms.dip_penalty.dtype == torch.float32
    with HALF.autocast(x.device):  # latents that arrive in float16 (from another encoder) too
        assert obj.dip_covariance(out.mu.half(), out.logvar.half(), kind).dtype == torch.float32
    mu, logvar = out.mu.double().numpy(), out.logvar.double().numpy()
    cov = np.cov(mu, rowvar=False, bias=True) + (np.diag(np.exp(logvar).mean(axis=0)) if kind == "ii" else 0)
    dip = objective.dip
    expected = obj.dip_penalty(torch.from_numpy(cov), dip.lambda_od, dip.lambda_diag).item()
    # A float16 covariance would be off by ~1e-3 relative (10 bits of mantissa).
    assert terms.dip_penalty.item() == pytest.approx(expected, rel=1e-5)
