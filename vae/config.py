"""Typed, validated experiment configuration.

An experiment is one YAML file (``vae/configs/<name>.yaml`` or any path). A file may
name a ``base`` experiment whose values it overrides, and the command line may override
any leaf with a dotted ``key=value``. Unknown keys, wrong types and values out of range
fail with a :class:`ConfigError` whose lines each name the key path.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` is one line per problem, each naming the key."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(Section):
    """The embedded default data set, used when ``data.root`` is not given."""

    subjects: int = Field(64, ge=4)
    vary: Literal["all", "tumour"] = "all"
    # mni: the MNI152 tissue maps of the pinned nilearn package; procedural: analytic ellipsoids.
    anatomy: Literal["mni", "procedural"] = "mni"
    seed: int = 0


class DataConfig(Section):
    root: str | None = None  # BraTS-style NIfTI tree or a prepared cache; None = the phantom
    cache_dir: str | None = None  # where prepared arrays go; None = $COLLAPSE_SWEEP_CACHE or ~/.cache/collapse-sweep
    size: int = Field(128, gt=0)  # edge of the cubic volume fed to the network
    modalities: list[str] = Field(default_factory=lambda: ["t1c", "t1n", "t2f", "t2w"], min_length=1)
    batch_size: int = Field(8, gt=0)  # per worker
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0
    num_workers: int = Field(2, ge=0)
    flip: bool = False
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)


class ModelConfig(Section):
    z_dim: int = Field(128, gt=0)
    base_filters: int = Field(32, gt=0)
    max_filters: int = Field(256, gt=0)
    depth: int = Field(4, ge=1)  # number of 2x down/up-sampling stages
    norm: Literal["group", "batch", "instance", "none"] = "group"
    norm_groups: int = Field(8, gt=0)
    decoder: Literal["conv", "broadcast"] = "conv"
    # Spatial broadcast decoder grid edge: a low-resolution grid followed by resize-conv
    # upsampling, or None for the stride-1 full-resolution form of Watters et al.
    broadcast_grid: int | None = Field(8, gt=0)
    broadcast_layers: int = Field(2, ge=1)  # stride-1 convs at the broadcast grid
    z_injection: Literal["input", "film"] = "input"  # film: z modulates every decoder block
    posterior_logvar_min: float = -6.0
    posterior_logvar_max: float | None = None  # delta-VAE: caps sigma_q, so KL >= delta per dim
    mu_batchnorm_gamma: float | None = Field(None, gt=0)  # BN-VAE: fixed scale on mu
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.posterior_logvar_max is not None and self.posterior_logvar_max <= self.posterior_logvar_min:
            raise ValueError("posterior_logvar_max must be greater than posterior_logvar_min")
        return self


class KLConfig(Section):
    beta: float = Field(1.0, ge=0)  # weight of one nat of KL in the likelihood's units
    schedule: Literal["constant", "linear", "cyclical"] = "constant"
    warmup_start: float = Field(0.0, ge=0, le=1)  # fraction of beta at epoch 0 (linear)
    warmup_epochs: float = Field(0.0, ge=0)
    cycles: int = Field(4, ge=1)  # cyclical (Fu et al.)
    cycle_ratio: float = Field(0.5, gt=0, le=1)
    # Capacity annealing (Burgess et al.): gamma * |KL - C|, C rising linearly to capacity_max.
    capacity_max: float | None = Field(None, gt=0)
    capacity_gamma: float = Field(1000.0, gt=0)
    capacity_ramp_epochs: float = Field(0.0, ge=0)


class FreeBitsConfig(Section):
    floor: float = Field(0.0, ge=0)  # nats per latent dimension; 0 = off
    mode: Literal["batch_mean", "per_sample"] = "batch_mean"


class DIPConfig(Section):
    kind: Literal["none", "i", "ii"] = "none"
    lambda_od: float = Field(10.0, ge=0)
    lambda_d: float | None = Field(None, ge=0)
    lambda_d_ratio: float | None = Field(None, ge=0)  # lambda_d = ratio * lambda_od
    start_epoch: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "DIPConfig":
        if self.lambda_d is not None and self.lambda_d_ratio is not None:
            raise ValueError("give lambda_d or lambda_d_ratio, not both")
        return self

    @property
    def lambda_diag(self) -> float:
        """lambda_d: given directly, as a ratio of lambda_od, or the paper's default."""
        if self.lambda_d is not None:
            return self.lambda_d
        if self.lambda_d_ratio is not None:
            return self.lambda_d_ratio * self.lambda_od
        # Kumar et al.: lambda_d = 10 lambda_od for DIP-I, = lambda_od for DIP-II.
        return (10.0 if self.kind == "i" else 1.0) * self.lambda_od


