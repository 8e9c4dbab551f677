"""Reconstruction panels: mid slices of one validation volume and its decodings x_hat(mu), x_hat(z), x_hat(0).

A run writes ``recon_epochNNNN.png`` after its first epoch, every ``train.image_every`` epochs
and at the end, each also as ``recon_latest.png``; the sweep's report shows the latest one.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure

from vae.run_files import atomic_write

LATEST_PANEL = "recon_latest.png"
PANEL_ROWS = ("input", "x_hat(mu)", "x_hat(z)", "x_hat(0)")



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


def figure_png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes (100 dpi), for an atomic write."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def save_panel(fig: Figure, run_dir: Path, epoch: int) -> Path:
    """Write ``run_dir/recon_epoch{epoch:04d}.png`` and the same image as ``recon_latest.png``."""
    path = run_dir / f"recon_epoch{epoch:04d}.png"
    png = figure_png(fig)
    atomic_write(path, png)
    atomic_write(run_dir / LATEST_PANEL, png)
    return path
