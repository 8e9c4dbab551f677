"""The Ray trainable end to end on a small phantom: Tune runs of a sound and a diverging
objective, on one worker (fast tier) and on two DDP workers (system tier), the single-run
CLI killed and resumed (system tier), and the pure parts (trial config, resources) on their own.

Ray needs short socket paths and, since 2.60, a token file: every Ray instance here lives
in its own short folder under /tmp. The module shares one instance for the in-process
runs; each CLI run starts (and ends) its own.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.chaos import session_members
from helpers import ray_folder, wait_for
from trainables import (
    DRIVER_CPU, ResourceError, TrialResources, max_concurrent_trials, parse_trial_config, train_trial, trial_config,
    trial_resources,
)
from vae.config import ConfigError, ExperimentConfig, deep_merge
from vae.data.sources import prepared_cache

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
SIZE = 16
# What every epoch reports; the first five lead the report in this order.
FIRST_KEYS = ["epoch", "au", "kl_raw", "recon_mu", "status"]
KEYS = FIRST_KEYS + [
    "au_fraction", "kl_constrained", "mi", "recon_zero", "z_sensitivity", "mu_var_mean", "mu_max_offdiag_corr",
    "train/loss", "train/dip_penalty", "val/loss", "kl_weight", "dip_weight", "grad_norm", "epoch_seconds",
    "volumes_per_second", "diverged_term",
]
# Validation diagnostics that depend on the posterior means only (no sampling noise).
MEAN_DIAGNOSTICS = ["kl_raw", "mu_var_mean", "mu_max_offdiag_corr", "recon_mu", "recon_zero"]
SOUND, OVERFLOWING = 1.0, 1e-38  # objective.sigma2; (x - x_hat)^2 / 2e-38 overflows float32 in the first step


def small_experiment(cache_dir: Path, **sections) -> ExperimentConfig:
    """16^3 phantom, 2 modalities, 8 subjects split 4/4 (so 2 ranks see 2 validation volumes each)."""
    raw = {
        "name": "tiny",
        "data": {
            "size": SIZE, "modalities": ["t1c", "t2f"], "batch_size": 2, "val_fraction": 0.5, "num_workers": 0,
            "cache_dir": str(cache_dir), "phantom": {"subjects": 8},
        },
        "model": {"z_dim": 4, "base_filters": 4, "depth": 2, "norm_groups": 2},
        "objective": {"likelihood": "gaussian"},
        "optim": {"lr": 1e-12},  # the weights barely move: 1 and 2 workers see the same model
        "train": {"epochs": EPOCHS, "checkpoint_every": 1, "image_every": 1, "mixed_precision": False, "seed": 3},
    }
    return ExperimentConfig.model_validate(deep_merge(raw, sections))


@pytest.fixture(scope="module")
def cache(scratch) -> Path:
    return prepared_cache(small_experiment(scratch / "cache").data)


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    env = ray_folder()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        # Logical CPUs beyond the cores: all four trials (1 + 1 + 2 x 2 workers, 0.99 CPU each) run at once.
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def tune_trials(workers: int, cache: Path, scratch: Path) -> dict:
    """One Tuner of two trials on ``workers`` workers each: objective.sigma2 in (SOUND, OVERFLOWING)."""
    from ray import tune

    cfg = small_experiment(scratch / "cache")
    config = trial_config(
        cfg, cache, scratch / "runs", TrialResources(workers=workers, cpus_per_worker=0.99),
        overrides={"objective.sigma2": tune.grid_search([SOUND, OVERFLOWING])},
    )
    grid = tune.Tuner(
        tune.with_resources(train_trial, trial_resources),
        param_space=config,
        run_config=tune.RunConfig(name=f"sweep-{workers}", storage_path=str(scratch / "tune"), verbose=0),
    ).fit()
    assert grid.num_errors == 0, [r.error for r in grid]
    assert grid.num_terminated == 2
    return {(workers, r.config["overrides"]["objective.sigma2"]): r for r in grid}


@pytest.fixture(scope="module")
def one_worker(ray_instance, cache, scratch):
    return tune_trials(1, cache, scratch)


@pytest.fixture(scope="module")
def two_workers(ray_instance, cache, scratch):
    return tune_trials(2, cache, scratch)


@pytest.fixture
def sweep(request, scratch):
    """``(results, run_root)`` of the trials with the test's ``workers`` (its parameter)."""
    fixture = "one_worker" if request.node.callspec.params["workers"] == 1 else "two_workers"
    return request.getfixturevalue(fixture), scratch / "runs"


