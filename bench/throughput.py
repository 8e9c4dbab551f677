"""Training throughput: volumes/s, FLOPs, MFU and peak memory of the encoder/decoder variants.

    python -m bench.throughput                       # CPU: 32^3 and 64^3, batch 1; GPU: 128^3, batch 8
    python -m bench.throughput --sizes 128 --batch 8 --variants sbd-input --settings bf16 bf16+cl+compile

A case is one variant at one size with one setting, timed over real training steps
(``vae.training.train_epoch``: forward, the experiment's loss at full-strength schedules, backward,
clipping, AdamW) on batches of the prepared phantom drawn from a ``DataLoader``. Variants are
the audited models of ``vae/configs`` (exp1: conv decoder, exp2: spatial broadcast decoder), each
with z at the decoder input (as audited) or FiLM in every block. A setting joins ``fp32`` or
``bf16`` (autocast), ``cl`` (``channels_last_3d``) and ``compile`` (``torch.compile``) with "+".

Every case runs in a fresh process, so its peak memory is its own: CUDA
``max_memory_allocated`` or, on the CPU, the growth of the peak resident set, both from before
the model is built (weights, gradients, optimizer state, activations). Its first step counts the
FLOPs of a whole training step with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matrix products, forward and backward) and warms up; a compiled model then takes one more,
untimed step that compiles it. Achieved FLOP/s over the GPU's dense peak is the MFU. The time a
step waits for its batch says whether the data pipeline keeps up; the loader alone is timed too.

Every variant runs in fp32; the other settings run for ``--settings-variants`` at
``--settings-sizes``. The CPU defaults keep the run near 10 minutes on 2 cores: a step of the
audited models takes ~1 s at 32^3 and ~6 s at 64^3 there, but bf16 is emulated on a CPU without
AVX-512 BF16 or AMX (an order of magnitude slower) and compiling takes minutes per model, so the
other settings run for the audited exp2 variant at the first size only. A case that fails
(compilation, memory) is reported with its one-line reason. Writes ``bench/throughput.json`` and this
script's section of ``bench/RESULTS.md`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from bench.results import cpu_model, machine, publish
from vae.config import ConfigError, ExperimentConfig, load_experiment
from vae.data import CachedVolumes, DataError
from vae.data.sources import prepared_cache
from vae.models import build_model
from vae.training import Precision, train_epoch

HERE = Path(__file__).resolve().parent
KEY = "bench/throughput.py"
# name -> (audited experiment, z injection)
VARIANTS = {
    "conv-input": ("exp1_baseline_vae", "input"),
    "conv-film": ("exp1_baseline_vae", "film"),
    "sbd-input": ("exp2_dipvae_sbd", "input"),
    "sbd-film": ("exp2_dipvae_sbd", "film"),
}
HEADLINE_VARIANT = "sbd-input"  # the audited exp2 of the headline sweep
SUBJECTS = 8  # phantom subjects; after the first epoch they are read from the page cache
LOADER_BATCHES = 20  # batches timed when the loader runs alone
DATA_WAIT_LIMIT = 0.05  # "data never the bottleneck": a step waits at most 5 % of its time for its batch
MFU_TARGET = 0.40
# Dense peak TFLOP/s per GPU from NVIDIA's data sheets as (bf16, tf32, fp32); the sheets quote
# tensor-core figures with sparsity, halved here. The most specific name comes first.
PEAK_TFLOPS = {
    "H200 NVL": (835.5, 417.5, 60.0),
    "H200": (989.4, 494.7, 67.0),
    "H100 NVL": (835.5, 417.5, 60.0),
    "H100 PCIe": (756.5, 378.0, 51.2),
    "H100": (989.4, 494.7, 67.0),
    "A100": (312.0, 156.0, 19.5),
}
DEFAULTS = {
    "cpu": {"sizes": [32, 64], "batch": 1, "steps": 3, "warmup": 0,
            "settings": ["cl", "bf16", "compile"], "settings_variants": [HEADLINE_VARIANT]},
    "cuda": {"sizes": [128], "batch": 8, "steps": 5, "warmup": 2,
             "settings": ["bf16", "bf16+cl", "bf16+cl+compile"], "settings_variants": list(VARIANTS)},
}


# --------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Setting:
    """How a case trains: autocast precision, memory format, compilation."""

    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    compile: bool = False

    @staticmethod
    def parse(text: str) -> Setting:
        """``"bf16+cl+compile"`` -> Setting("bf16", True, True); ``"fp32"`` is the baseline."""
        parts = text.split("+")
        unknown = set(parts) - {"fp32", "bf16", "cl", "compile"}
        if unknown or {"fp32", "bf16"} <= set(parts):
            raise ValueError(f"setting '{text}': join fp32 or bf16, cl and compile with '+', e.g. bf16+cl+compile")
        return Setting("bf16" if "bf16" in parts else "fp32", "cl" in parts, "compile" in parts)

    @property
    def label(self) -> str:
        return "+".join([self.precision] + ["cl"] * self.channels_last + ["compile"] * self.compile)


@dataclass(frozen=True)
class Case:
    """Everything a fresh process needs to run one case."""

    variant: str
    setting: Setting
    cfg: ExperimentConfig
    cache: str
    device: str
    steps: int
    warmup: int
    threads: int | None  # torch's default (the cores) when None
    start_method: str  # how this platform's training processes start loader workers


def experiment(
    variant: str, size: int, batch: int, cache_dir: str | None, overrides: Sequence[str]
) -> ExperimentConfig:
    """The audited experiment of ``variant`` at ``size``; ``overrides`` (dotted ``key=value``) come last."""
    name, injection = VARIANTS[variant]
    changes = [f"model.z_injection={injection}", f"data.size={size}", f"data.batch_size={batch}",
               f"data.phantom.subjects={SUBJECTS}"] + ([f"data.cache_dir={cache_dir}"] if cache_dir else [])
    return load_experiment(name, changes + list(overrides))


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products that ``step()`` runs, backward passes included."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    """Dense peak FLOP/s of a GPU named ``device_name`` for ``precision``; None when unknown.

    fp32 convolutions run on TF32 tensor cores when ``tf32`` (cuDNN's default in PyTorch).
    """
    for name, (bf16, tf32_peak, fp32) in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return 1e12 * (bf16 if precision == "bf16" else tf32_peak if tf32 else fp32)
    return None


def mfu(flops_per_second: float, device_name: str, precision: str, tf32: bool) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the device's dense peak; None without a known peak."""
    peak = peak_flops(device_name, precision, tf32)
    return None if peak is None else flops_per_second / peak


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(field + ":")).split()[1]) * 1024  # kB


