"""A sweep's search space: parameters read from YAML, suggested through an Optuna trial.

Each entry of a sweep's ``space`` is one Optuna parameter::

    objective.kl.beta:     {low: 0.01, high: 10, log: true}           # float (the default type)
    model.z_dim:           {type: int, low: 16, high: 128, log: true}  # int
    objective.likelihood:  {choices: [mse_mean, gaussian, sigma_vae]}  # categorical
    objective.sigma2:      {low: 0.01, high: 1, log: true, when: {objective.likelihood: gaussian}}
    free_bits:                                                         # a group: each choice sets
      choices: {none: {objective.free_bits.floor: 0.0}, floor: {}}     # several keys at once
    objective.free_bits.floor: {low: 0.01, high: 1, log: true, when: {free_bits: floor}}
    objective.dip.start_epoch: {low: 0, high: 0.25, of_epochs: true}   # a fraction of train.epochs

A parameter's name is the dotted experiment key it sets, except for a group, whose name is
free and whose choices map to ``{key: value}`` settings. ``when`` makes a parameter
conditional: it is sampled only when every named earlier parameter took one of the given
values (Optuna's define-by-run), and otherwise the experiment keeps its own value.
``of_epochs`` scales the sampled value by ``train.epochs``, so a schedule searched as a
fraction of the run stays meaningful when ``--max-epochs`` changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping

from vae.config import ConfigError, ExperimentConfig, set_dotted

if TYPE_CHECKING:
    import optuna

Scalar = str | int | float | bool | None
Kind = Literal["float", "int", "categorical", "group"]
_KEYS = {"type", "low", "high", "log", "step", "choices", "when", "of_epochs"}
RUN_NAME = "run_name"  # the key of a trial's config, besides its parameters, naming its run directory


@dataclass(frozen=True)
class Param:
    """One searched parameter; ``settings`` holds a group's ``{choice: {key: value}}``."""

    name: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] = ()
    settings: Mapping[Scalar, Mapping[str, Any]] = field(default_factory=dict)
    when: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict)
    of_epochs: bool = False

    def active(self, values: Mapping[str, Scalar]) -> bool:
        """Whether the parameter is sampled, given the values the earlier ones took."""
        return all(
            name in values and any(_same(values[name], value) for value in allowed) for name, allowed in self.when.items()
        )

    def suggest(self, trial: optuna.Trial) -> Scalar:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind in ("categorical", "group"):
            return any(_same(value, choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind == "float" or float(value).is_integer())

    def extremes(self) -> tuple[Scalar, ...]:
        """The values that bound what the parameter can take: its range's ends or its choices."""
        return self.choices if self.kind in ("categorical", "group") else (self.low, self.high)

    def settings_for(self, value: Scalar, epochs: int) -> dict[str, Any]:
        """The experiment keys the sampled ``value`` sets."""
        if self.kind == "group":
            return dict(next(s for choice, s in self.settings.items() if _same(choice, value)))
        return {self.name: value * epochs if self.of_epochs else value}


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (YAML's ``1`` and ``true`` must not match each other)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def suggest(self, trial: optuna.Trial) -> dict[str, Scalar]:
        """The values of one trial, in order; inactive conditional parameters are not sampled."""
        values: dict[str, Scalar] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return values

    def overrides(self, values: Mapping[str, Scalar], epochs: int) -> dict[str, Any]:
        """The dotted experiment overrides of a trial's sampled ``values``."""
        out: dict[str, Any] = {}
        for param in self.params:
            if param.name in values:
                out.update(param.settings_for(values[param.name], epochs))
        return out

    def check_point(self, values: Mapping[str, Any], source: str) -> None:
        """Reject a fixed point (an enqueued trial) the space could not have produced."""
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ConfigError(f"{source}: '{unknown[0]}' is not a parameter of the space ({', '.join(self.names)})")
        seen: dict[str, Scalar] = {}
        for param in self.params:
            if param.name not in values:
                continue
            value = values[param.name]
            if not param.active(seen):
                raise ConfigError(f"{source}: '{param.name}' is not sampled here (it needs {_describe_when(param)})")
            if not param.contains(value):
                raise ConfigError(f"{source}: {param.name}={value!r} is outside the space ({_describe_range(param)})")
            seen[param.name] = value


def _describe_when(param: Param) -> str:
    return " and ".join(f"{name} in {list(allowed)}" for name, allowed in param.when.items())


def _describe_range(param: Param) -> str:
    if param.kind in ("categorical", "group"):
        return f"choices {list(param.choices)}"
    return f"{param.kind} from {param.low:g} to {param.high:g}{', log' if param.log else ''}"


# --------------------------------------------------------------------------- reading


def parse_space(raw: Any, source: str) -> Space:
    """The :class:`Space` of a sweep's ``space`` mapping; :class:`ConfigError` names the offending entry."""
    if raw is None or (isinstance(raw, Mapping) and not raw):
        raise ConfigError(f"{source}: space is empty; name at least one parameter to search")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: space must map parameter names to their ranges, got {type(raw).__name__}")
    params: list[Param] = []
    for name, entry in raw.items():
        where = f"{source}: space.{name}"
        params.append(_parse_param(str(name), entry, {p.name: p for p in params}, where))
    return Space(tuple(params))


def _parse_param(name: str, entry: Any, earlier: Mapping[str, Param], where: str) -> Param:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{low: 0.1, high: 1}} or {{choices: [a, b]}}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(_KEYS))}")
    when = _parse_when(entry.get("when") or {}, earlier, where)
    of_epochs = bool(entry.get("of_epochs", False))
    choices = entry.get("choices")
    if choices is not None:
        if any(key in entry for key in ("low", "high", "log", "step")):
            raise ConfigError(f"{where}: give choices or a low/high range, not both")
        if isinstance(choices, Mapping):
            return _parse_group(name, choices, when, where)
        _check_path(name, where)
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list (or a mapping, for a group)")
        for choice in choices:
            if not isinstance(choice, (str, int, float, bool, type(None))):
                raise ConfigError(f"{where}: choice {choice!r} is not a single value (string, number, true/false, null)")
        if len({(type(c), c) for c in choices}) < len(choices):
            raise ConfigError(f"{where}: choices repeat a value")
        if of_epochs and not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where}: of_epochs needs numeric choices")
        return Param(name, "categorical", choices=tuple(choices), when=when, of_epochs=of_epochs)
    _check_path(name, where)
    return _parse_range(name, entry, when, of_epochs, where)