class TCConfig(Section):
    beta_tc: float = Field(1.0, ge=0)  # beta-TCVAE weight of TC; 1 = the plain ELBO
    estimator: Literal["mws", "mss"] = "mws"


class ObjectiveConfig(Section):
    likelihood: Literal["mse_mean", "gaussian", "sigma_vae"] = "gaussian"
    sigma2: float = Field(1.0, gt=0)  # decoder variance of the gaussian likelihood (z-scored units)
    kl: KLConfig = Field(default_factory=KLConfig)
    free_bits: FreeBitsConfig = Field(default_factory=FreeBitsConfig)
    dip: DIPConfig = Field(default_factory=DIPConfig)
    tc: TCConfig = Field(default_factory=TCConfig)


class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip_norm: float | None = Field(5.0, gt=0)


class TrainConfig(Section):
    epochs: int = Field(200, gt=0)
    seed: int = 0
    mixed_precision: bool = True  # bf16/fp16 on GPU; ignored on CPU
    checkpoint_every: int = Field(10, gt=0)
    image_every: int = Field(10, gt=0)


class ExperimentConfig(Section):
    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        stride = 2 ** self.model.depth
        if self.data.size % stride:
            raise ValueError(f"data.size {self.data.size} must be divisible by 2**model.depth = {stride}")
        grid = self.model.broadcast_grid
        if self.model.decoder == "broadcast" and grid is not None:
            if grid > self.data.size or self.data.size % grid or (self.data.size // grid) & (self.data.size // grid - 1):
                raise ValueError(
                    f"model.broadcast_grid {grid} must divide data.size {self.data.size} by a power of 2"
                )
        return self

    @property
    def in_channels(self) -> int:
        return len(self.data.modalities)


# ---------------------------------------------------------------------------
# Loading


def yaml_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def experiment_names() -> list[str]:
    return yaml_names(CONFIG_DIR)


def resolve_yaml(name_or_path: str | Path, directory: Path, kind: str) -> Path:
    """The YAML file of a name (``directory/<name>.yaml``) or a path; ``kind`` names it in errors."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: no such {kind} file")
        return path
    named = directory / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(
            f"unknown {kind} '{name_or_path}': give a YAML path or one of {', '.join(yaml_names(directory))}"
        )
    return named


def _resolve(name_or_path: str | Path) -> Path:
    return resolve_yaml(name_or_path, CONFIG_DIR, "experiment")


def read_yaml(path: Path) -> dict:
    """A YAML mapping read safely; syntax errors become one line naming the file and line."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _raw_experiment(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = _resolve(base) if not Path(str(base)).suffix else (path.parent / base)
    return deep_merge(_raw_experiment(base_path, seen + (path.resolve(),)), raw)


def parse_override(item: str) -> tuple[str, Any]:
    """``"model.z_dim=16"`` -> ``("model.z_dim", 16)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key=value, e.g. objective.kl.beta=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict, key: str, value: Any, schema: type[BaseModel] = None) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, checking the path against the schema."""
    parts = key.split(".")
    node, model = raw, schema
    for i, part in enumerate(parts):
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                where = ".".join(parts[:i]) or "top level"
                raise ConfigError(f"override '{key}': unknown key '{part}' in {where}; valid keys: {', '.join(fields)}")
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key (check its spelling and section)")
        elif e["type"] in ("value_error", "assertion_error"):
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: {loc + ': ' if e['loc'] else ''}{msg}")
        else:
            lines.append(f"{source}: {loc}: {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)


def validate_experiment(raw: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_experiment(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment by name or path, apply dotted ``key=value`` overrides, validate."""
    path = _resolve(name_or_path)
    raw = _raw_experiment(path)
    raw.setdefault("name", path.stem)
    for item in overrides:
        set_dotted(raw, *parse_override(item), schema=ExperimentConfig)
    return validate_experiment(raw, source=str(path))


def dump_experiment(cfg: ExperimentConfig) -> str:
    """The full configuration as YAML, loadable again with :func:`load_experiment`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