def memory_mark(device: torch.device) -> int:
    """Reset the peak and return the bytes in use: CUDA memory allocated, or on the CPU the resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
    return _status_bytes("VmRSS")


def memory_growth(device: torch.device, mark: int) -> int:
    """Peak bytes in use since :func:`memory_mark`, above its ``mark``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    return _status_bytes("VmHWM") - mark


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stops after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); without, oneDNN emulates it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16"))


def random_batches(dataset: CachedVolumes, cfg: ExperimentConfig, count: int, device: torch.device) -> DataLoader:
    """``count`` random batches of ``dataset``, loaded with the workers and pinning ``vae.training.fit`` uses."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=cfg.data.batch_size * count)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")


def loader_volumes_per_second(cfg: ExperimentConfig, cache: Path, device: torch.device) -> float:
    """Volumes/s the loader alone delivers to ``device`` as float32 (what a step consumes), start-up excluded."""
    batches = iter(random_batches(CachedVolumes(cache), cfg, LOADER_BATCHES + 1, device))
    next(batches)  # the workers' start-up
    began = time.perf_counter()
    for batch in batches:
        batch.to(device, non_blocking=True).float()
    synchronize(device)
    return LOADER_BATCHES * cfg.data.batch_size / (time.perf_counter() - began)


def run_case(case: Case) -> dict:
    """Train ``case`` for its steps in this process (a fresh one) and return the raw figures."""
    cfg, setting, device = case.cfg, case.setting, torch.device(case.device)
    # A process inherits its creator's start method (forkserver); loaders start workers as training's would.
    multiprocessing.set_start_method(case.start_method, force=True)
    if case.threads:
        torch.set_num_threads(case.threads)
    dataset = CachedVolumes(case.cache)
    untimed = 1 + setting.compile + case.warmup
    batches = iter(random_batches(dataset, cfg, untimed + case.steps, device))
    # One-time set-up (the FLOP counter's imports, the convolution kernels' state) stays out of the peak.
    tiny = torch.ones(1, 1, 3, 3, 3, device=device, requires_grad=True)
    count_flops(lambda: torch.nn.functional.conv3d(tiny, tiny).sum().backward())
    mark = memory_mark(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.in_channels, cfg.data.size).to(device)
    if setting.channels_last:  # the first convolution converts the input to the weights' format
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    precision = Precision(torch.bfloat16 if setting.precision == "bf16" else None)

    def step(net: torch.nn.Module, batch: torch.Tensor) -> None:
        # At the last epoch's schedules every weighted term of the loss is differentiated.
        result = train_epoch(net, [batch], optimizer, cfg, cfg.train.epochs - 1, len(dataset), precision)
        if result.diverged_term is not None:
            raise RuntimeError(f"the {result.diverged_term} term is not finite, so the step was not applied")
        synchronize(device)

    flops = count_flops(lambda: step(model, next(batches)))  # eager; also the first warm-up step
    net, compile_s = model, None
    if setting.compile:
        net = torch.compile(model)
        began = time.perf_counter()
        step(net, next(batches))
        compile_s = time.perf_counter() - began
    for _ in range(case.warmup):
        step(net, next(batches))
    walls, cpus, waits = [], [], []
    for _ in range(case.steps):
        began, cpu = time.perf_counter(), time.process_time()
        batch = next(batches)
        waits.append(time.perf_counter() - began)
        step(net, batch)
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - cpu)
    return {"flops": flops, "step_s": walls, "cpu_s": cpus, "wait_s": waits, "compile_s": compile_s,
            "peak_memory_bytes": memory_growth(device, mark), "threads": torch.get_num_threads()}


def one_line(err: BaseException) -> str:
    """``"Kind: first line of the message"``: a failed case's reason in a table cell."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def fresh_processes() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported torch and the training code and run nothing:
    each case starts clean (no CUDA context, no thread pool) without paying those imports again."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "vae.training", "vae.data.dataset"])  # by name: "__main__" is not honoured
    return context


