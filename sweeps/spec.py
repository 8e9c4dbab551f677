"""Sweep definitions: one YAML per sweep in ``sweeps/`` (the file stem is its name), validated up front.

A sweep file::

    description: ...
    experiment: exp2_dipvae_sbd        # the base experiment (a name in vae/configs or a YAML path)
    overrides: {data.size: 64}         # fixed for every trial (dotted experiment keys)
    space: {...}                       # what is searched (see sweeps/space.py)
    objectives:                        # one: a scalar study; more: multi-objective (Pareto)
      - {metric: semantic_r2, mode: max, without_factors: channel_nats}
      - {metric: recon_mu, mode: min}
    constraints:                       # a trial that breaks one is never best (Optuna constraints)
      - {metric: prior_kl_dim_max, max: 1.0}
    early_stop:
      mode: collapse                   # collapse | asha | collapse+asha | none
      collapse: {kl_min: 2.0, patience: 5, grace_epochs: 5}   # au_min: also require AU <= au_min
      predict: stop                    # collapse predicted from the data's spectrum: stop | warn | off
      asha: {metric: recon_mu, mode: min, grace_period: 10, reduction_factor: 3}
    resources: {workers_per_trial: 1, cpus_per_trial: 4, gpus_per_trial: 1, max_failures: 1}
    sampler: {multivariate: null, group: false, constant_liar: true}   # Optuna's TPE
    budget: {num_samples: 64, max_epochs: 100}
    enqueue:                           # evaluated first, in this order
      - {name: audited exp2, audited: true, params: {...}}
    smoke: {...}                       # merged over the rest with --smoke

Every mistake is a :class:`ConfigError` of one line naming the file and the key; the
command line turns it into exit status 2 before any compute starts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, ValidationError, model_validator

from trainables.resources import TrialResources
from vae.config import (
    ConfigError, ExperimentConfig, Section, deep_merge, format_validation_error, load_experiment, read_yaml,
    resolve_yaml, set_dotted, validate_experiment, yaml_names,
)
from vae.data.spectrum import Spectrum
from vae.objectives import effective_sigma2
from vae.training import reported_metrics

from .collapse_rule import CollapseRule
from .prediction import Prediction, predict
from .space import Scalar, Space, parse_space

SWEEP_DIR = Path(__file__).parent
EARLY_STOP_MODES = ("collapse", "asha", "collapse+asha", "none")
# Keys that decide what the prepared data cache holds: it is built once, before the trials.
_CACHE_KEYS = ("data.root", "data.cache_dir", "data.size", "data.modalities", "data.phantom")


class Objective(Section):
    metric: str
    mode: Literal["min", "max"]
    # The metric in its place when the validation subjects have no segmentation or factor table:
    # a probe of what the code carries (semantic_r2) would read 0 for every trial.
    without_factors: str | None = None


class Constraint(Section):
    """A bound on a metric's final value that a trial must meet to count as best (Optuna constraints)."""

    metric: str
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "Constraint":
        if (self.max is None) == (self.min is None):
            raise ValueError(f"constraint on '{self.metric}': give exactly one of max or min")
        return self

    def violation(self, value: float) -> float:
        """How far ``value`` is outside the bound: <= 0 when the constraint holds (Optuna's convention)."""
        return value - self.max if self.max is not None else self.min - value

    def describe(self) -> str:
        return f"{self.metric} <= {self.max:g}" if self.max is not None else f"{self.metric} >= {self.min:g}"


