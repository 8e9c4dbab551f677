"""Batch statistics under DDP: 2 gloo processes must reproduce one process on the global batch.

Each rank holds half of a global batch. The DIP covariance, batch-mean free bits and TC
are computed on the gathered batch, and the gradients that DDP averages must equal the
single-process gradient of the same loss - which holds only if the gather keeps the
gradient of the other rank's slice.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vae import objectives as obj
from vae.config import ObjectiveConfig
from vae.dist import gather_batch
from vae.loss import compute_loss
from vae.models import VAEOutput

WORLD = 2
GLOBAL_BATCH = 8
Z_DIM = 6
OBJECTIVE = ObjectiveConfig.model_validate({
    "likelihood": "gaussian",
    "sigma2": 0.5,
    "kl": {"beta": 0.7},
    "free_bits": {"floor": 0.25, "mode": "batch_mean"},
    "dip": {"kind": "ii", "lambda_od": 3.0, "lambda_d": 2.0},
    "tc": {"beta_tc": 3.0, "estimator": "mss"},
})


class TinyVAE(torch.nn.Module):
    """A linear VAE whose reparameterisation noise comes with the batch, so a rank's
    slice of the batch gives exactly the slice of the single-process computation."""

    def __init__(self, voxels: int):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(voxels, 2 * Z_DIM)
        self.dec = torch.nn.Linear(Z_DIM, voxels)

    def forward(self, x, eps):
        mu, logvar = self.enc(x.flatten(1)).chunk(2, dim=1)
        z = mu + eps * (0.5 * logvar).exp()
        return VAEOutput(self.dec(z).view_as(x), mu, logvar, z)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, 4, generator=g)
    eps = torch.randn(GLOBAL_BATCH, Z_DIM, generator=g)
    return x, eps


def _statistics_and_grads(model, x, eps):
    out = model(x, eps)
    terms = compute_loss(x, *out, OBJECTIVE, epoch=0.0, total_epochs=10, dataset_size=100)
    terms.total.backward()
    mu, logvar = gather_batch(out.mu), gather_batch(out.logvar)
    return {
        "cov": obj.dip_covariance(mu, logvar, "ii").detach(),
        "free_bits": terms.kl_constrained.detach(),
        "kl_per_dim": obj.kl_per_dim(mu, logvar).mean(dim=0).detach(),
        "tc": terms.tc.detach(),
        "loss_minus_recon": (terms.total - terms.recon).detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, eps = _data()
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        model = DistributedDataParallel(TinyVAE(x[0].numel()))
        result = _statistics_and_grads(model, x[local], eps[local])
        result["grads"] = {n.removeprefix("module."): g for n, g in result["grads"].items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_result():
    x, eps = _data()
    return _statistics_and_grads(TinyVAE(x[0].numel()), x, eps)


def test_gathered_statistics_equal_single_process(ddp_results, single_result):
    for rank_result in ddp_results:
        torch.testing.assert_close(rank_result["cov"], single_result["cov"])
        torch.testing.assert_close(rank_result["free_bits"], single_result["free_bits"])
        torch.testing.assert_close(rank_result["tc"], single_result["tc"])
        torch.testing.assert_close(rank_result["loss_minus_recon"], single_result["loss_minus_recon"])
    # The floor must bind on some dimensions and not on others, or the test proves little.
    kl_dims = single_result["kl_per_dim"]
    assert (kl_dims < OBJECTIVE.free_bits.floor).any() and (kl_dims > OBJECTIVE.free_bits.floor).any()


def test_ddp_gradients_equal_single_process(ddp_results, single_result):
    for rank_result in ddp_results:
        for name, grad in single_result["grads"].items():
            torch.testing.assert_close(rank_result["grads"][name], grad, rtol=1e-4, atol=1e-6)


def test_plain_all_gather_would_lose_gradients():
    """The reason for the autograd-aware gather: a detached gather halves the batch-statistic gradient.

    Emulated without processes: the other rank's slice arriving detached (as from
    dist.all_gather) gives a different gradient than the full batch.
    """
    x, eps = _data()
    model = TinyVAE(x[0].numel())
    out = model(x, eps)
    half = GLOBAL_BATCH // 2
    mu_detached = torch.cat([out.mu[:half], out.mu[half:].detach()])
    lv_detached = torch.cat([out.logvar[:half], out.logvar[half:].detach()])
    cov = obj.dip_covariance(mu_detached, lv_detached, "ii")
    (g_detached,) = torch.autograd.grad(obj.dip_penalty(cov, 3.0, 2.0), model.enc.weight, retain_graph=True)
    cov_full = obj.dip_covariance(out.mu, out.logvar, "ii")
    (g_full,) = torch.autograd.grad(obj.dip_penalty(cov_full, 3.0, 2.0), model.enc.weight)
    assert not torch.allclose(WORLD * g_detached, g_full, rtol=1e-3)