def measure(case: Case, context: multiprocessing.context.BaseContext) -> dict:
    """:func:`run_case` in a fresh process of ``context``; ``{"error": reason}`` when it failed there."""
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(run_case, case).result()
    except Exception as err:  # compilation, memory, a crashed process: a result of the case, not of the script
        return {"error": one_line(err)}


def case_row(case: Case, measured: dict, device_name: str, tf32: bool) -> dict:
    """The figures of one case as reported."""
    row = {"variant": case.variant, "size": case.cfg.data.size, "setting": case.setting.label, **asdict(case.setting)}
    if "error" in measured:
        return row | {"status": "failed", "error": measured["error"]}
    batch = case.cfg.data.batch_size
    median = statistics.median(measured["step_s"])
    achieved = measured["flops"] / median
    cuda = case.device.startswith("cuda")
    return row | {
        "status": "ok", "flops_per_volume": measured["flops"] / batch, "step_s": measured["step_s"], "median_step_s": median,
        "volumes_per_s": batch / median, "achieved_flops_per_s": achieved,
        "mfu": mfu(achieved, device_name, case.setting.precision, tf32) if cuda else None,
        "peak_memory_bytes": measured["peak_memory_bytes"], "compile_s": measured["compile_s"],
        "data_wait_fraction": sum(measured["wait_s"]) / sum(measured["step_s"]),
        "cpu_share": sum(measured["cpu_s"]) / sum(measured["step_s"]) / measured["threads"],
        "threads": measured["threads"],
    }


def plan(sizes: Sequence[int], variants: Sequence[str], settings: Sequence[Setting],
         settings_variants: Sequence[str], settings_sizes: Sequence[int]) -> list[tuple[str, int, Setting]]:
    """(variant, size, setting) of every case: fp32 for all, the other settings where asked."""
    cases = []
    for size in sizes:
        for variant in variants:
            cases.append((variant, size, Setting()))
            if variant in settings_variants and size in settings_sizes:
                cases += [(variant, size, s) for s in dict.fromkeys(settings) if s != Setting()]
    return cases


# --------------------------------------------------------------------------- report


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _fastest(rows: list[dict], size: int) -> float:
    """Volumes/s of the fastest case at ``size`` (0 when none ran)."""
    return max((r["volumes_per_s"] for r in rows if r["size"] == size), default=0.0)


