"""What a run writes besides checkpoints: ``epochs.csv``, ``latents.jsonl`` and reconstruction panels.

Also the two things every reported metrics dict goes through: :func:`finite_metrics`
(a NaN must never reach the sweep) and :func:`progress_line`.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
from matplotlib.figure import Figure

from vae.data.cache import atomic_write

EPOCHS_CSV = "epochs.csv"
CONFIG_YAML = "config.yaml"  # the run's full experiment, loadable by python -m trainables.train
LATENTS_JSONL = "latents.jsonl"
LATEST_PANEL = "recon_latest.png"
PANEL_ROWS = ("input", "x_hat(mu)", "x_hat(z)", "x_hat(0)")
# Stands in for a non-finite value: large enough to lose any comparison a search makes.
NONFINITE_SENTINEL = 1e30

Metrics = dict[str, float | int | str]


def finite(value: float) -> float:
    """``value``, or for NaN and +inf ``NONFINITE_SENTINEL``, for -inf its negative."""
    if math.isfinite(value):
        return value
    return -NONFINITE_SENTINEL if value == -math.inf else NONFINITE_SENTINEL


def finite_metrics(metrics: Mapping[str, float | int | str]) -> tuple[Metrics, str | None]:
    """``metrics`` with every non-finite float made :func:`finite`, and the first key that held one (or None).

    A NaN reported to Tune leaves the Optuna trial RUNNING forever and is never stopped by ASHA.
    """
    nonfinite = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    out = {key: finite(value) if key in nonfinite else value for key, value in metrics.items()}
    return out, nonfinite[0] if nonfinite else None


def progress_line(metrics: Mapping[str, float | int | str], epochs: int, z_dim: int) -> str:
    """One human line per epoch, e.g. ``epoch 3/20  AU 5/128  KL 12.3  recon(mu) 0.0412 ...``."""
    line = (
        f"epoch {metrics['epoch']}/{epochs}  AU {metrics['au']:.0f}/{z_dim}  KL {metrics['kl_raw']:.3g}  "
        f"recon(mu) {metrics['recon_mu']:.4g}  recon(0) {metrics['recon_zero']:.4g}  {metrics['epoch_seconds']:.1f} s"
    )
    if metrics["status"] == "diverged":
        line += f"  DIVERGED ({metrics['diverged_term']})"
    return line


# --------------------------------------------------------------------------- per-epoch logs


def write_run_config(run_dir: Path, yaml_text: str) -> None:
    """The run's ``config.yaml``: the experiment it trains, complete, so that it can be trained again."""
    header = f"# The experiment of this run; train it again with: python -m trainables.train {run_dir / CONFIG_YAML}\n"
    atomic_write(run_dir / CONFIG_YAML, (header + yaml_text).encode())


def append_csv_row(path: Path, row: Mapping[str, float | int | str]) -> None:
    """Append ``row`` to a CSV file whose header, written with its first row, fixes the columns."""
    if path.is_file() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        if header != list(row):
            raise ValueError(
                f"{path}: its columns differ from this run's metrics (a different experiment in the same "
                f"directory?); new or missing: {sorted(set(header) ^ set(row))}. Use a new run directory"
            )
        lines = [list(row.values())]
    else:
        lines = [list(row), list(row.values())]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(lines)
    with path.open("a") as f:
        f.write(text.getvalue())


def append_json_line(path: Path, record: Mapping) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def drop_epochs_after(run_dir: Path, epoch: int) -> None:
    """Remove the rows of epochs after ``epoch`` from ``epochs.csv`` and ``latents.jsonl``.

    A resumed run writes those epochs again; rewritten atomically, a file left without
    rows is removed.
    """
    def rewrite(path: Path, header: list[str], rows: list[str]) -> None:
        if rows:
            atomic_write(path, "".join(header + rows).encode())
        else:
            path.unlink()

    table = run_dir / EPOCHS_CSV
    if table.is_file():
        header, *rows = table.read_text().splitlines(keepends=True)
        column = next(csv.reader([header])).index("epoch")
        rewrite(table, [header], [row for row in rows if int(next(csv.reader([row]))[column]) <= epoch])
    latents = run_dir / LATENTS_JSONL
    if latents.is_file():
        lines = latents.read_text().splitlines(keepends=True)
        rewrite(latents, [], [line for line in lines if json.loads(line)["epoch"] <= epoch])


# --------------------------------------------------------------------------- pictures


def reconstruction_panel(
    x: torch.Tensor,
    x_hat_mu: torch.Tensor,
    x_hat_z: torch.Tensor,
    x_hat_zero: torch.Tensor,
    modalities: Sequence[str],
    title: str,
) -> Figure:
    """Mid axial slices of one volume and its three decodings; each volume is ``[C, X, Y, Z]``.

    Rows: input, x_hat(mu), x_hat(z), x_hat(0); one column per modality, all four on the
    grey scale of the input slice, so a decoder drawing the same template for every
    input (x_hat(mu) = x_hat(0)) is plain to see.
    """
    volumes = [t.detach().float().cpu() for t in (x, x_hat_mu, x_hat_z, x_hat_zero)]
    if x.ndim != 4 or any(v.shape != x.shape for v in volumes) or x.shape[0] != len(modalities):
        raise ValueError(
            f"expected four volumes [C, X, Y, Z] with C = {len(modalities)} modalities, "
            f"got shapes {[tuple(v.shape) for v in volumes]}"
        )
    columns, mid = len(modalities), x.shape[-1] // 2
    fig = Figure(figsize=(2.2 * columns, 9.2), layout="constrained")
    axes = fig.subplots(len(PANEL_ROWS), columns, squeeze=False)
    for col, modality in enumerate(modalities):
        reference = volumes[0][col, :, :, mid]
        scale = dict(vmin=float(reference.min()), vmax=float(reference.max()))
        for row, (label, volume) in enumerate(zip(PANEL_ROWS, volumes)):
            ax = axes[row, col]
            # [X, Y] shown with X across and Y (posterior to anterior) upwards.
            ax.imshow(volume[col, :, :, mid].T.numpy(), cmap="gray", origin="lower", **scale)
            ax.set_title(f"{label} {modality}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle(title)
    return fig


def save_panel(fig: Figure, run_dir: Path, epoch: int) -> Path:
    """Write ``run_dir/recon_epoch{epoch:04d}.png`` and the same image as ``recon_latest.png``."""
    path = run_dir / f"recon_epoch{epoch:04d}.png"
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write(path, png.getvalue())
    atomic_write(run_dir / LATEST_PANEL, png.getvalue())
    return path