WORKERS = [1, pytest.param(2, marks=pytest.mark.system)]


def run_dir_of(result, run_root: Path) -> Path:
    return run_root / result.metrics["trial_id"]


def read_epochs(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run_dir / "epochs.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


# --------------------------------------------------------------------------- Tune runs


@pytest.mark.parametrize("workers", WORKERS)
def test_every_epoch_reports_every_key(sweep, workers):
    results, run_root = sweep
    result = results[(workers, SOUND)]
    frame = result.metrics_dataframe
    assert frame["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert frame["status"].tolist() == ["running"] * (EPOCHS - 1) + ["completed"]
    for key in KEYS:
        assert key in frame and frame[key].notna().all(), key
    numbers = frame[[k for k in KEYS if k not in ("status", "diverged_term")]].to_numpy(dtype=float)
    assert np.isfinite(numbers).all()

    header, rows = read_epochs(run_dir_of(result, run_root))
    assert header[: len(FIRST_KEYS)] == FIRST_KEYS and set(KEYS) <= set(header)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [float(r["kl_raw"]) for r in rows] == pytest.approx(frame["kl_raw"].tolist(), rel=1e-12)


@pytest.mark.system
def test_two_workers_go_through_ray_train(two_workers, scratch):
    results, run_root = two_workers, scratch / "runs"
    result = results[(2, SOUND)]
    # TuneReportCallback adds where Ray Train stored each checkpoint.
    assert all(Path(p).is_relative_to(run_root / "ray_train") for p in result.metrics_dataframe["checkpoint_path"])
    assert (run_root / "ray_train" / f"train-{result.metrics['trial_id']}").is_dir()


@pytest.mark.system
def test_two_workers_reduce_diagnostics_over_all_validation_volumes(one_worker, two_workers):
    """Each rank validates half of the 4 volumes; reduced, the diagnostics equal one process's."""
    one, two = (results[(w, SOUND)].metrics_dataframe for w, results in ((1, one_worker), (2, two_workers)))
    assert two["au"].tolist() == one["au"].tolist()
    for key in MEAN_DIAGNOSTICS:
        assert two[key].to_numpy() == pytest.approx(one[key].to_numpy(), rel=1e-4, abs=1e-7), key
    # Not trivially equal: the statistics are of 4 volumes, not of rank 0's 2.
    assert one["mu_max_offdiag_corr"].abs().max() < 1 - 1e-6


@pytest.mark.parametrize("workers", WORKERS)
def test_overflowing_loss_ends_trial_as_diverged(sweep, workers):
    results, run_root = sweep
    result = results[(workers, OVERFLOWING)]
    assert result.error is None
    frame = result.metrics_dataframe
    assert frame["epoch"].tolist() == [1]
    assert result.metrics["status"] == "diverged" and result.metrics["diverged_term"] == "recon"
    numbers = frame[[k for k in KEYS if k not in ("status", "diverged_term")]].to_numpy(dtype=float)
    assert np.isfinite(numbers).all()  # never a NaN or inf to Tune
    _, rows = read_epochs(run_dir_of(result, run_root))
    assert [r["status"] for r in rows] == ["diverged"]


def test_reconstruction_panel_has_four_rows(one_worker, scratch, tmp_path):
    from matplotlib.image import imread

    from vae.panels import reconstruction_panel, save_panel

    results, run_root = one_worker, scratch / "runs"
    image = imread(run_dir_of(results[(1, SOUND)], run_root) / "recon_latest.png")
    # The same panel drawn directly: 4 rows (input, x_hat(mu), x_hat(z), x_hat(0)) x 2 modalities.
    volume = torch.zeros(2, SIZE, SIZE, SIZE)
    figure = reconstruction_panel(volume, volume, volume, volume, ["t1c", "t2f"], "reference")
    assert len(figure.axes) == 4 * 2
    assert image.shape == imread(save_panel(figure, tmp_path, 1)).shape


# --------------------------------------------------------------------------- single-run CLI


def cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainables.single_run", *args], cwd=REPO, env={**os.environ, **env},
        text=True, start_new_session=True, **kwargs,
    )


def write_experiment(path: Path, cfg: ExperimentConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def printed_epochs(text: str) -> list[int]:
    return [int(line.split()[1].split("/")[0]) for line in text.splitlines() if line.startswith("epoch ")]


@pytest.mark.system
def test_cli_run_resumes_after_its_trial_and_then_itself_are_killed(cache, scratch):
    """A crashed trial is retried by Tune from its checkpoint; a killed CLI resumes when run again."""
    epochs = 20
    cfg = small_experiment(scratch / "cache", name="killed", train={"epochs": epochs, "image_every": 10})
    experiment = write_experiment(scratch / "killed.yaml", cfg)
    args = [str(experiment), "--results", str(scratch / "results"), "--no-dashboard", "--max-failures", "1"]
    run_dir = scratch / "results" / "killed" / "run"
    epochs_done = lambda: len(read_epochs(run_dir)[1]) if (run_dir / "epochs.csv").is_file() else 0
    env, log = ray_folder(), scratch / "first.log"

    with log.open("w") as out:
        first = cli(args, env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Tune has received epoch 1 with its checkpoint (the CLI printed it): the retry resumes after it.
            wait_for(lambda: printed_epochs(log.read_text()) and (run_dir / "checkpoint" / "checkpoint.pt").is_file(),
                     first, log)
            trials = [pid for pid, command in session_members(first.pid) if command.startswith("ray::ImplicitFunc")]
            assert len(trials) == 1
            os.kill(trials[0], signal.SIGKILL)  # the trial's process: Tune retries it (--max-failures 1)
            killed_at = epochs_done()
            wait_for(lambda: epochs_done() >= killed_at + 2, first, log)
            os.killpg(first.pid, signal.SIGKILL)  # now the CLI with its local Ray instance
            first.wait()
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while session_members(first.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_members(first.pid) == []  # Ray's processes went with the CLI
    printed = printed_epochs(log.read_text())
    assert printed[0] == 1 and printed.count(1) == 1 and printed == sorted(printed)  # the retry did not start over
    done_before = epochs_done()
    assert done_before < epochs

    second = cli(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err[-3000:]
    printed = printed_epochs(out)
    assert 2 <= printed[0] <= done_before + 1 and printed[-1] == epochs  # resumed, not started over
    _, rows = read_epochs(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # each epoch once
    assert rows[-1]["status"] == "completed"
    assert f"completed after {epochs}/{epochs} epochs" in out
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_cli_bad_config_exits_2_with_one_line(scratch):
    experiment = write_experiment(scratch / "bad.yaml", small_experiment(scratch / "cache"))
    proc = cli([str(experiment), "model.z_dimm=3"], {}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "z_dimm" in err and "Traceback" not in err


def test_cli_flags_win_over_overrides(scratch):
    from trainables.single_run import experiment_from_args, parse_args, resources_from_args

    experiment = write_experiment(scratch / "flags.yaml", small_experiment(scratch / "cache"))
    args = parse_args([str(experiment), "train.epochs=9", "model.z_dim=6", "--epochs", "5", "--size", "32",
                       "--workers", "2", "--gpus-per-worker", "0.5"])
    cfg = experiment_from_args(args)
    assert (cfg.train.epochs, cfg.data.size, cfg.model.z_dim) == (5, 32, 6)
    assert resources_from_args(args) == TrialResources(workers=2, use_gpu=True, gpus_per_worker=0.5)



def test_overrides_may_come_anywhere_on_the_line(scratch):
    from trainables.single_run import experiment_from_args, parse_args

    experiment = write_experiment(scratch / "anywhere.yaml", small_experiment(scratch / "cache"))
    for argv in ([str(experiment), "--epochs", "2", "data.size=32"], [str(experiment), "data.size=32", "--epochs", "2"],
                 ["--epochs", "2", str(experiment), "data.size=32"]):
        cfg = experiment_from_args(parse_args(argv))
        assert (cfg.train.epochs, cfg.data.size) == (2, 32), argv


# --------------------------------------------------------------------------- trial config


def test_trial_config_round_trip_applies_overrides(tmp_path):
    cfg = small_experiment(tmp_path)
    config = trial_config(
        cfg, tmp_path / "cache", tmp_path / "runs", TrialResources(workers=2), {"objective.kl.beta": 0.3}
    )
    spec = parse_trial_config(config)
    assert spec.experiment.objective.kl.beta == 0.3
    assert spec.experiment.model_copy(update={"objective": cfg.objective}) == cfg
    assert spec.resources == TrialResources(workers=2)
    assert spec.run_dir("abc_00001") == (tmp_path / "runs" / "abc_00001").resolve()


@pytest.mark.parametrize("change, named", [
    ({"overrides": {"objective.kl.betta": 0.3}}, "betta"),
    ({"overrides": {"model.z_dim": -1}}, "model.z_dim"),
    ({"workers": 0}, "workers"),
    ({"gpu": 1}, "gpu"),
    ({"overrides": [("model.z_dim", 8)]}, "overrides"),
])
def test_bad_trial_config_names_the_key(tmp_path, change, named):
    config = trial_config(small_experiment(tmp_path), tmp_path, tmp_path) | change
    with pytest.raises(ConfigError, match=named):
        parse_trial_config(config)


def test_trial_config_validates_plain_overrides_at_once(tmp_path):
    with pytest.raises(ConfigError, match="betta"):
        trial_config(small_experiment(tmp_path), tmp_path, tmp_path, overrides={"objective.kl.betta": 0.3})


def test_trial_without_name_or_id_has_no_run_dir(tmp_path):
    spec = parse_trial_config(trial_config(small_experiment(tmp_path), tmp_path, tmp_path))
    with pytest.raises(ValueError, match="trial id"):
        spec.run_dir()


# --------------------------------------------------------------------------- resources


def test_trial_actor_holds_the_worker_or_a_token_cpu():
    one = TrialResources(workers=1, use_gpu=True, cpus_per_worker=4, gpus_per_worker=0.5)
    assert one.bundles == [{"CPU": 4.0, "GPU": 0.5}]
    two = TrialResources(workers=2, cpus_per_worker=3)
    assert two.bundles == [{"CPU": DRIVER_CPU}, {"CPU": 3.0}, {"CPU": 3.0}]
    assert two.placement().bundles == [{"CPU": DRIVER_CPU}]


@pytest.mark.parametrize("resources, nodes, expected", [
    # 2 cores: 2 workers x 0.99 CPU + the driver fit (1.99); at 1 CPU each they do not (2.01).
    (TrialResources(workers=2, cpus_per_worker=0.99), [{"CPU": 2}], 1),
    (TrialResources(workers=1, cpus_per_worker=1), [{"CPU": 2}], 2),
    # The GPUs would allow 4 trials of 2 x 1 GPU, the CPUs only 1: 2 x (8 + 0.01) > 16.
    (TrialResources(workers=2, use_gpu=True, cpus_per_worker=4, gpus_per_worker=1), [{"CPU": 16, "GPU": 8}], 1),
    # A tenth of a GPU each: exactly 10 on one GPU (no floating-point shortfall), 20 on two nodes.
    (TrialResources(use_gpu=True, cpus_per_worker=0.1, gpus_per_worker=0.1), [{"CPU": 4, "GPU": 1}], 10),
    (TrialResources(use_gpu=True, cpus_per_worker=0.1, gpus_per_worker=0.1), [{"CPU": 4, "GPU": 1}] * 2, 20),
    # Workers of one trial may spread over nodes (PACK is a preference).
    (TrialResources(workers=4, use_gpu=True, cpus_per_worker=1, gpus_per_worker=1), [{"CPU": 8, "GPU": 2}] * 2, 1),
])
def test_max_concurrent_trials(resources, nodes, expected):
    assert max_concurrent_trials(resources, nodes) == expected


def test_a_worker_bigger_than_every_node_is_refused():
    with pytest.raises(ResourceError, match=r"asks for 1 CPU, 2 GPU but the largest node offers 8 CPU, 1 GPU"):
        max_concurrent_trials(TrialResources(use_gpu=True, gpus_per_worker=2), [{"CPU": 8, "GPU": 1}, {"CPU": 2}])


def test_a_trial_bigger_than_the_cluster_is_refused():
    with pytest.raises(ResourceError, match="2 workers plus its driver"):
        max_concurrent_trials(TrialResources(workers=2, cpus_per_worker=1), [{"CPU": 2}])


@pytest.mark.parametrize(
    "field, value", [("workers", 0), ("workers", 1.5), ("cpus_per_worker", 0), ("max_failures", -1)]
)
def test_resources_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrialResources(**{field: value})


def test_fractional_gpu_needs_use_gpu_to_count():
    assert "GPU" not in TrialResources(use_gpu=False, gpus_per_worker=0.5).worker_bundle
    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrialResources(use_gpu=True, gpus_per_worker=0)