def verdicts(result: dict) -> list[str]:
    """Which targets are met, and why not."""
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    lines = []
    if result["device_type"] != "cuda":
        lines.append("- MFU >= 40 %: not checked. MFU needs a GPU's peak, and no GPU is lent to this project now; on a "
                     "GPU run `python -m bench.throughput` (128^3, batch 8, fp32 / bf16 / bf16+cl / bf16+cl+compile).")
    elif any(r["mfu"] is None for r in rows):
        lines.append(f"- MFU >= 40 %: not checked: no peak FLOP/s known for {result['device']} (PEAK_TFLOPS).")
    else:
        best = {}
        for r in rows:
            best[r["variant"]] = max(best.get(r["variant"], 0.0), r["mfu"])
        each = ", ".join(f"{v} {100 * m:.0f} %" for v, m in best.items())
        verdict = "met" if all(m >= MFU_TARGET for m in best.values()) else "NOT met"
        lines.append(f"- MFU >= 40 % (best setting per variant): {verdict}: {each}.")
    if rows:
        worst = max(rows, key=lambda r: r["data_wait_fraction"])
        verdict = "met" if worst["data_wait_fraction"] <= DATA_WAIT_LIMIT else "NOT met"
        headroom = ", ".join(
            f"{alone['volumes_per_s']:.0f} volumes/s at {alone['size']}^3 "
            f"({alone['volumes_per_s'] / _fastest(rows, alone['size']):.0f}x the fastest case)"
            for alone in result["loaders"] if _fastest(rows, alone["size"])
        )
        lines.append(f"- Data never the bottleneck (a step waits <= {100 * DATA_WAIT_LIMIT:.0f} % of its time for its "
                     f"batch): {verdict}; the longest wait was {100 * worst['data_wait_fraction']:.1f} % "
                     f"({worst['variant']} {worst['size']}^3 {worst['setting']}). The loader alone: {headroom}.")
    return lines