def _parse_range(name: str, entry: Mapping, when: dict, of_epochs: bool, where: str) -> Param:
    kind = entry.get("type", "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}: type must be float or int (categorical parameters give choices), got {kind!r}")
    if "low" not in entry or "high" not in entry:
        raise ConfigError(f"{where}: a range needs both low and high (or give choices)")
    low, high, step, log = entry["low"], entry["high"], entry.get("step"), entry.get("log", False)
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is None and key == "step":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{where}: {key} must be a whole number for an int parameter, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if low >= high:
        raise ConfigError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs bounds > 0, got low={low:g}; use a linear range to include 0")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be > 0 and cannot be combined with log")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when, of_epochs=of_epochs)


def _parse_group(name: str, choices: Mapping, when: dict, where: str) -> Param:
    if name == RUN_NAME or "." in name or "/" in name:
        raise ConfigError(f"{where}: a group's name may hold no '.' or '/' and cannot be '{RUN_NAME}'")
    if not choices:
        raise ConfigError(f"{where}: a group needs at least one choice")
    settings: dict[Scalar, dict[str, Any]] = {}
    for choice, setting in choices.items():
        if not isinstance(choice, str):  # YAML reads on/off/yes/no as booleans; a record keeps names as text
            raise ConfigError(f"{where}: group choice {choice!r} must be named by text; quote it")
        if not isinstance(setting, Mapping):
            raise ConfigError(f"{where}.{choice}: a group choice maps experiment keys to values ({{}} to set none)")
        for key in setting:
            _check_path(str(key), f"{where}.{choice}")
        settings[choice] = dict(setting)
    return Param(name, "group", choices=tuple(settings), settings=settings, when=when)


def _parse_when(when: Any, earlier: Mapping[str, Param], where: str) -> dict[str, tuple[Scalar, ...]]:
    if not isinstance(when, Mapping):
        raise ConfigError(f"{where}: when must map earlier parameters to a value or a list of values")
    out = {}
    for name, allowed in when.items():
        if name not in earlier:
            raise ConfigError(f"{where}: when names '{name}', which is not a parameter listed before this one")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in allowed:
            if not earlier[name].contains(value):
                raise ConfigError(f"{where}: when {name}={value!r} can never hold ({_describe_range(earlier[name])})")
        out[name] = allowed
    return out


def _check_path(path: str, where: str) -> None:
    """An unknown experiment key fails here, with the valid keys of its section."""
    try:
        set_dotted({}, path, None, schema=ExperimentConfig)
    except ConfigError as err:
        raise ConfigError(f"{where}: unknown parameter path: {str(err).split(': ', 1)[1]}") from None
