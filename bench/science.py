"""Does the headline sweep find a code that carries the tumour? A ``dip_sbd`` sweep on the phantom, its best
trial retrained with several seeds and evaluated through the channel, beside the audited configuration.

    python -m bench.science [--trials 12] [--epochs 20] [--retrain-epochs 40] [--seeds 3] [--seed 0]

1. Writes ``dip_sbd`` at a CPU scale (``SCALE``: 32^3, z 16, a small network, 96 phantom subjects of
   which 24 validate; the phantom varies the tumour only, so that the tumour is what there is to
   carry) with a collapse rule that fits the epochs, and runs it (seeded) through ``sweeps/run.py``.
2. Retrains the best trial's experiment (its ``config.yaml``) for ``--retrain-epochs`` with
   ``train.seed`` 0, 1, ... in this process, and scores each with ``vae.evaluate`` on every phantom
   subject: ridge probes cross-validated over subjects, on samples of q(z|x) (through the channel)
   and on mu.
3. Scores the audited trial's last checkpoint the same way.
4. Growth: the best experiment (seed 0) trained on a quarter and a half of the training subjects,
   and on the phantom that varies everything (anatomy, pose, intensities and the tumour).
5. Writes ``bench/science.json``, ``bench/science.png`` (the probes per epoch of each retrained seed)
   and its section of ``bench/RESULTS.md``.

Targets: lesion centre R^2 (mean over x, y, z, through the channel) >= 0.9 and lesion size
(log-volume) R^2 >= 0.8 for the best trial; <= 0.1 for the audited configuration.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from bench.results import machine, publish
from vae.config import load_experiment
from vae.data.sources import prepared_cache, training_datasets
from vae.data.subject_factors import LOCATION_FACTORS
from vae.evaluate import evaluate_run
from vae.panels import figure_png
from vae.run_files import CONFIG_YAML, read_epochs
from vae.training import fit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY = "bench/science.py"
TARGETS = {"location_r2": 0.9, "size_r2": 0.8, "audited": 0.1}
# dip_sbd at a scale a 2-core CPU trains in minutes per trial: 32^3 (the tumour is 3-10 voxels across),
# z 16, three 2x stages. The learning rate is raised from the audited 1e-4, which needs hundreds of epochs.
SCALE = {
    "data.size": 32, "data.batch_size": 8, "data.num_workers": 0, "data.phantom.subjects": 96,
    "data.phantom.vary": "tumour", "data.val_fraction": 0.25, "model.z_dim": 16, "model.base_filters": 8, "model.max_filters": 64,
    "model.depth": 3, "model.norm_groups": 4, "model.broadcast_grid": 4, "optim.lr": 1.0e-3,
    "train.mixed_precision": False, "train.image_every": 1000,
}
# The shipped rule waits 5 epochs and needs 10 collapsed ones: longer than these runs.
RULE = {"kl_min": 2.0, "channel_min": 0.1, "z_sensitivity_min": 0.01, "patience": 3, "grace_epochs": 2}


def sweep_file(out: Path) -> Path:
    """``dip_sbd`` at :data:`SCALE`, checkpointing every epoch, with :data:`RULE`."""
    raw = yaml.safe_load((ROOT / "sweeps" / "dip_sbd.yaml").read_text())
    raw.pop("smoke", None)
    raw["overrides"] = {**raw["overrides"], **SCALE, "train.checkpoint_every": 1}  # a stopped trial too
    raw["early_stop"]["collapse"] = RULE
    raw["resources"] = {"workers_per_trial": 1, "cpus_per_trial": 1, "gpus_per_trial": 0, "max_failures": 0}
    path = out / "science_dip_sbd.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_sweep(args: argparse.Namespace) -> tuple[Path, list[str]]:
    path = sweep_file(args.results)
    command = [sys.executable, str(ROOT / "sweeps" / "run.py"), str(path), "--num-samples", str(args.trials),
               "--max-epochs", str(args.epochs), "--seed", str(args.seed), "--results", str(args.results),
               "--run", "sweep", "--no-dashboard"]
    print(f"$ {shlex.join(command)}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"the sweep failed: {shlex.join(command)}")
    return args.results / path.stem / "sweep", command


def chosen_trials(sweep_dir: Path) -> tuple[dict, dict]:
    """The trial to retrain (best.yaml's, else the completed trial closest to the constraints) and the audited one,
    each as its trials.csv row."""
    with (sweep_dir / "trials.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((sweep_dir / "summary.json").read_text())
    audited = next(r for r in rows if r["audited"] == "true")
    if summary["best"] is not None:
        best = next(r for r in rows if r["trial_id"] == summary["best"]["trial_id"])
        return best | {"chosen_as": "best"}, audited
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        raise RuntimeError(f"no trial of {sweep_dir} completed: nothing to retrain ({summary['no_best']})")
    closest = min(completed, key=lambda r: float(r["final/prior_kl_dim_max"]))
    return closest | {"chosen_as": f"closest to the constraints ({summary['no_best']})"}, audited


def scores(record: dict) -> dict[str, float]:
    """The headline numbers of an ``evaluation.json`` record."""
    factors, metrics = record["factors"], record["metrics"]
    return {
        "location_r2": metrics["location_r2"], "size_r2": metrics["size_r2"],
        "location_r2_mu": float(np.mean([factors[n]["probe_r2_mu"] for n in LOCATION_FACTORS])),
        "size_r2_mu": factors["tumour_log_volume"]["probe_r2_mu"],
        "au": metrics["au"], "kl_raw": metrics["kl_raw"], "recon_mu": metrics["recon_mu"],
        "channel_nats": metrics["channel_nats"], "prior_kl": metrics["prior_kl"],
    }


def retrain(config: Path, out: Path, seed: int, epochs: int, changes: Sequence[str] = (),
            train_fraction: float = 1.0) -> tuple[dict, list[dict[str, str]], float]:
    """Train ``config`` (with ``changes``, ``train.seed = seed``, ``epochs``) on ``train_fraction`` of its training
    subjects into ``out``, and score it on every subject; (scores, its epochs, seconds)."""
    from vae.data import CachedVolumes

    cfg = load_experiment(config, [*changes, f"train.seed={seed}", f"train.epochs={epochs}",
                                   f"train.checkpoint_every={epochs}"])
    cache = prepared_cache(cfg.data)
    train_set, val_set = training_datasets(cfg.data, cache)
    if train_fraction < 1.0:
        kept = train_set.ids[: round(train_fraction * len(train_set.ids))]
        train_set = CachedVolumes(cache, kept, flip=cfg.data.flip, seed=cfg.data.split_seed)
    print(f"\n== {out.name}: {len(train_set)} training subjects, {epochs} epochs", flush=True)
    began = time.perf_counter()
    fit(cfg, train_set, val_set, out, device=torch.device("cpu"), progress=print)
    seconds = time.perf_counter() - began
    record, _ = evaluate_run(out)
    return scores(record) | {"train_subjects": len(train_set)}, read_epochs(out), seconds


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def growth_figure(seeds: Sequence[list[dict[str, str]]]):
    """Validation probes (24 subjects) per epoch of each retrained seed: centre and size."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 2), ("location_r2", "size_r2"), ("lesion centre", "lesion size")):
        for k, rows in enumerate(seeds):
            ax.plot([int(r["epoch"]) for r in rows], [float(r[key]) for r in rows], marker="o", ms=3, label=f"seed {k}")
        ax.axhline(TARGETS[key], color="0.4", ls="--", lw=1, label="target")
        ax.set(xlabel="epoch", ylabel="R² through the channel (validation subjects)", title=title, ylim=(-0.5, 1.0))
        ax.legend(fontsize=8)
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    began = time.perf_counter()
    sweep_dir, command = run_sweep(args)
    sweep_minutes = (time.perf_counter() - began) / 60
    best, audited = chosen_trials(sweep_dir)
    config, runs = sweep_dir / best["run_dir"] / CONFIG_YAML, args.results / "runs"
    retrained = [retrain(config, runs / f"seed-{s}", s, args.retrain_epochs) for s in range(args.seeds)]
    audited_scores = scores(evaluate_run(sweep_dir / audited["run_dir"])[0])
    fewer = [retrain(config, runs / f"subjects-{f}", 0, args.retrain_epochs, train_fraction=f)[0] for f in (0.25, 0.5)]
    everything = retrain(config, runs / "vary-all", 0, args.retrain_epochs, ["data.phantom.vary=all"])[0]

    per_seed = [s for s, _, _ in retrained]
    summary = {key: mean_sd([s[key] for s in per_seed]) for key in per_seed[0]}
    met = {
        "location_r2": summary["location_r2"]["mean"] >= TARGETS["location_r2"],
        "size_r2": summary["size_r2"]["mean"] >= TARGETS["size_r2"],
        "audited": max(audited_scores["location_r2"], audited_scores["size_r2"]) <= TARGETS["audited"],
    }
    (HERE / "science.png").write_bytes(figure_png(growth_figure([rows for _, rows, _ in retrained])))
    return {
        "machine": machine(), "date": str(datetime.date.today()),
        "command": f"python -m bench.science --trials {args.trials} --epochs {args.epochs} --retrain-epochs "
                   f"{args.retrain_epochs} --seeds {args.seeds} --seed {args.seed}",
        "sweep_command": shlex.join(["python" if c == sys.executable else c.replace(f"{ROOT}/", "") for c in command]),
        "scale": SCALE, "rule": RULE, "sweep_minutes": sweep_minutes, "retrain_epochs": args.retrain_epochs,
        "retrain_minutes": [seconds / 60 for _, _, seconds in retrained],
        "total_minutes": (time.perf_counter() - began) / 60,
        "trials": json.loads((sweep_dir / "summary.json").read_text())["status_counts"],
        "best": {"trial_id": best["trial_id"], "chosen_as": best["chosen_as"],
                 "params": {k.removeprefix("param/"): v for k, v in best.items() if k.startswith("param/") and v},
                 "sweep_final": {k: best.get(f"final/{k}") for k in ("semantic_r2", "recon_mu", "prior_kl_dim_max")}},
        "retrained": per_seed, "retrained_summary": summary, "audited": audited_scores, "targets": TARGETS,
        "met": met, "fewer_subjects": fewer, "vary_all": everything,
        "growth": [[{"epoch": int(r["epoch"]), **{k: float(r[k]) for k in ("location_r2", "size_r2")}} for r in rows]
                   for _, rows, _ in retrained],
    }


def short(cell: str) -> str:
    """A parameter cell: a number to 3 significant digits, a choice as it is."""
    try:
        return f"{float(cell):.3g}"
    except ValueError:
        return cell


def markdown(result: dict[str, Any]) -> str:
    s, a = result["retrained_summary"], result["audited"]

    def pm(key: str) -> str:
        return f"{s[key]['mean']:.3g} ± {s[key]['sd']:.2g}"

    verdict = {True: "**met**", False: "**not met**"}

    def row(r: dict) -> str:
        return (f"{r['location_r2']:.3f} | {r['size_r2']:.3f} | {r['location_r2_mu']:.3f} | {r['size_r2_mu']:.3f} | "
                f"{r['au']:.0f} | {r['kl_raw']:.3g} | {r['recon_mu']:.4f}")
    lines = [
        "## Does the sweep find a code that carries the tumour? (`bench/science.py`)", "",
        f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}` "
        f"(the sweep: `{result['sweep_command']}`).", "",
        f"`dip_sbd` at 32³ on the phantom varying the tumour only (96 subjects, 24 validate; z 16; lr 1e-3; "
        f"collapse rule {result['rule']}): {result['trials']} in {result['sweep_minutes']:.0f} min. Retrained for "
        f"{result['retrain_epochs']} epochs: {result['best']['trial_id']} ({result['best']['chosen_as']}), "
        f"{len(result['retrained'])} seeds, {np.mean(result['retrain_minutes']):.1f} min each; "
        f"{result['total_minutes']:.0f} min in all. Probes: ridge, 5 folds over all 96 subjects, on 10 samples of "
        "q(z|x) per subject (through the channel) and on μ.", "",
        f"Parameters: {', '.join(f'{k}={short(v)}' for k, v in result['best']['params'].items())}.", "",
        "| | centre R² (z) | size R² (z) | centre R² (μ) | size R² (μ) | AU | KL_raw | recon(μ) |",
        "|---|---|---|---|---|---|---|---|",
        f"| best, retrained (mean ± sd) | {pm('location_r2')} | {pm('size_r2')} | {pm('location_r2_mu')} | "
        f"{pm('size_r2_mu')} | {pm('au')} | {pm('kl_raw')} | {pm('recon_mu')} |",
        f"| audited (the sweep's trial) | {row(a)} |",
        *(f"| best, seed 0, {r['train_subjects']} training subjects | {row(r)} |" for r in result["fewer_subjects"]),
        f"| best, seed 0, phantom varying everything | {row(result['vary_all'])} |", "",
        "Per seed (centre / size through the channel): "
        + ", ".join(f"seed {k} {r['location_r2']:.2f} / {r['size_r2']:.2f} (KL_raw {r['kl_raw']:.3g}, channel "
                    f"{r['channel_nats']:.3g} nats)" for k, r in enumerate(result["retrained"])) + ".", "",
        "Validation probes per epoch (24 subjects; centre / size, per seed): "
        + "; ".join(f"epoch {e}: " + ", ".join(f"{rows[e - 1]['location_r2']:.2f} / {rows[e - 1]['size_r2']:.2f}"
                                              for rows in result["growth"] if len(rows) >= e)
                    for e in sorted({max(1, round(result["retrain_epochs"] * f)) for f in (0.25, 0.5, 0.75, 1.0)}))
        + ".", "",
        f"Targets: centre ≥ {TARGETS['location_r2']} — {verdict[result['met']['location_r2']]}; size ≥ "
        f"{TARGETS['size_r2']} — {verdict[result['met']['size_r2']]}; audited ≤ {TARGETS['audited']} — "
        f"{verdict[result['met']['audited']]}. Per epoch (validation probes of each seed): `bench/science.png`.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials in the sweep, the audited one included")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial of the sweep")
    parser.add_argument("--retrain-epochs", type=int, default=40, help="epochs of the retrained best trial")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the retrained best trial")
    parser.add_argument("--seed", type=int, default=0, help="the sweep's sampler seed")
    parser.add_argument("--results", type=Path, default=Path("results/bench-science"))
    parser.add_argument("--publish-only", action="store_true", help="rewrite the RESULTS.md section from science.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.results = args.results.resolve()
    result = json.loads((HERE / "science.json").read_text()) if args.publish_only else run(args)
    publish(HERE, KEY, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
