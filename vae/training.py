"""The training loop of one experiment: plain PyTorch, the same for a local run and a Ray worker.

:func:`fit` runs epochs of a training pass (:func:`train_epoch`) and one validation pass
filling the collapse diagnostics (:func:`validate`), and reports one dict of metrics per
epoch under stable names. What a Ray worker does differently (DDP wrapping, distributed
samplers, reporting, where the checkpoint to resume from lives) comes in as :class:`Hooks`.

A run resumed at epoch k continues as if it had never stopped (bit for bit on the CPU):
the data order of epoch e depends only on (seed, e), schedules only on the epoch, and the
checkpoint holds every rank's random number generator states.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vae.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vae.config import ExperimentConfig, dump_experiment
from vae.data.subject_factors import FactorTable
from vae.dist import all_gather_objects, all_reduce_mean, all_reduce_sum, rank, world_size
from vae.evaluation.diagnostics import ValidationAccumulator
from vae.evaluation.probes import PROBE_KEYS, channel_probe_metrics, probe_key
from vae.loss import compute_loss
from vae.models import VAE, build_model
from vae.panels import reconstruction_panel, save_panel
from vae.run_files import (
    EPOCHS_CSV, LATENTS_JSONL, append_csv_row, append_json_line, drop_epochs_after, finite, finite_metrics,
    write_run_config,
)

# Reported per epoch after the diagnostics named first, in this order.
DIAGNOSTIC_KEYS = (
    "au_fraction", "kl_constrained", "kl_per_dim_max", "mi", "recon_zero", "z_sensitivity", "recon_mu_vs_z",
    "mu_var_mean", "channel_nats", "val_subjects", *PROBE_KEYS, "prior_kl", "prior_kl_dim_max", "logvar_mean", "z_std",
    "mu_max_offdiag_corr", "ssim_mean", "psnr_mean",
)
# Per latent dimension, written to latents.jsonl.
LATENT_KEYS = ("kl_per_dim", "mu_var_per_dim", "channel_nats_per_dim")
TRAIN_KEYS = ("loss", "recon", "kl_raw", "kl_constrained", "dip_penalty", "tc")
SCHEDULE_KEYS = ("kl_weight", "dip_weight", "tc_weight", "capacity")
# Per-step values in the order a divergence is looked for: the first non-finite one names it.
_STEP_VALUES = ("recon", "kl_raw", "kl_constrained", "dip_penalty", "tc", "loss", "grad_norm")
_DIVERGED_TERM = {
    "recon": "recon", "kl_raw": "kl", "kl_constrained": "kl", "dip_penalty": "dip", "tc": "tc",
    "loss": "loss", "grad_norm": "grad",
}
# Independent seed streams derived from train.seed.
_DATA_ORDER_STREAM, _NOISE_STREAM = 0, 1


# --------------------------------------------------------------------------- set-up


def unwrap(model: nn.Module) -> VAE:
    """The VAE inside a DDP (or other) wrapper."""
    return getattr(model, "module", model)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of forward passes: bfloat16, float16 (with a grad scaler) or None (float32)."""

    dtype: torch.dtype | None = None

    @staticmethod
    def choose(device: torch.device, mixed_precision: bool) -> Precision:
        """bfloat16 on a GPU that has it, float16 on an older one, float32 on the CPU or when off."""
        if not mixed_precision or device.type != "cuda":
            return Precision(None)
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @property
    def needs_scaler(self) -> bool:
        # Small float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, stream, index)``."""
    return int(np.random.SeedSequence([seed % 2**64, stream, index]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Indexed(Dataset):
    """``dataset``'s items as ``(item, index)``: a validation row stays tied to its subject whatever
    sampler (a DistributedSampler pads ranks with repeats) delivers it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index], index


def _volumes(batch: object, device: torch.device) -> torch.Tensor:
    if not torch.is_tensor(batch):
        raise TypeError(
            f"a batch must be one volume tensor [B, C, D, H, W], got a {type(batch).__name__}; "
            "make the dataset return a tensor [C, D, H, W] per item"
        )
    # Cached volumes arrive as float16 (half the bytes to move); the network computes in float32.
    return batch.to(device, non_blocking=True).float()


# --------------------------------------------------------------------------- one pass each


def first_nonfinite(values: torch.Tensor, names: Sequence[str]) -> str | None:
    """The first of ``names`` whose entry of ``values: [K]`` is non-finite on any rank, else None.

    Collective: every rank calls it at the same step and gets the same answer, so all
    ranks stop together (a rank that leaves alone hangs DDP's next all-reduce).
    """
    bad = all_reduce_sum((~torch.isfinite(values)).double())
    flagged = torch.nonzero(bad).flatten().tolist()
    return names[flagged[0]] if flagged else None


@dataclass(frozen=True)
class TrainPass:
    means: dict[str, float]  # the _STEP_VALUES (TRAIN_KEYS and grad_norm), averaged over steps and ranks
    volumes: int  # training volumes seen by all ranks together
    diverged_term: str | None  # recon, kl, dip, tc, loss or grad: what went non-finite first


def train_epoch(
    model: nn.Module,
    batches: Collection[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    epoch: int,
    dataset_size: int,
    precision: Precision = Precision(),
    scaler: torch.amp.GradScaler | None = None,
) -> TrainPass:
    """Train for one pass over ``batches`` ``[B, C, D, H, W]``; stops at the first non-finite step.

    Schedules see the fractional epoch ``epoch + i / steps``, so a resumed run follows
    exactly the same schedule as an uninterrupted one. A step whose loss or (unscaled)
    gradient is non-finite is not applied; the pass ends there with ``diverged_term``
    set. The loss means include that step; ``grad_norm`` (before clipping) averages the
    finite norms only. Under float16 a step skipped by the grad scaler is not a divergence.
    """
    model.train()
    device = next(model.parameters()).device
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    checked = _STEP_VALUES[:-1] if scaler.is_enabled() else _STEP_VALUES
    clip = cfg.optim.grad_clip_norm or math.inf
    steps = len(batches)
    if steps == 0:
        raise ValueError("no training batches: the training set must hold at least one volume")
    sums = torch.zeros(len(_STEP_VALUES), dtype=torch.float64, device=device)
    finite_grads = torch.zeros((), dtype=torch.float64, device=device)
    done, volumes, diverged = 0, 0, None
    for i, batch in enumerate(batches):
        x = _volumes(batch, device)
        with precision.autocast(device):
            out = model(x)
        terms = compute_loss(
            x, out.x_hat.float(), out.mu, out.logvar, out.z, cfg.objective,
            epoch=epoch + i / steps, total_epochs=cfg.train.epochs, dataset_size=dataset_size,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.unscale_(optimizer)  # clip and report the true gradient
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        losses = (terms.recon, terms.kl_raw, terms.kl_constrained, terms.dip_penalty, terms.tc, terms.total)
        values = torch.stack([t.detach().double() for t in (*losses, grad_norm)])  # in the order of _STEP_VALUES
        grad_ok = torch.isfinite(values[-1])
        sums[:-1] += values[:-1]
        sums[-1] += torch.where(grad_ok, values[-1], 0.0)
        finite_grads += grad_ok
        done, volumes = done + 1, volumes + len(x)
        diverged = first_nonfinite(values[: len(checked)], checked)
        if diverged is not None:
            break
        scaler.step(optimizer)
        scaler.update()
    means = sums / done
    means[-1] = sums[-1] / finite_grads.clamp(min=1)
    means = all_reduce_mean(means).tolist()
    return TrainPass(
        dict(zip(_STEP_VALUES, means)), volumes * world_size(),
        None if diverged is None else _DIVERGED_TERM[diverged],
    )


@dataclass(frozen=True)
class ValidationPass:
    metrics: dict  # ValidationAccumulator.result() plus val/loss, val/recon and SCHEDULE_KEYS
    example: tuple[torch.Tensor, ...] | None  # x, x_hat(mu), x_hat(z), x_hat(0) of the first volume, [C, D, H, W]
    posteriors: tuple[torch.Tensor, torch.Tensor] | None = None  # mu, logvar [N, z_dim] by item index (CPU)


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    cfg: ExperimentConfig,
    *,
    epoch: float,
    dataset_size: int,
    precision: Precision = Precision(),
    keep_example: bool = False,
    keep_posteriors: bool = False,
    factors: FactorTable | None = None,
) -> ValidationPass:
    """One pass over ``batches`` filling the diagnostics, reduced across ranks.

    A batch is ``[B, C, D, H, W]`` volumes, or ``(volumes, indices [B])`` from an :class:`Indexed`
    dataset (needed under DDP to tell a subject's row from a padding repeat).
    The same pass computes the training objective of ``x_hat(z)`` at the schedules'
    ``epoch`` (``val/loss``, ``val/recon``, batch-size weighted) and records the
    schedule weights in force there (``capacity`` 0 when capacity annealing is off).
    Every subject's ``mu`` and ``logvar`` are gathered from all ranks, once each, by item index:
    with ``factors`` (row i = item i) they feed the through-channel probes
    (:func:`vae.evaluation.probes.channel_probe_metrics`); with ``keep_posteriors`` they come back.
    With ``keep_example`` the first volume and its decodings come back on the CPU.
    """
    vae = unwrap(model)
    vae.eval()
    device = next(vae.parameters()).device
    fb = cfg.objective.free_bits
    acc = ValidationAccumulator(cfg.model.z_dim, free_bits_floor=fb.floor, free_bits_mode=fb.mode, seed=cfg.train.seed)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * B, recon * B, B
    example, terms, template, kept, seen = None, None, None, [], 0
    for batch in batches:
        batch, indices = batch if isinstance(batch, (tuple, list)) else (batch, torch.arange(seen, seen + len(batch)))
        seen += len(batch)
        x = _volumes(batch, device)
        with precision.autocast(device):
            mu, logvar = vae.encode(x)
            z = vae.reparameterize(mu, logvar)
            x_hat_mu, x_hat_z = vae.decode(mu), vae.decode(z)
            if template is None:  # in eval mode x_hat(0) is one volume for all: decode it once a pass
                template = vae.decode(torch.zeros_like(mu[:1]))
        x_hat_zero = template.expand_as(x_hat_mu)
        terms = compute_loss(
            x, x_hat_z.float(), mu, logvar, z, cfg.objective,
            epoch=epoch, total_epochs=cfg.train.epochs, dataset_size=dataset_size,
        )
        acc.update(x, x_hat_mu, x_hat_z, x_hat_zero, mu, logvar, z)
        sums += torch.stack([terms.total.double(), terms.recon.double(), sums.new_ones(())]) * len(x)
        if keep_example and example is None:
            example = tuple(t[0].float().cpu() for t in (x, x_hat_mu, x_hat_z, x_hat_zero))
        kept.append((torch.as_tensor(indices).cpu(), mu.float().cpu(), logvar.float().cpu()))
    acc.reduce()  # raises on every rank alike when some rank had no batch
    loss, recon, count = all_reduce_sum(sums).tolist()
    schedule = terms.scalars()
    metrics = acc.result() | {"val/loss": loss / count, "val/recon": recon / count}
    metrics |= {key: schedule.get(key, 0.0) for key in SCHEDULE_KEYS}
    mu, logvar = _gather_posteriors(kept)
    metrics["val_subjects"] = float(len(mu))  # what AU, MI and the probes rest on
    metrics |= channel_probe_metrics(mu.double().numpy(), logvar.double().numpy(), factors, seed=cfg.train.seed)
    return ValidationPass(metrics, example, (mu, logvar) if keep_posteriors else None)


def _gather_posteriors(kept: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(indices, mu, logvar)`` batches as ``mu, logvar: [N, z_dim]`` in index order, each
    index once (a DistributedSampler repeats items to even out the ranks). Collective."""
    parts = [part for rank_parts in all_gather_objects(kept) for part in rank_parts]
    indices, mu, logvar = (torch.cat(column) for column in zip(*parts))
    _, first = np.unique(indices.numpy(), return_index=True)  # sorted indices, first occurrence of each
    first = torch.from_numpy(first)
    return mu[first], logvar[first]


# --------------------------------------------------------------------------- one epoch's report


def reported_metrics(modalities: Sequence[str], factors: Sequence[str] = ()) -> tuple[str, ...]:
    """The numeric metrics every epoch reports, in the order :func:`epoch_metrics` reports them
    (the two text values, ``status`` and ``diverged_term``, are left out): what sweep objectives,
    stoppers and ASHA may name. ``factors`` are the validation set's factor names."""
    return (
        "epoch", "au", "kl_raw", "recon_mu", *DIAGNOSTIC_KEYS, *(probe_key(name) for name in factors),
        *(f"ssim/{name}" for name in modalities), *(f"psnr/{name}" for name in modalities),
        *(f"train/{key}" for key in TRAIN_KEYS), "val/loss", "val/recon", *SCHEDULE_KEYS,
        "grad_norm", "epoch_seconds", "volumes_per_second",
    )


def epoch_metrics(
    epoch: int,
    train: TrainPass,
    val: dict,
    modalities: Sequence[str],
    seconds: float,
    volumes_per_second: float,
    factors: Sequence[str] = (),
) -> dict[str, float | int | str]:
    """The metrics reported for ``epoch`` (1-based count of epochs run), with status "running".

    The first keys are the ones a Ray results table shows; diagnostics are unprefixed
    because stoppers and searches read them by those names.
    """
    metrics: dict[str, float | int | str] = {
        "epoch": epoch, "au": val["au"], "kl_raw": val["kl_raw"], "recon_mu": val["recon_mu"], "status": "running",
    }
    metrics |= {key: val[key] for key in DIAGNOSTIC_KEYS}
    metrics |= {probe_key(name): val[probe_key(name)] for name in factors}
    metrics |= {f"ssim/{name}": value for name, value in zip(modalities, val["ssim"])}
    metrics |= {f"psnr/{name}": value for name, value in zip(modalities, val["psnr"])}
    metrics |= {f"train/{key}": train.means[key] for key in TRAIN_KEYS}
    metrics |= {"val/loss": val["val/loss"], "val/recon": val["val/recon"]}
    metrics |= {key: val[key] for key in SCHEDULE_KEYS}
    return metrics | {
        "grad_norm": train.means["grad_norm"],
        "epoch_seconds": seconds,
        "volumes_per_second": volumes_per_second,
        "diverged_term": train.diverged_term or "",
    }


def progress_line(metrics: Mapping[str, float | int | str], epochs: int, z_dim: int) -> str:
    """One human line per epoch, e.g. ``epoch 3/20  AU 5/128  KL 12.3  recon(mu) 0.0412 ...``."""
    line = (
        f"epoch {metrics['epoch']}/{epochs}  AU {metrics['au']:.0f}/{z_dim}  KL {metrics['kl_raw']:.3g}  "
        f"recon(mu) {metrics['recon_mu']:.4g}  recon(0) {metrics['recon_zero']:.4g}  {metrics['epoch_seconds']:.1f} s"
    )
    if metrics["status"] == "diverged":
        line += f"  DIVERGED ({metrics['diverged_term']})"
    return line


# --------------------------------------------------------------------------- the loop


def _identity(module: nn.Module | DataLoader) -> nn.Module | DataLoader:
    return module


def _no_report(metrics: dict, checkpoint: Path | None) -> None:
    pass


def _no_checkpoint() -> Path | None:
    return None


def _rank_zero() -> bool:
    return rank() == 0


@dataclass(frozen=True)
class Hooks:
    """What differs between a local run and a Ray worker."""

    # Ray: ray.train.torch.prepare_model (DDP wrap, device move).
    prepare_model: Callable[[nn.Module], nn.Module] = _identity
    # Ray: ray.train.torch.prepare_data_loader (DistributedSampler, device move).
    prepare_loader: Callable[[DataLoader], DataLoader] = _identity
    # Called once per epoch on every rank with the metrics and the checkpoint directory
    # written that epoch (None on other epochs and ranks). Ray: ray.train.report.
    report: Callable[[dict, Path | None], None] = _no_report
    # Directory of the checkpoint to resume from. Ray: ray.train.get_checkpoint().
    latest_checkpoint: Callable[[], Path | None] = _no_checkpoint
    # Whether this process writes the files (epochs.csv, latents.jsonl, panels, checkpoints).
    is_chief: Callable[[], bool] = _rank_zero


@dataclass(frozen=True)
class FitOutcome:
    status: str  # "completed" | "diverged"
    epochs_run: int  # epochs completed in total, including those before a resume
    last: dict  # the last reported metrics


def _any_rank(flag: bool, device: torch.device) -> bool:
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


def _resume(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[int, dict]:
    """Load the checkpoint in ``directory`` into the training state; returns (epochs done, last metrics)."""
    state = load_checkpoint(directory)
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {directory} does not fit this experiment's model (model section, data.size or "
            f"data.modalities changed?); use a new run directory. {err}"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when written without float16 scaling
        scaler.load_state_dict(state["scaler"])
    # One state per rank; with another number of ranks exactness is lost anyway.
    rngs = state["rng"]
    set_rng_state(rngs[rank()] if len(rngs) == world_size() else rngs[0])
    return state["epoch"], state["metrics"]


def _write_epoch(run_dir: Path, cfg: ExperimentConfig, metrics: dict, val: ValidationPass, draw: bool) -> None:
    """The chief's files of one epoch: a row of epochs.csv, a line of latents.jsonl, maybe a panel."""
    append_csv_row(run_dir / EPOCHS_CSV, metrics)
    latents = {key: [finite(v) for v in val.metrics[key]] for key in LATENT_KEYS}
    append_json_line(run_dir / LATENTS_JSONL, {"epoch": metrics["epoch"], **latents})
    if draw:
        title = (
            f"{cfg.name}  epoch {metrics['epoch']}  AU {metrics['au']:.0f}/{cfg.model.z_dim}  "
            f"KL_raw {metrics['kl_raw']:.3g} nats"
        )
        save_panel(reconstruction_panel(*val.example, cfg.data.modalities, title), run_dir, metrics["epoch"])


def fit(
    cfg: ExperimentConfig,
    train_set: Dataset,
    val_set: Dataset,
    run_dir: Path,
    hooks: Hooks = Hooks(),
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> FitOutcome:
    """Train ``cfg`` for epochs ``[start, cfg.train.epochs)``, resuming from the latest checkpoint.

    The checkpoint comes from ``hooks.latest_checkpoint()``, else from ``run_dir/checkpoint``
    (a local re-run continues). Before the first epoch the chief writes ``run_dir/config.yaml``,
    the full experiment. Every epoch reports one metrics dict through ``hooks.report``
    (finite values only) and, on the chief, appends it to ``run_dir/epochs.csv``, the per-dim
    lists to ``latents.jsonl``, and writes a reconstruction panel after the first epoch and every
    ``train.image_every`` epochs and a checkpoint every ``train.checkpoint_every`` epochs,
    both also at the last epoch. A non-finite loss or gradient ends the run after a
    report with status "diverged"; the last good checkpoint stays.
    """
    run_dir = Path(run_dir)
    chief, epochs, seed = hooks.is_chief(), cfg.train.epochs, cfg.train.seed
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise ValueError(f"the {name} set is empty; fit needs at least one volume in each set")
    device = torch.device(device) if device is not None else default_device()
    precision = Precision.choose(device, cfg.train.mixed_precision)

    seed_everything(seed)  # the same initial weights on every rank
    model = hooks.prepare_model(build_model(cfg.model, cfg.in_channels, cfg.data.size).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    batch_size, workers = cfg.data.batch_size, cfg.data.num_workers
    data_order = torch.Generator()  # re-seeded from (seed, epoch) every epoch
    train_loader = hooks.prepare_loader(DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=data_order, num_workers=workers,
        # Whole batches keep batch statistics (TC, DIP, batch norm) sound, unless none would be left.
        drop_last=len(train_set) >= batch_size * world_size(), pin_memory=device.type == "cuda",
    ))
    factors = getattr(val_set, "factors", None)  # a FactorTable, row i = item i (CachedVolumes has one)
    factor_names = factors.names if factors is not None else ()
    val_loader = hooks.prepare_loader(DataLoader(
        Indexed(val_set), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
    ))
    seed_everything(derive_seed(seed, _NOISE_STREAM, rank()))  # each rank its own noise

    start, last = 0, {}
    resume_from = hooks.latest_checkpoint() or find_checkpoint(run_dir)
    if resume_from is not None:
        start, last = _resume(resume_from, model, optimizer, scaler)
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, dump_experiment(cfg))
        drop_epochs_after(run_dir, start)

    steps = len(train_loader)
    for epoch in range(start, epochs):
        data_order.manual_seed(derive_seed(seed, _DATA_ORDER_STREAM, epoch))
        for source in (getattr(train_loader, "sampler", None), train_set):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
        is_last = epoch + 1 == epochs
        # The first epoch too: a trial a sweep stops early still leaves a picture.
        draw = chief and (epoch == 0 or (epoch + 1) % cfg.train.image_every == 0 or is_last)

        began = time.perf_counter()
        train = train_epoch(model, train_loader, optimizer, cfg, epoch, len(train_set), precision, scaler)
        train_seconds = time.perf_counter() - began
        # Validated at the schedules' position of the epoch's last training step.
        val = validate(
            model, val_loader, cfg, epoch=epoch + (steps - 1) / steps, dataset_size=len(train_set),
            precision=precision, keep_example=draw, factors=factors,
        )
        seconds = time.perf_counter() - began

        metrics = epoch_metrics(
            epoch + 1, train, val.metrics, cfg.data.modalities, seconds, train.volumes / train_seconds, factor_names,
        )
        metrics, nonfinite_key = finite_metrics(metrics)
        diverged = _any_rank(train.diverged_term is not None or nonfinite_key is not None, device)
        if diverged:
            metrics["status"] = "diverged"
            metrics["diverged_term"] = metrics["diverged_term"] or nonfinite_key or "unknown"
        elif is_last:
            metrics["status"] = "completed"

        checkpoint = None
        if not diverged and ((epoch + 1) % cfg.train.checkpoint_every == 0 or is_last):
            rngs = all_gather_objects(rng_state())  # collective: on every rank
            if chief:
                checkpoint = save_checkpoint(run_dir, {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "rng": rngs,
                    "metrics": metrics,
                    "config": cfg.model_dump(mode="json"),
                })
        if chief:
            _write_epoch(run_dir, cfg, metrics, val, draw=draw and not diverged)
            if progress is not None:
                progress(progress_line(metrics, epochs, cfg.model.z_dim))
        hooks.report(metrics, checkpoint)
        last = metrics
        if diverged:
            return FitOutcome("diverged", epoch, metrics)
    return FitOutcome("completed", max(start, epochs), last)