class AshaSpec(Section):
    metric: str | None = None  # default: the first objective
    mode: Literal["min", "max"] | None = None
    grace_period: int = Field(4, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(3.0, gt=1)


class EarlyStopSpec(Section):
    mode: Literal["collapse", "asha", "collapse+asha", "none"] = "collapse"
    collapse: CollapseRule = Field(default_factory=CollapseRule)
    asha: AshaSpec = Field(default_factory=AshaSpec)
    # Collapse predicted from the data's spectrum (sweeps.prediction): stop such a trial after its
    # first epoch (as collapsed), only say so at start-up, or neither. Mode none stops nothing.
    predict: Literal["stop", "warn", "off"] = "stop"
    # predicted when sigma^2_eff >= margin * lambda_1 (a nonlinear decoder beats the best linear direction a little)
    predict_margin: float = Field(2.0, ge=1.0)
    # The audited point runs to show the collapse the sweep starts from, unless this is true.
    predict_audited: bool = False

    @property
    def stops_predicted(self) -> bool:
        return self.predict == "stop" and self.mode != "none"

    @property
    def collapse_rule(self) -> CollapseRule | None:
        return self.collapse if "collapse" in self.mode else None

    @property
    def uses_asha(self) -> bool:
        return "asha" in self.mode


class ResourcesSpec(Section):
    """What one trial holds; the per-trial CPUs and GPUs are shared evenly among its workers."""

    workers_per_trial: int = Field(1, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_failures: int = Field(0, ge=0)  # restarts of a crashed trial from its last checkpoint
    # Trials at once. Default: as many as the nodes alive at the start can hold; on an
    # autoscaling cluster give what its largest size holds (collapse-sweep cluster says).
    max_concurrent: int | None = Field(None, ge=1)

    def trial_resources(self) -> TrialResources:
        return TrialResources.per_trial(
            self.workers_per_trial, self.cpus_per_trial, self.gpus_per_trial, self.max_failures
        )


class SamplerSpec(Section):
    """Optuna's TPE for the sweep (``bench/samplers.py`` compares the choices at 16 trials at a time)."""

    multivariate: bool | None = None  # None: Optuna's choice (independent for several objectives)
    group: bool = False  # with multivariate: one joint model per conditional sub-space
    constant_liar: bool = True  # running trials count as bad, so parallel suggestions spread out

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> "SamplerSpec":
        if self.group and not self.multivariate:
            raise ValueError("sampler.group needs sampler.multivariate: true")
        return self


class BudgetSpec(Section):
    num_samples: int = Field(32, ge=1)  # trials in all, the enqueued ones included
    max_epochs: int | None = Field(None, ge=1)  # sets train.epochs; None keeps the experiment's


class EnqueuedPoint(Section):
    name: str
    audited: bool = False  # the audited configuration the sweep starts from
    params: dict[str, Any]


def _default_objectives() -> list[Objective]:
    """What the code carries of the tumour through its channel, and the reconstruction: an autoencoder
    wins the second but not the first (docs/metrics.md)."""
    return [Objective(metric="semantic_r2", mode="max", without_factors="channel_nats"),
            Objective(metric="recon_mu", mode="min")]


def _default_constraints() -> list[Constraint]:
    """The aggregate posterior stays near the prior in every dimension, so that beta * sigma^2 -> 0
    (an autoencoder whose code drifts to any scale) cannot win."""
    return [Constraint(metric="prior_kl_dim_max", max=1.0)]


class SweepSpec(Section):
    description: str = ""
    experiment: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] | None = None
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1)
    constraints: list[Constraint] = Field(default_factory=_default_constraints)
    early_stop: EarlyStopSpec = Field(default_factory=EarlyStopSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    enqueue: list[EnqueuedPoint] = Field(default_factory=list)
    smoke: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        metrics = [o.metric for o in self.objectives]
        fallbacks = [o.without_factors or o.metric for o in self.objectives]
        for named in (metrics, fallbacks):
            if len(set(named)) < len(named):
                raise ValueError(f"objectives name a metric twice: {named}")
        asha = self.early_stop.asha
        if asha.metric not in (None, metrics[0]) and asha.mode is None:
            raise ValueError(f"early_stop.asha.mode: give the mode (min or max) of '{asha.metric}'")
        return self


# --------------------------------------------------------------------------- the resolved sweep


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its spec with the command line applied, and the base experiment of every trial."""

    name: str
    spec: SweepSpec
    experiment: ExperimentConfig  # the base experiment with the fixed overrides and train.epochs applied
    space: Space
    smoke: bool = False
    spectrum: Spectrum | None = None  # of the training subjects, once the data are prepared

    @property
    def epochs(self) -> int:
        return self.experiment.train.epochs

    @property
    def objectives(self) -> list[tuple[str, str]]:
        return [(o.metric, o.mode) for o in self.spec.objectives]

    def for_data(self, has_factors: bool) -> tuple[Sweep, list[str]]:
        """This sweep for data with or without factors: without, each objective that names a
        ``without_factors`` metric optimises that one instead; and the lines that say so."""
        swapped = [o for o in self.spec.objectives if o.without_factors and not has_factors]
        if not swapped:
            return self, []
        objectives = [Objective(metric=o.without_factors or o.metric, mode=o.mode) if o in swapped else o
                      for o in self.spec.objectives]
        notes = [f"note: the validation subjects have no segmentation or factor table: objective {o.metric} "
                 f"({o.mode}) is {o.without_factors} instead" for o in swapped]
        return replace(self, spec=self.spec.model_copy(update={"objectives": objectives})), notes

    @property
    def asha_objective(self) -> tuple[str, str]:
        """ASHA's (metric, mode): its own, else the first objective's."""
        asha, first = self.spec.early_stop.asha, self.spec.objectives[0]
        return asha.metric or first.metric, asha.mode or first.mode

    def trial_overrides(self, params: Mapping[str, Scalar]) -> dict[str, Any]:
        """The dotted experiment overrides of a trial's sampled ``params``."""
        return self.space.overrides(params, self.epochs)

    def experiment_for(self, params: Mapping[str, Scalar], source: str = "trial") -> ExperimentConfig:
        raw = self.experiment.model_dump(mode="json")
        for key, value in self.trial_overrides(params).items():
            set_dotted(raw, key, value, schema=ExperimentConfig)
        return validate_experiment(raw, source=source)

    def is_audited(self, params: Mapping[str, Scalar]) -> bool:
        """Whether ``params`` are those of an enqueued point marked ``audited``."""
        return any(point.audited and dict(point.params) == dict(params) for point in self.spec.enqueue)

    def predicted_collapse(
        self, params: Mapping[str, Scalar], first_epoch: Mapping[str, float] | None = None
    ) -> Prediction | None:
        """The prediction that the trial of ``params`` collapses (:mod:`sweeps.prediction`), or None:
        prediction off, no spectrum, an exempt audited point, or no collapse predicted."""
        early = self.spec.early_stop
        if early.predict == "off" or self.spectrum is None:
            return None
        if self.is_audited(params) and not early.predict_audited:
            return None
        prediction = predict(self.experiment_for(params), self.spectrum, early.collapse, early.predict_margin,
                             first_epoch)
        return prediction if prediction is not None and prediction.collapses else None

    def record(self) -> dict[str, Any]:
        """What a resumed sweep needs to run exactly this sweep again (plain YAML/JSON types)."""
        return {
            "sweep": self.name, "smoke": self.smoke,
            "spec": self.spec.model_dump(mode="json"), "experiment": self.experiment.model_dump(mode="json"),
            "spectrum": None if self.spectrum is None else self.spectrum.to_json(),
        }

    @staticmethod
    def from_record(record: Mapping[str, Any], changes: Mapping[str, Any] | None = None) -> Sweep:
        """The sweep of :meth:`record`, with ``changes`` (dotted spec keys such as ``budget.num_samples``)."""
        raw = copy.deepcopy(dict(record["spec"]))
        for key, value in (changes or {}).items():
            set_dotted(raw, key, value, schema=SweepSpec)
        source = f"sweep record '{record['sweep']}'"
        spec = _validate_spec(raw, source)
        experiment = validate_experiment(record["experiment"], source=source)
        spectrum = Spectrum.from_json(record["spectrum"]) if record.get("spectrum") else None
        return Sweep(record["sweep"], spec, experiment, parse_space(spec.space, source), bool(record.get("smoke")),
                     spectrum)


# --------------------------------------------------------------------------- loading


def sweep_names() -> list[str]:
    return yaml_names(SWEEP_DIR)


def sweep_path(name_or_path: str) -> Path:
    """The YAML of a sweep name (``sweeps/<name>.yaml``) or path."""
    return resolve_yaml(name_or_path, SWEEP_DIR, "sweep")


def load_sweep(
    name_or_path: str,
    smoke: bool = False,
    changes: Mapping[str, Any] | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Sweep:
    """Read, merge (``smoke``), change and validate a sweep.

    ``changes`` sets dotted keys of the sweep file (``budget.num_samples``, ``resources.gpus_per_trial``,
    ...); ``overrides`` are ``(key, value)`` experiment overrides fixed for every trial, as
    from ``key=value`` on the command line.
    """
    path = sweep_path(name_or_path)
    source = str(path)
    raw = read_yaml(path)
    if smoke:
        if not isinstance(raw.get("smoke"), dict) or not raw["smoke"]:
            raise ConfigError(f"{source}: --smoke needs a 'smoke:' section of settings to merge")
        raw = deep_merge(raw, raw["smoke"])
    for key, value in (changes or {}).items():
        set_dotted(raw, key, value, schema=SweepSpec)
    for key, value in overrides:
        raw.setdefault("overrides", {})
        if not isinstance(raw["overrides"], dict):
            break  # the spec's validation names the problem
        raw["overrides"][key] = value
    spec = _validate_spec(raw, source)
    space = parse_space(spec.space, source)
    experiment = _base_experiment(spec, path, source)
    sweep = Sweep(path.stem, spec, experiment, space, smoke)
    check_sweep(sweep, source)
    return sweep


def _validate_spec(raw: dict, source: str) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(first_line(format_validation_error(err, source))) from None


def _base_experiment(spec: SweepSpec, path: Path, source: str) -> ExperimentConfig:
    name = spec.experiment
    if Path(name).suffix in (".yaml", ".yml") and not Path(name).is_absolute():
        name = str(path.parent / name)  # a path is relative to the sweep file
    try:
        raw = load_experiment(name).model_dump(mode="json")
    except ConfigError as err:
        raise ConfigError(f"{source}: experiment: {first_line(err)}") from None
    for key, value in spec.overrides.items():
        try:
            set_dotted(raw, key, value, schema=ExperimentConfig)
        except ConfigError as err:
            raise ConfigError(f"{source}: overrides: {err}") from None
    if spec.budget.max_epochs is not None:
        raw["train"]["epochs"] = spec.budget.max_epochs
    try:
        return validate_experiment(raw, source=f"{source}: overrides")
    except ConfigError as err:
        raise ConfigError(first_line(err)) from None


def first_line(err: Exception | str) -> str:
    """The first problem of a (possibly multi-line) error: every error of a sweep is one line."""
    return str(err).splitlines()[0]


# --------------------------------------------------------------------------- checks


def check_sweep(sweep: Sweep, source: str) -> None:
    """Reject, before any compute, what no trial could run or report."""
    spec, space = sweep.spec, sweep.space
    reported = reported_metrics(sweep.experiment.data.modalities)
    metrics = [(f"objectives[{i}].metric", o.metric) for i, o in enumerate(spec.objectives)]
    metrics += [(f"objectives[{i}].without_factors", o.without_factors) for i, o in enumerate(spec.objectives)
                if o.without_factors]
    metrics += [(f"constraints[{i}].metric", c.metric) for i, c in enumerate(spec.constraints)]
    if spec.early_stop.uses_asha:
        metrics.append(("early_stop.asha.metric", sweep.asha_objective[0]))
    for where, metric in metrics:
        if metric not in reported:
            raise ConfigError(f"{source}: {where}: no trial reports '{metric}'; reported metrics: {', '.join(reported)}")
    for name, settings in _settings(space):
        for key in settings:
            if key in spec.overrides:
                raise ConfigError(f"{source}: '{key}' is both searched (space.{name}) and fixed (overrides); keep one")
            if any(key == k or key.startswith(k + ".") for k in _CACHE_KEYS):
                raise ConfigError(
                    f"{source}: space.{name} searches '{key}', which decides the prepared data cache; fix it in overrides"
                )
    for param in space.params:
        for value in param.extremes():
            try:
                sweep.experiment_for({param.name: value}, source=f"{source}: space.{param.name}={value!r}")
            except ConfigError as err:
                raise ConfigError(first_line(err)) from None
    names = [point.name for point in spec.enqueue]
    if len(set(names)) < len(names):
        raise ConfigError(f"{source}: enqueue: two points share a name: {names}")
    for i, point in enumerate(spec.enqueue):
        where = f"{source}: enqueue[{i}] '{point.name}'"
        space.check_point(point.params, where)
        try:
            sweep.experiment_for(point.params, source=where)
        except ConfigError as err:
            raise ConfigError(first_line(err)) from None


def _settings(space: Space) -> list[tuple[str, Mapping[str, Any]]]:
    """``(parameter, {key: value})`` for every way a parameter sets experiment keys."""
    out = []
    for param in space.params:
        if param.kind == "group":
            out.extend((param.name, setting) for setting in param.settings.values())
        else:
            out.append((param.name, {param.name: None}))
    return out


# --------------------------------------------------------------------------- warnings


def collapse_warnings(sweep: Sweep) -> list[str]:
    """One line for each likelihood the space can reach, and each enqueued point, for which collapse is
    the optimum of the loss (:mod:`sweeps.prediction`): the numbers its trials are stopped by.
    Nothing without the data's spectrum or with ``early_stop.predict: off``."""
    early, spectrum = sweep.spec.early_stop, sweep.spectrum
    if spectrum is None or early.predict == "off":
        return []
    threshold = early.predict_margin * spectrum.top
    bound = f"{early.predict_margin:g} x lambda_1 = {threshold:.4g}"
    if early.stops_predicted:
        trials_do, point_does = "they stop after their first epoch as collapsed", "it stops after its first epoch"
    else:
        trials_do, point_does = "they run on (early_stop.predict: warn)", "it runs on (early_stop.predict: warn)"
    lines = []
    cfg = sweep.experiment
    beta, sigma2 = max(_reachable(sweep, "objective.kl.beta")), max(_reachable(sweep, "objective.sigma2"))
    for likelihood in dict.fromkeys(_reachable(sweep, "objective.likelihood")):
        # sigma^2_eff at beta 1; the sigma-VAE's is known only after its first epoch (None here).
        per_beta = effective_sigma2(likelihood, sigma2, 1.0, cfg.in_channels * cfg.data.size**3)
        if per_beta is None or beta * per_beta < threshold:
            continue
        where = (f"from beta {threshold / per_beta:.3g} on" if likelihood == "mse_mean"
                 else f"where beta x sigma2 >= {threshold:.3g}")
        lines.append(f"warning: likelihood {likelihood} (in the space, beta up to {beta:g}) makes collapse the "
                     f"optimum {where}: sigma^2_eff >= {bound} of the data's spectrum; {trials_do} "
                     "(unless a KL floor or DIP-I keeps them open)")
    for point in sweep.spec.enqueue:
        prediction = predict(sweep.experiment_for(point.params), spectrum, early.collapse, early.predict_margin)
        if prediction is None or not prediction.collapses:
            continue
        runs = ("it runs all its epochs to show the collapse the sweep starts from"
                if point.audited and not early.predict_audited else point_does)
        lines.append(f"warning: enqueued point '{point.name}' collapses at the optimum of its loss: sigma^2_eff "
                     f"{prediction.sigma2_eff:.4g} >= {bound}; {runs}")
    return lines


def stopping_notes(sweep: Sweep) -> list[str]:
    """A line when the collapse rule's grace and patience do not fit in a trial's budget."""
    rule = sweep.spec.early_stop.collapse_rule
    if rule is None or rule.grace_epochs + rule.patience < sweep.epochs:
        return []
    return [
        f"note: the collapse rule waits grace {rule.grace_epochs} + patience {rule.patience} full-strength epochs, "
        f"no fewer than the {sweep.epochs} epochs of a trial: it stops no trial early, and a trial still collapsed "
        "in its last epoch is reported as collapsed (at the end); lower early_stop.collapse.patience and "
        "grace_epochs for short runs"
    ]


def _reachable(sweep: Sweep, key: str) -> list[Any]:
    """Every value ``key`` can take in a trial: the base experiment's, unless an unconditional
    parameter always sets it, and each value the space can give it."""
    base = sweep.experiment.model_dump()
    for part in key.split("."):
        base = base[part]
    values = []
    always_set = False
    for param in sweep.space.params:
        if param.kind == "group":
            values += [setting[key] for setting in param.settings.values() if key in setting]
        elif param.name == key:
            values += [param.settings_for(value, sweep.epochs)[key] for value in param.extremes()]
            always_set = always_set or not param.when
    return values if always_set else [base, *values]

