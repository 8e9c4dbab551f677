"""The training loop: per-epoch reports, logs, pictures, checkpoints, exact resume, divergence, DDP.

Tiny CPU runs: 16^3 volumes with 2 modalities (a moving blob and a mirrored, inverted
copy), z_dim 4, 4 base filters, depth 2.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from vae.config import ExperimentConfig
from vae.demo import moving_blob_volumes
from vae.panels import reconstruction_panel
from vae.run_files import NONFINITE_SENTINEL, finite_metrics
from vae.training import Hooks, fit, first_nonfinite

MODALITIES = ["t1c", "t2f"]
# The reported keys, in the promised order (written out here, not taken from the code).
EXPECTED_KEYS = [
    "epoch", "au", "kl_raw", "recon_mu", "status",
    "au_fraction", "kl_constrained", "kl_per_dim_max", "mi", "recon_zero", "z_sensitivity", "recon_mu_vs_z",
    "mu_var_mean", "channel_nats", "val_subjects", "semantic_r2", "location_r2", "size_r2", "probe_subjects", "prior_kl",
    "prior_kl_dim_max", "logvar_mean", "z_std", "mu_max_offdiag_corr", "ssim_mean",
    "psnr_mean", "ssim/t1c", "ssim/t2f", "psnr/t1c", "psnr/t2f",
    "train/loss", "train/recon", "train/kl_raw", "train/kl_constrained", "train/dip_penalty", "train/tc",
    "val/loss", "val/recon", "kl_weight", "dip_weight", "tc_weight", "capacity",
    "grad_norm", "epoch_seconds", "volumes_per_second", "diverged_term",
]
TIMING_KEYS = {"epoch_seconds", "volumes_per_second"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Convolutions this small gain nothing from a second thread and lose much on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Volumes(Dataset):
    """``[C, 16, 16, 16]`` tensors; item ``nan_item`` turns NaN from epoch ``nan_from_epoch`` on."""

    def __init__(self, volumes: torch.Tensor, nan_item: int | None = None, nan_from_epoch: int = 0):
        self.volumes, self.nan_item, self.nan_from_epoch, self.epoch = volumes, nan_item, nan_from_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.nan_item and self.epoch >= self.nan_from_epoch:
            return torch.full_like(self.volumes[index], math.nan)
        return self.volumes[index]


def datasets(nan_item: int | None = None, nan_from_epoch: int = 0) -> tuple[Volumes, Volumes]:
    blob, _ = moving_blob_volumes(12, size=16, seed=3)
    volumes = torch.cat([blob, -0.5 * blob.flip(-1)], dim=1)  # [12, 2, 16, 16, 16]
    return Volumes(volumes[:8], nan_item, nan_from_epoch), Volumes(volumes[8:])


def config(**train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "tiny",
        "data": {"size": 16, "modalities": MODALITIES, "batch_size": 2, "num_workers": 0},
        "model": {"z_dim": 4, "base_filters": 4, "max_filters": 8, "depth": 2, "norm_groups": 2},
        "objective": {"likelihood": "gaussian", "sigma2": 0.5, "dip": {"kind": "ii"}},
        "optim": {"lr": 1e-3},
        "train": {"seed": 7, "mixed_precision": False} | train,
    })


class Interrupted(Exception):
    """Stands for a worker killed after an epoch's report."""


class Recorder:
    """Hooks.report that keeps what it was given; raises after epoch ``interrupt_at``'s report."""

    def __init__(self, interrupt_at: int | None = None):
        self.metrics: list[dict] = []
        self.checkpoints: list[Path | None] = []
        self.interrupt_at = interrupt_at

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        self.metrics.append(dict(metrics))
        self.checkpoints.append(checkpoint)
        if metrics["epoch"] == self.interrupt_at:
            raise Interrupted(f"after epoch {self.interrupt_at}")


def numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not isinstance(v, str) and k not in TIMING_KEYS}


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """3 uninterrupted epochs, a checkpoint every 2 epochs (and at the end), pictures likewise."""
    run_dir = tmp_path_factory.mktemp("a")
    recorder, lines = Recorder(), []
    outcome = fit(config(epochs=3, checkpoint_every=2, image_every=2), *datasets(), run_dir,
                  Hooks(report=recorder), progress=lines.append)
    return run_dir, recorder, outcome, lines


def test_the_declared_metric_names_are_what_an_epoch_reports(run_a):
    """What sweeps may name (objectives, ASHA) is a declared list; a real epoch reports exactly it."""
    from vae.training import reported_metrics

    _, recorder, _, _ = run_a
    reported = tuple(key for key, value in recorder.metrics[0].items() if not isinstance(value, str))
    assert reported == reported_metrics(MODALITIES)


