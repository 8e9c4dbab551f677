"""Batch statistics under DDP: 2 gloo processes must reproduce one process on the global batch.

Each rank holds half of a global batch. The DIP covariance, batch-mean free bits and TC
are computed on the gathered batch, the sigma-VAE's sigma on the squared error summed over
ranks, and the gradients that DDP averages must equal the single-process gradient of the
same loss - which holds only if the gather and the sum keep the gradient of the other
rank's slice.
"""
import gc
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
_BATCH_TERMS = {
    "kl": {"beta": 0.7},
    "free_bits": {"floor": 0.25, "mode": "batch_mean"},
    "dip": {"kind": "ii", "lambda_od": 3.0, "lambda_d": 2.0},
    "tc": {"beta_tc": 3.0, "estimator": "mss"},
}
OBJECTIVES = {
    "gaussian": ObjectiveConfig.model_validate({"likelihood": "gaussian", "sigma2": 0.5, **_BATCH_TERMS}),
    "sigma_vae": ObjectiveConfig.model_validate({"likelihood": "sigma_vae", **_BATCH_TERMS}),
}


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


def _statistics_and_grads(model, x, eps, objective):
    out = model(x, eps)
    terms = compute_loss(x, *out, objective, epoch=0.0, total_epochs=10, dataset_size=100)
    terms.total.backward()
    mu, logvar = gather_batch(out.mu), gather_batch(out.logvar)
    return {
        "cov": obj.dip_covariance(mu, logvar, "ii").detach(),
        "free_bits": terms.kl_constrained.detach(),
        "kl_per_dim": obj.kl_per_dim(mu, logvar).mean(dim=0).detach(),
        "tc": terms.tc.detach(),
        "recon": terms.recon.detach(),
        "loss_minus_recon": (terms.total - terms.recon).detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, eps = _data()
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        results = {}
        for name, objective in OBJECTIVES.items():
            model = DistributedDataParallel(TinyVAE(x[0].numel()))
            result = _statistics_and_grads(model, x[local], eps[local], objective)
            result["grads"] = {n.removeprefix("module."): g for n, g in result["grads"].items()}
            results[name] = result
            del model, result
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Let gloo's threads finish and free their work (which needs the GIL) before the group goes:
        # destroyed while the main thread holds the GIL, it would wait for them forever.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_results():
    x, eps = _data()
    return {name: _statistics_and_grads(TinyVAE(x[0].numel()), x, eps, o) for name, o in OBJECTIVES.items()}


@pytest.mark.parametrize("likelihood", OBJECTIVES)
def test_gathered_statistics_equal_single_process(ddp_results, single_results, likelihood):
    single_result = single_results[likelihood]
    for rank_result in (r[likelihood] for r in ddp_results):
        torch.testing.assert_close(rank_result["cov"], single_result["cov"])
        torch.testing.assert_close(rank_result["free_bits"], single_result["free_bits"])
        torch.testing.assert_close(rank_result["tc"], single_result["tc"])
        torch.testing.assert_close(rank_result["loss_minus_recon"], single_result["loss_minus_recon"])
    # The floor must bind on some dimensions and not on others, or the test proves little.
    kl_dims, floor = single_result["kl_per_dim"], OBJECTIVES[likelihood].free_bits.floor
    assert (kl_dims < floor).any() and (kl_dims > floor).any()


@pytest.mark.parametrize("likelihood", OBJECTIVES)
def test_ranks_reconstruction_terms_average_to_single_process(ddp_results, single_results, likelihood):
    """Each rank's term is the mean over its own samples; with sigma_vae, at the global batch's sigma."""
    mean_over_ranks = torch.stack([r[likelihood]["recon"] for r in ddp_results]).mean()
    torch.testing.assert_close(mean_over_ranks, single_results[likelihood]["recon"])


def test_single_process_sigma_vae_term_is_the_pure_nll(single_results):
    """The single-process side of the comparison is the objective itself: Rybkin et al.'s NLL
    at the whole batch's sigma (checked against a float64 reimplementation in test_objectives)."""
    x, eps = _data()
    x_hat = TinyVAE(x[0].numel())(x, eps).x_hat.detach()
    torch.testing.assert_close(single_results["sigma_vae"]["recon"], obj.sigma_vae_nll(x_hat, x), rtol=0, atol=0)


@pytest.mark.parametrize("likelihood", OBJECTIVES)
def test_ddp_gradients_equal_single_process(ddp_results, single_results, likelihood):
    for rank_result in (r[likelihood] for r in ddp_results):
        for name, grad in single_results[likelihood]["grads"].items():
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


def test_sigma_from_the_local_batch_or_without_the_other_ranks_gradient_would_differ():
    """The reason for summing sigma's squared error over ranks with its gradient, emulated in one
    process: the mean over ranks of each rank's gradient equals the single-process gradient
    only if every rank's sigma comes from the global error, differentiable in every slice."""
    x, eps = _data()
    model = TinyVAE(x[0].numel())
    x_hat = model(x, eps).x_hat
    sse = [obj.sum_squared_error(h, t) for h, t in zip(x_hat.chunk(WORLD), x.chunk(WORLD))]

    def averaged_rank_gradient(sigma_statistic):
        """sigma_statistic(rank) -> (squared error, element count) that rank's sigma is taken from."""
        losses = [
            obj.shared_sigma_nll(s, obj.optimal_log_sigma(*sigma_statistic(r)), x[0].numel()) for r, s in enumerate(sse)
        ]
        return torch.autograd.grad(torch.stack(losses).mean(), model.dec.weight, retain_graph=True)[0]

    def other_detached(r):
        return sum(s.sum() if q == r else s.sum().detach() for q, s in enumerate(sse))

    (single,) = torch.autograd.grad(obj.sigma_vae_nll(x_hat, x), model.dec.weight, retain_graph=True)
    torch.testing.assert_close(averaged_rank_gradient(lambda r: (torch.cat(sse).sum(), x.numel())), single)
    local = averaged_rank_gradient(lambda r: (sse[r].sum(), x.numel() // WORLD))
    detached = averaged_rank_gradient(lambda r: (other_detached(r), x.numel()))
    assert not torch.allclose(local, single, rtol=1e-3) and not torch.allclose(detached, single, rtol=1e-3)