def markdown(result: dict) -> str:
    """This script's section of ``RESULTS.md``."""
    cuda = result["device_type"] == "cuda"
    settings_at = ", ".join(f"{s}^3" for s in result["settings_sizes"])
    overrides = f"; overrides: `{' '.join(result['overrides'])}`" if result["overrides"] else ""
    lines = [
        "## Training throughput (`bench/throughput.py`)",
        "",
        f"- Date: {result['date']}; command: `{result['command']}`; machine: {result['machine']}; "
        f"device: {result['device']}",
        "- Audited models (exp1: conv decoder; exp2: SBD, grid 8; z_dim 128, base 32, depth 4; z at the decoder input "
        f"or FiLM in every block{overrides}) with their own losses at full-strength schedules; 4 modalities, batch "
        f"{result['batch']}, {result['threads']} torch thread{'s' * (result['threads'] != 1)}; phantom batches from a "
        f"DataLoader ({result['loader_workers']} workers). Per case (a fresh process): one eager step that counts the "
        f"FLOPs, a compile step when compiled (its time, compilation included, is the compile column), "
        f"{result['warmup']} warm-up and {result['steps']} timed steps (median; min-max shows the noise). fp32 for "
        f"every variant; the other settings for "
        f"{', '.join(result['settings_variants'])} at {settings_at}.",
        "- FLOPs: convolutions and matrix products of a whole training step (forward + backward) per volume. "
        "Peak memory: " + ("CUDA `max_memory_allocated`" if cuda else "growth of the peak resident set") +
        " from before the model was built. Data wait: share of the step spent waiting for its batch."
        + (f" fp32 MFU is against the {'TF32' if result['tf32'] else 'FP32'} peak (cuDNN TF32 "
           f"{'on' if result['tf32'] else 'off'})." if cuda else ""),
        "",
    ]
    header = ["variant", "size", "setting", "volumes/s", "vs fp32", "step s (median, min-max)", "GFLOP/volume",
              "achieved GFLOP/s", "MFU" if cuda else "CPU share", "peak memory", "compile", "data wait"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = {(r["variant"], r["size"]): r for r in result["rows"] if r["setting"] == "fp32" and r["status"] == "ok"}
    for r in result["rows"]:
        head = [r["variant"], f"{r['size']}^3", r["setting"]]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(head + [f"failed: {r['error']}"] + [""] * (len(header) - 4)) + " |")
            continue
        base = baseline.get((r["variant"], r["size"]))
        utilisation = r["mfu"] if cuda else r["cpu_share"]
        cells = head + [
            f"{r['volumes_per_s']:.3g}", f"{r['volumes_per_s'] / base['volumes_per_s']:.2f}x" if base else "-",
            f"{r['median_step_s']:.3g} ({min(r['step_s']):.3g}-{max(r['step_s']):.3g})",
            f"{r['flops_per_volume'] / 1e9:.1f}", f"{r['achieved_flops_per_s'] / 1e9:.1f}",
            "-" if utilisation is None else f"{100 * utilisation:.0f} %", _mb(r["peak_memory_bytes"]),
            "-" if r["compile_s"] is None else f"{r['compile_s']:.0f} s", f"{100 * r['data_wait_fraction']:.1f} %",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets:", *verdicts(result)]
    if not cuda:
        lines += [
            "",
            "On this CPU: MFU is undefined (no peak is claimed), so achieved GFLOP/s stands in. CPU share is the "
            "process's CPU time over (wall time x threads): below 100 % other jobs held the cores, and the timings "
            "are that much slower"
            + (" (one thread keeps them steadier: with two, a thread that loses its core stalls every parallel "
               "region of the other)" if result["threads"] == 1 else "")
            + ". bf16 is "
            + ("native here." if result["native_bf16"] else "emulated here (no AVX-512 BF16 or AMX), hence its cost.")
            + " The loader's and the timed steps' figures on 2 shared cores say little about a GPU; "
            "`bench/data_cache.py` has the read costs per volume.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _setting(text: str) -> Setting:
    try:
        return Setting.parse(text)
    except ValueError as err:  # argparse prints this message, not a generic one
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", help="volume edges (CPU: 32 64; GPU: 128)")
    parser.add_argument("--batch", type=int, help="volumes per step (CPU: 1; GPU: 8)")
    parser.add_argument("--steps", type=int, help="timed steps per case (CPU: 3; GPU: 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the FLOP count (CPU: 0; GPU: 2)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--settings", nargs="*", type=_setting, metavar="SETTING",
                        help="besides fp32: e.g. bf16 cl compile bf16+cl+compile (CPU: cl bf16 compile; "
                        "GPU: bf16 bf16+cl bf16+cl+compile)")
    parser.add_argument("--settings-variants", nargs="+", choices=list(VARIANTS),
                        help=f"variants that run the settings (CPU: {HEADLINE_VARIANT}; GPU: all)")
    parser.add_argument("--settings-sizes", type=int, nargs="+", help="sizes that run the settings (CPU: the first; "
                        "GPU: all)")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's, the cores)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted experiment overrides for every variant, e.g. model.base_filters=16")
    parser.add_argument("--cache-dir", help="where the phantom is prepared (default: the experiments' cache)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of train.json and RESULTS.md (default: bench/)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.device]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, [Setting.parse(s) for s in value] if key == "settings" else value)
    if args.settings_sizes is None:
        args.settings_sizes = args.sizes[:1] if args.device == "cpu" else args.sizes
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1 and --warmup >= 0")
    return args


def run(args: argparse.Namespace, command: Sequence[str]) -> dict:
    """Every case of ``args``; the result that ``train.json`` holds."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    cases = plan(args.sizes, args.variants, args.settings, args.settings_variants, args.settings_sizes)
    # Every experiment is validated, and every size's phantom prepared, before the first case runs.
    configs = {(v, size): experiment(v, size, args.batch, args.cache_dir, args.overrides) for v, size, _ in cases}
    data = {cfg.data.size: cfg for cfg in configs.values()}  # every variant of a size has the same data section
    caches = {size: prepared_cache(cfg.data) for size, cfg in data.items()}
    loaders = [{"size": size, "volumes_per_s": loader_volumes_per_second(cfg, caches[size], device)}
               for size, cfg in data.items()]
    tf32 = torch.backends.cudnn.allow_tf32
    rows, context = [], fresh_processes()
    for variant, size, setting in cases:
        case = Case(variant, setting, configs[variant, size], str(caches[size]), args.device, args.steps, args.warmup,
                    args.threads, multiprocessing.get_start_method())
        rows.append(case_row(case, measure(case, context), device_name, tf32))
        r = rows[-1]
        shown = f"{r['volumes_per_s']:.3g} volumes/s" if r["status"] == "ok" else f"failed: {r['error']}"
        print(f"{variant} {size}^3 {setting.label}: {shown}", flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": " ".join(["python -m bench.throughput", *command]), "device_type": device.type,
        "device": device_name, "tf32": tf32,
        "native_bf16": native_bf16(), "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads or torch.get_num_threads(), "overrides": args.overrides,
        "loader_workers": next(iter(data.values())).data.num_workers, "settings_variants": args.settings_variants,
        "settings_sizes": args.settings_sizes, "loaders": loaders, "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        result = run(args, argv)
    except (ConfigError, DataError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    publish(args.out, KEY, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