def test_every_epoch_reports_every_key_in_order_finite(run_a):
    _, recorder, outcome, _ = run_a
    assert [list(m) for m in recorder.metrics] == [EXPECTED_KEYS] * 3
    assert [m["epoch"] for m in recorder.metrics] == [1, 2, 3]
    assert [m["status"] for m in recorder.metrics] == ["running", "running", "completed"]
    for metrics in recorder.metrics:
        assert all(type(v) in (int, float) and math.isfinite(v) for v in numbers(metrics).values())
        assert metrics["diverged_term"] == ""
        assert metrics["epoch_seconds"] > 0 and metrics["volumes_per_second"] > 0
        # beta 1, DIP-II switched on from epoch 0, no beta-TCVAE weight, no capacity annealing.
        assert (metrics["kl_weight"], metrics["dip_weight"], metrics["tc_weight"], metrics["capacity"]) == (1, 1, 0, 0)
        assert metrics["au_fraction"] == metrics["au"] / 4  # of z_dim = 4
    assert outcome.status == "completed" and outcome.epochs_run == 3 and outcome.last == recorder.metrics[-1]


def test_report_gets_the_checkpoint_on_checkpoint_epochs(run_a):
    run_dir, recorder, _, _ = run_a
    assert recorder.checkpoints == [None, run_dir / "checkpoint", run_dir / "checkpoint"]


