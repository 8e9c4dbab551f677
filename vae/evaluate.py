"""Score a trained run by what its latent code carries: ``evaluation.json`` and ``evaluation.png``.

    collapse-sweep evaluate results/dip_sbd/RUN/trials/trial-0003
    python -m vae.evaluate results/exp2_dipvae_sbd/run --data /data/cache64 --factors clinical.csv --out eval/

RUN_DIR is a trial folder of a sweep or the run folder of ``collapse-sweep train``: its
``config.yaml`` says what was trained and ``checkpoint/`` holds the weights. Every subject of
the data (the run's own, or ``--data``: a prepared cache or a NIfTI tree) is encoded once.
The factors are those ``prepare`` recorded from the segmentations (tumour log-volume,
centroid, sub-region fractions) and those of ``--factors``.

``evaluation.json``::

    {"subjects": N, "metrics": {...}, "factors": {NAME: {"probe_r2_z": .., "probe_r2_mu": ..,
     "mig": .., "dci_informativeness": .., "subjects": n}}}

``probe_r2_z`` (a ridge probe on samples of q(z|x), cross-validated over subjects: what passes
the channel) is the headline; ``probe_r2_mu`` reads the encoder's means (a collapsed encoder
can score there); ``metrics`` holds AU, the channel's nats per dimension and in all, MI, KL_raw,
the aggregate posterior against the prior, recon(mu), recon(0), z-sensitivity, and
``semantic_r2`` (the mean probe_r2_z over the tumour's location and size).

Exit status: 0 scored; 2 bad input (no run, config or checkpoint, a factor table that does not
fit the data), one line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from vae.checkpoint import find_checkpoint, load_checkpoint
from vae.config import ConfigError, ExperimentConfig, load_experiment
from vae.data import CachedVolumes, DataError, Manifest
from vae.data.sources import prepared_cache
from vae.data.subject_factors import Factors, FactorTable, merge_factors, read_factor_table
from vae.evaluation.factor_metrics import dci, mig_per_factor
from vae.evaluation.probes import MIN_SUBJECTS, SAMPLES, draw_samples, probe_r2, semantic_r2
from vae.models import build_model
from vae.panels import figure_png
from vae.run_files import CONFIG_YAML, atomic_write
from vae.training import default_device, validate

EVALUATION_JSON, EVALUATION_PNG = "evaluation.json", "evaluation.png"
EXIT_OK, EXIT_BAD_INPUT = 0, 2
METRICS = ("au", "channel_nats", "mi", "kl_raw", "prior_kl", "recon_mu", "recon_zero", "z_sensitivity")


# --------------------------------------------------------------------------- inputs


def run_experiment(run_dir: Path, data: str | None) -> ExperimentConfig:
    """The experiment ``run_dir`` trained (its ``config.yaml``), on ``data`` when given."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder; give a trial folder (results/<sweep>/<run>/trials/"
                          "trial-NNNN) or a run folder (results/<name>/run)")
    if not (run_dir / CONFIG_YAML).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_YAML}, so what it trained is unknown; give a trial or run folder "
                          "written by this version (it writes config.yaml before the first epoch)")
    overrides = [f"data.root={Path(data).expanduser().resolve()}"] if data else []
    return load_experiment(run_dir / CONFIG_YAML, overrides)


def trained_model(cfg: ExperimentConfig, run_dir: Path, device: torch.device) -> torch.nn.Module:
    """The model of ``cfg`` with the weights of ``run_dir``'s latest checkpoint, in eval mode."""
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir}: no checkpoint/ to evaluate; train the run for at least one checkpoint epoch")
    model = build_model(cfg.model, cfg.in_channels, cfg.data.size)
    try:
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
    except RuntimeError:
        raise ConfigError(f"{checkpoint}: its weights do not fit {run_dir / CONFIG_YAML}; was the config edited?") from None
    return model.to(device).eval()


def subject_factors(manifest: Manifest, factors_csv: str | Path | None) -> Factors:
    """Every subject's factors: the segmentations', with ``factors_csv`` added or overriding."""
    factors = manifest.factors
    if factors_csv is not None:
        factors = merge_factors(factors, read_factor_table(factors_csv), manifest.subject_ids, factors_csv)
    return factors


# --------------------------------------------------------------------------- scores


def factor_scores(mu: np.ndarray, z: np.ndarray, values: np.ndarray, seed: int) -> dict[str, Any]:
    """One factor's scores over the subjects where it is defined (``values`` NaN elsewhere)."""
    defined = np.isfinite(values)
    n = int(defined.sum())
    scores: dict[str, Any] = {"subjects": n}
    r2_z, predicted = probe_r2(z[defined], values[defined], seed=seed)
    r2_mu, _ = probe_r2(mu[defined], values[defined], seed=seed)
    scores |= {"probe_r2_z": r2_z, "probe_r2_mu": r2_mu}
    varies = n >= MIN_SUBJECTS and np.ptp(values[defined]) > 0
    scores["mig"] = float(mig_per_factor(mu[defined], values[defined, None])[0]) if varies else math.nan
    scores["dci_informativeness"] = dci(mu[defined], values[defined, None], seed=seed)["informativeness"] if varies \
        else math.nan
    scores["predicted"] = predicted  # out of fold, for the figure; not written
    return scores