def test_epochs_csv_and_latents_hold_one_row_per_epoch(run_a):
    run_dir, recorder, _, _ = run_a
    rows = csv_rows(run_dir / "epochs.csv")
    assert len(rows) == 3 and list(rows[0]) == EXPECTED_KEYS
    for row, metrics in zip(rows, recorder.metrics):
        assert float(row["kl_raw"]) == metrics["kl_raw"] and row["status"] == metrics["status"]
    latents = [json.loads(line) for line in (run_dir / "latents.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in latents] == [1, 2, 3]
    for record, metrics in zip(latents, recorder.metrics):
        assert len(record["kl_per_dim"]) == len(record["mu_var_per_dim"]) == 4
        assert sum(record["kl_per_dim"]) == pytest.approx(metrics["kl_raw"], rel=1e-12)


def test_reconstruction_pictures_are_written(run_a):
    run_dir, _, _, _ = run_a
    assert sorted(p.name for p in run_dir.glob("recon_*.png")) == [  # the first epoch, every 2nd, the last
        "recon_epoch0001.png", "recon_epoch0002.png", "recon_epoch0003.png", "recon_latest.png"
    ]
    image = matplotlib.image.imread(run_dir / "recon_latest.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert (run_dir / "recon_latest.png").read_bytes() == (run_dir / "recon_epoch0003.png").read_bytes()


def test_progress_line_per_epoch(run_a):
    _, recorder, _, lines = run_a
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3  AU ") and f"/4  KL {recorder.metrics[0]['kl_raw']:.3g}" in lines[0]


def test_checkpoint_loads_with_weights_only(run_a):
    run_dir, recorder, _, _ = run_a
    state = torch.load(run_dir / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3
    assert state["metrics"] == recorder.metrics[-1]
    assert len(state["rng"]) == 1 and state["rng"][0]["torch"].dtype == torch.uint8
    assert state["optimizer"]["state"] and "encoder.mu_head.weight" in state["model"]
    assert state["config"]["model"]["z_dim"] == 4


def test_interrupted_run_resumes_bit_for_bit(run_a, tmp_path):
    """Interrupted after epoch 3's log row (last checkpoint: epoch 2), then resumed to 3 epochs.

    Pictures every epoch here (every 2 in run A): drawing must not move the random streams.
    """
    run_a_dir, run_a_reports, _, _ = run_a
    train_set, val_set = datasets()
    first = Recorder(interrupt_at=3)
    with pytest.raises(Interrupted):
        fit(config(epochs=4, checkpoint_every=2, image_every=1), train_set, val_set, tmp_path, Hooks(report=first))
    assert [r["epoch"] for r in csv_rows(tmp_path / "epochs.csv")] == ["1", "2", "3"]

    second = Recorder()
    outcome = fit(config(epochs=3, checkpoint_every=2, image_every=1), train_set, val_set, tmp_path,
                  Hooks(report=second))
    assert [m["epoch"] for m in second.metrics] == [3]
    assert outcome.status == "completed" and outcome.epochs_run == 3
    resumed, uninterrupted = numbers(second.metrics[0]), numbers(run_a_reports.metrics[2])
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=1e-8)
    rows = csv_rows(tmp_path / "epochs.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["status"] for r in rows] == ["running", "running", "completed"]
    assert len((tmp_path / "latents.jsonl").read_text().splitlines()) == 3
    # A finished run given again does nothing more.
    again = Recorder()
    repeat = fit(config(epochs=3), train_set, val_set, tmp_path, Hooks(report=again))
    assert again.metrics == [] and repeat.epochs_run == 3 and repeat.last == second.metrics[0]


def test_nan_in_the_data_ends_the_run_as_diverged(tmp_path):
    # Item 5 turns NaN in the second epoch, after a good epoch and its checkpoint.
    recorder = Recorder()
    outcome = fit(config(epochs=3, checkpoint_every=1), *datasets(nan_item=5, nan_from_epoch=1), tmp_path,
                  Hooks(report=recorder))
    assert outcome.status == "diverged" and outcome.epochs_run == 1
    assert [m["status"] for m in recorder.metrics] == ["running", "diverged"]
    last = recorder.metrics[-1]
    assert outcome.last == last and last["epoch"] == 2
    # NaN voxels reach the reconstruction term before anything else.
    assert last["diverged_term"] == "recon"
    assert all(math.isfinite(v) for v in numbers(last).values())
    assert last["train/recon"] == NONFINITE_SENTINEL
    assert recorder.checkpoints == [tmp_path / "checkpoint", None]
    state = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert [r["status"] for r in csv_rows(tmp_path / "epochs.csv")] == ["running", "diverged"]


def test_finite_metrics_replaces_nonfinite_values():
    metrics = {"a": 1.5, "b": math.nan, "c": -math.inf, "d": math.inf, "epoch": 3, "status": "running"}
    finite, first_bad = finite_metrics(metrics)
    assert finite == {"a": 1.5, "b": 1e30, "c": -1e30, "d": 1e30, "epoch": 3, "status": "running"}
    assert first_bad == "b"
    assert finite_metrics({"a": 0.0})[1] is None


def test_reconstruction_panel_is_four_rows_by_modalities():
    g = torch.Generator().manual_seed(0)
    volumes = [torch.randn(3, 8, 8, 8, generator=g) for _ in range(4)]
    fig = reconstruction_panel(*volumes, ["t1c", "t2w", "t2f"], "epoch 1")
    assert len(fig.axes) == 12
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (4, 3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["input t1c", "input t2w", "input t2f"] and titles[-1] == "x_hat(0) t2f"
    # Row 2, column 1 shows the mid axial slice of x_hat(mu), modality t2w, on the input's scale.
    shown = fig.axes[4].get_images()[0]
    np.testing.assert_array_equal(shown.get_array(), volumes[1][1, :, :, 4].T.numpy())
    assert shown.get_clim() == (float(volumes[0][1, :, :, 4].min()), float(volumes[0][1, :, :, 4].max()))
    with pytest.raises(ValueError, match="C = 2 modalities"):
        reconstruction_panel(*volumes, ["t1c", "t2w"], "epoch 1")


def test_batches_must_be_tensors(tmp_path):
    train_set, val_set = datasets()
    pairs = [(v, 0) for v in train_set.volumes]
    with pytest.raises(TypeError, match="one volume tensor"):
        fit(config(epochs=1), pairs, val_set, tmp_path)


# --------------------------------------------------------------------------- DDP: 2 gloo processes

WORLD = 2


def _distributed_loader(loader: DataLoader) -> DataLoader:
    sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=0)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last)


def _ddp_worker(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # The collective decision itself: only rank 1 sees a NaN "tc" (and an inf "loss").
        values = torch.ones(4) if rank == 0 else torch.tensor([1.0, math.nan, math.inf, 1.0])
        agreed = first_nonfinite(values, ["recon", "tc", "loss", "grad"])
        nothing = first_nonfinite(torch.ones(4), ["recon", "tc", "loss", "grad"])

        # A whole fit: item 5 (on one rank only) turns NaN in the second epoch.
        recorder = Recorder()
        hooks = Hooks(prepare_model=DistributedDataParallel, prepare_loader=_distributed_loader, report=recorder)
        outcome = fit(config(epochs=3, checkpoint_every=1), *datasets(nan_item=5, nan_from_epoch=1),
                      Path(run_dir), hooks)
        record = {
            "agreed": agreed, "nothing": nothing, "status": outcome.status, "epochs_run": outcome.epochs_run,
            "reports": [[m["epoch"], m["status"], m["diverged_term"]] for m in recorder.metrics],
            "checkpoints": [c is not None for c in recorder.checkpoints],
            "finite": all(math.isfinite(v) for m in recorder.metrics for v in numbers(m).values()),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def run_ranks(worker, *args: str) -> None:
    """``worker(rank, *args)`` in WORLD spawned processes; a rank still waiting after 120 s fails the test."""
    context = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 120 s: a rank is waiting in a collective")


def test_ddp_divergence_stops_every_rank_together(tmp_path):
    run_ranks(_ddp_worker, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for record in ranks:
        assert record["agreed"] == "tc" and record["nothing"] is None
        assert record["status"] == "diverged" and record["epochs_run"] == 1 and record["finite"]
        assert record["reports"] == ranks[0]["reports"]
    assert [r[1] for r in ranks[0]["reports"]] == ["running", "diverged"]
    assert ranks[0]["reports"][1][2] in {"recon", "kl", "dip", "tc", "loss", "grad"}
    # Only the chief writes checkpoints and logs.
    assert ranks[0]["checkpoints"] == [True, False] and ranks[1]["checkpoints"] == [False, False]
    assert len(csv_rows(tmp_path / "run" / "epochs.csv")) == 2
    assert os.path.isfile(tmp_path / "run" / "checkpoint" / "checkpoint.pt")


# --------------------------------------------------------------------------- probes per epoch, under DDP

PROBED = 7  # validation subjects: 2 ranks get 4 each, one of them a padding repeat


def _probe_set() -> tuple[Volumes, torch.nn.Module]:
    """7 blob volumes whose blob centre is their factor table, and an untrained tiny model."""
    from vae.data.subject_factors import FactorTable
    from vae.models import build_model

    blob, centres = moving_blob_volumes(PROBED, size=16, seed=5)
    volumes = Volumes(torch.cat([blob, -0.5 * blob.flip(-1)], dim=1))
    volumes.factors = FactorTable(("tumour_centroid_x", "tumour_centroid_y", "tumour_log_volume"),
                                  np.column_stack([centres[:, :2].numpy(), np.arange(PROBED, dtype=float)]))
    cfg = config(epochs=1)
    torch.manual_seed(0)
    return volumes, build_model(cfg.model, cfg.in_channels, cfg.data.size)


def _validate_probes(loader: DataLoader, volumes: Volumes, model: torch.nn.Module) -> dict:
    from vae.training import validate

    val = validate(model, loader, config(epochs=1), epoch=0.0, dataset_size=8, factors=volumes.factors,
                   keep_posteriors=True)
    return {"metrics": {k: v for k, v in val.metrics.items() if k.startswith("probe") or k.endswith("_r2")},
            "val_subjects": val.metrics["val_subjects"], "mu": val.posteriors[0].tolist()}


def _probe_worker(rank: int, init_file: str, out_dir: str) -> None:
    from vae.training import Indexed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        volumes, model = _probe_set()
        loader = _distributed_loader(DataLoader(Indexed(volumes), batch_size=2))
        Path(out_dir, f"probe{rank}.json").write_text(json.dumps(_validate_probes(loader, volumes, model)))
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_validation_probes_under_ddp_count_each_subject_once(tmp_path):
    """Padding repeats a subject on one rank: the gathered posteriors hold each subject once, in item
    order, so the probes equal one process's over the same 7 subjects."""
    from vae.training import Indexed

    run_ranks(_probe_worker, str(tmp_path / "init"), str(tmp_path))
    volumes, model = _probe_set()
    single = _validate_probes(DataLoader(Indexed(volumes), batch_size=3), volumes, model)
    for r in range(WORLD):
        ranked = json.loads((tmp_path / f"probe{r}.json").read_text())
        assert len(ranked["mu"]) == PROBED
        assert np.allclose(ranked["mu"], single["mu"], atol=1e-6)
        assert ranked["metrics"] == pytest.approx(single["metrics"], abs=1e-6)  # float32 codes from other batches
        assert ranked["val_subjects"] == PROBED  # not the 8 rows the two ranks saw
    metrics = single["metrics"]
    assert metrics["probe_subjects"] == PROBED
    assert single["val_subjects"] == PROBED
    assert set(metrics) == {"semantic_r2", "location_r2", "size_r2", "probe_subjects", "probe_r2/tumour_centroid_x",
                            "probe_r2/tumour_centroid_y", "probe_r2/tumour_log_volume"}
    assert metrics["location_r2"] == pytest.approx(
        (metrics["probe_r2/tumour_centroid_x"] + metrics["probe_r2/tumour_centroid_y"]) / 2)