def evaluate_run(
    run_dir: str | Path, data: str | None = None, factors_csv: str | Path | None = None, samples: int = SAMPLES,
    seed: int = 0, device: torch.device | None = None,
) -> tuple[dict[str, Any], Figure]:
    """The ``evaluation.json`` record of ``run_dir`` (see the module docstring) and its figure."""
    run_dir = Path(run_dir)
    cfg = run_experiment(run_dir, data)
    device = device or default_device()
    model = trained_model(cfg, run_dir, device)
    cache = prepared_cache(cfg.data, progress=False)
    manifest = Manifest.load(cache)
    factors = subject_factors(manifest, factors_csv)
    dataset = CachedVolumes(cache)  # every subject, in the manifest's order
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size)
    val = validate(model, loader, cfg, epoch=cfg.train.epochs - 1.0, dataset_size=len(dataset), keep_posteriors=True)
    mu, logvar = (t.double().numpy() for t in val.posteriors)
    z = draw_samples(mu, logvar, samples, seed)

    table = FactorTable.of(factors, dataset.ids) or FactorTable((), np.zeros((len(mu), 0)))
    scores = {name: factor_scores(mu, z, table.values[:, k], seed) for k, name in enumerate(table.names)}
    metrics = {key: val.metrics[key] for key in METRICS}
    metrics |= {"channel_nats_per_dim": val.metrics["channel_nats_per_dim"], "samples_per_subject": samples}
    metrics |= semantic_r2({name: s["probe_r2_z"] for name, s in scores.items()})
    record = {
        "run": str(run_dir.resolve()), "data": str(cache), "subjects": len(mu), "metrics": metrics,
        "factors": {name: {k: v for k, v in s.items() if k != "predicted"} for name, s in scores.items()},
    }
    return record, evaluation_figure(record, scores, table.values, table.names)


# --------------------------------------------------------------------------- the picture


def evaluation_figure(record: Mapping[str, Any], scores: Mapping[str, Any], table: np.ndarray,
                      names: Sequence[str]) -> Figure:
    """Per factor, the out-of-fold prediction from samples of z against the truth; then the channel
    information per latent dimension."""
    panels = len(names) + 1
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(3.6 * columns, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (k, name) in zip(axes, enumerate(names)):
        truth, predicted = table[:, k], np.full(len(table), np.nan)
        defined = np.isfinite(truth)
        predicted[defined] = scores[name]["predicted"]
        ax.scatter(truth, predicted, s=14, alpha=0.7)
        if defined.any():
            low, high = np.nanmin(truth), np.nanmax(truth)
            ax.plot([low, high], [low, high], color="0.5", lw=0.8)
        r2z, r2mu = scores[name]["probe_r2_z"], scores[name]["probe_r2_mu"]
        ax.set(title=f"{name}\nR² z {r2z:.2f} · μ {r2mu:.2f} (n={scores[name]['subjects']})", xlabel="truth",
               ylabel="probe on z samples")
        ax.title.set_fontsize(9)
    capacity = np.asarray(record["metrics"]["channel_nats_per_dim"])
    ax = axes[len(names)]
    ax.bar(np.arange(len(capacity)), capacity, color="#4c72b0")
    ax.set(title=f"channel, {record['metrics']['channel_nats']:.3g} nats in all", xlabel="latent dimension",
           ylabel="½ log(1 + Var μ / E σ²) (nats)")
    ax.title.set_fontsize(9)
    for ax in axes[panels:]:
        ax.set_axis_off()
    m = record["metrics"]
    fig.suptitle(f"{record['subjects']} subjects · AU {m['au']:.0f} · KL_raw {m['kl_raw']:.3g} nats · "
                 f"semantic R² {m['semantic_r2']:.2f}", fontsize=10)
    return fig


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trial folder or a run folder")
    parser.add_argument("--data", help="score on this data (a prepared cache or NIfTI tree) instead of the run's")
    parser.add_argument("--factors", type=Path, metavar="CSV", help="factors to add or override: subject + numbers")
    parser.add_argument("--out", type=Path, help="where evaluation.json and evaluation.png go (default RUN_DIR)")
    parser.add_argument("--samples", type=int, default=SAMPLES, help=f"z draws per subject (default {SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and the probes' folds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "collapse-sweep evaluate") -> int:
    args = parse_args(argv, prog)
    try:
        if args.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {args.samples}")
        record, figure = evaluate_run(args.run_dir, args.data, args.factors, args.samples, args.seed)
    except (ConfigError, DataError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / EVALUATION_JSON, (json.dumps(record, indent=1, allow_nan=True) + "\n").encode())
    atomic_write(out / EVALUATION_PNG, figure_png(figure))
    m = record["metrics"]
    print(f"{record['subjects']} subjects: semantic R² {m['semantic_r2']:.3f} (location {m['location_r2']:.3f}, "
          f"size {m['size_r2']:.3f}) through the channel; AU {m['au']:.0f}, {m['channel_nats']:.3g} nats, "
          f"KL_raw {m['kl_raw']:.3g}, recon(mu) {m['recon_mu']:.4g}; written to {out / EVALUATION_JSON}")
    if not record["factors"]:
        print("note: the data has no segmentation and no --factors table: only the code's own metrics were scored")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
