"""When a trial counts as collapsed, and how each trial ended: pure functions over its epoch history.

A trial is *collapsed* in an epoch when ``KL_raw <= kl_min``: the KL bounds the information
the code carries (I(x; z) <= E KL), so a small one means a closed channel whatever the
active-unit count says (AU has a fixed scale that free bits inflate for nothing, and over a
few validation volumes it is noise); ``au_min`` adds ``AU <= au_min`` when given. Two more
criteria, each enough on its own when given: ``channel_nats <= channel_min`` (the Gaussian
channel information, scale-free: under free bits the KL can sit at the floor with mu shifted by a
constant that carries nothing, as a 20-epoch sweep measured at KL_raw 8.7 nats and 0.00 channel
nats), and ``z_sensitivity <= z_sensitivity_min`` (the decoder output hardly moves with z:
decode(mu) is the template decode(0), whatever the code holds).

The rule waits only for the schedules that could still pull a collapsed code open: capacity
annealing (gamma |KL - C| rewards KL up to C) until C reaches C_max, and DIP-I's weight until
it reaches 1 (its diagonal term lambda_d (Var(mu_j) - 1)^2 makes a constant mu cost lambda_d per
dimension). It does not wait for a KL weight on its way up to beta (more weight only presses
harder toward collapse) nor for DIP-II's (its covariance, Cov(mu) + E[sigma^2], is the identity
at collapse: no cost, no pull); the same reasons decide what ``sweeps.prediction`` exempts.
The first epoch in which those schedules are *settled* opens a grace period of
``grace_epochs``; after it, every collapsed epoch at full strength (settled, and the KL weight
at beta) adds one to the streak, a healthy epoch resets it, and a collapsed epoch with the KL
weight below beta (a warm-up, or a ramp of cyclical annealing, which starts again from zero
and may let the code reopen) neither counts nor resets. The trial stops when the streak
reaches ``patience``, so with cyclical annealing only the plateaus count, and a trial that
revives on the next ramp starts again from zero. (Give a patience longer than one plateau to
demand that the collapse survive a ramp.) A trial whose budget ends before the streak
reaches ``patience`` but whose last epoch is collapsed is collapsed too ("at the end").

Everything is computed from the history the trial writes to its ``epochs.csv`` (the chief
writes each row before it reports the epoch), never from state kept by the sweep's
driver: a stopper, the searcher and the outputs all reach the same verdict, also for a
trial continued from its checkpoint by a resumed sweep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from pydantic import Field

from vae.config import ExperimentConfig, Section

Status = Literal["completed", "collapsed", "diverged", "asha_stopped", "failed", "interrupted"]
# Relative tolerance of "the schedule has reached its target" (the weights pass through a CSV as text).
_FULL_TOLERANCE = 1e-9


class CollapseRule(Section):
    kl_min: float = Field(0.5, ge=0)  # KL_raw (nats, summed over dims) at or below this is collapsed ...
    au_min: float | None = Field(None, ge=0)  # ... with active units at or below this, when given
    # ... or, when given, channel nats (sum_j 0.5 log(1 + Var(mu_j) / E sigma_j^2)) at or below this
    channel_min: float | None = Field(None, ge=0)
    # ... or, when given, a z-sensitivity (||decode(mu) - decode(0)||^2 / data variance) at or below this
    z_sensitivity_min: float | None = Field(None, ge=0)
    patience: int = Field(3, ge=1)  # collapsed full-strength epochs in a row that stop the trial
    grace_epochs: int = Field(0, ge=0)  # epochs ignored after the schedules that can open a code settle

    def criterion(self) -> str:
        """The per-epoch condition, for people."""
        au = "" if self.au_min is None else f"AU <= {self.au_min:g} and "
        channel = "" if self.channel_min is None else f" or channel <= {self.channel_min:g} nats"
        decoder = "" if self.z_sensitivity_min is None else f" or z-sensitivity <= {self.z_sensitivity_min:g}"
        return f"{au}KL_raw <= {self.kl_min:g} nats{channel}{decoder}"


def dip_pulls_collapse_open(cfg: ExperimentConfig) -> bool:
    """DIP-I with a diagonal term: lambda_d (Var(mu_j) - 1)^2 makes a constant mu cost lambda_d per
    dimension. (DIP-II's covariance, Cov(mu) + E[sigma^2], is the identity at collapse: no cost, no pull.)"""
    dip = cfg.objective.dip
    return dip.kind == "i" and dip.lambda_diag > 0


@dataclass(frozen=True)
class ScheduleTargets:
    """The full-strength values of one experiment's KL and capacity schedules, and whether a DIP-I
    weight pulls a collapsed code open (see the module docstring)."""

    beta: float
    capacity_max: float | None
    dip_i: bool

    @staticmethod
    def of(cfg: ExperimentConfig) -> ScheduleTargets:
        kl = cfg.objective.kl
        return ScheduleTargets(kl.beta, kl.capacity_max, dip_pulls_collapse_open(cfg))


def _reached(value: float, target: float) -> bool:
    return value >= target * (1.0 - _FULL_TOLERANCE)


def settled(row: Mapping[str, float], targets: ScheduleTargets) -> bool:
    """Whether, in the epoch ``row``, every schedule that could pull a collapsed code open (its reported
    ``capacity``, and ``dip_weight`` under DIP-I) has reached full strength."""
    if targets.capacity_max is not None and not _reached(row["capacity"], targets.capacity_max):
        return False
    return not targets.dip_i or _reached(row["dip_weight"], 1.0)


def at_full_strength(row: Mapping[str, float], targets: ScheduleTargets) -> bool:
    """Whether the epoch ``row`` is settled and ran with its reported ``kl_weight`` at beta."""
    return _reached(row["kl_weight"], targets.beta) and settled(row, targets)


def is_collapsed(row: Mapping[str, float], rule: CollapseRule) -> bool:
    closed = row["kl_raw"] <= rule.kl_min and (rule.au_min is None or row["au"] <= rule.au_min)
    silent = rule.channel_min is not None and row["channel_nats"] <= rule.channel_min
    ignored = rule.z_sensitivity_min is not None and row["z_sensitivity"] <= rule.z_sensitivity_min
    return closed or silent or ignored


def collapse_streak(rows: Sequence[Mapping[str, float]], rule: CollapseRule, targets: ScheduleTargets) -> int:
    """Collapsed full-strength epochs in a row at the end of ``rows`` (see the module docstring)."""
    streak, grace_ends = 0, None
    for i, row in enumerate(rows):
        if grace_ends is None:
            if not settled(row, targets):
                continue
            grace_ends = i + rule.grace_epochs
        if i < grace_ends:
            continue
        if not is_collapsed(row, rule):
            streak = 0
        elif at_full_strength(row, targets):
            streak += 1
    return streak


def collapse_history(
    rows: Sequence[Mapping[str, float]], rule: CollapseRule | None, targets: ScheduleTargets
) -> tuple[int, bool]:
    """``(streak, ends_collapsed)`` of a trial's epochs for :func:`trial_outcome` (``(0, False)`` without a rule)."""
    if rule is None or not rows:
        return 0, False
    return collapse_streak(rows, rule, targets), is_collapsed(rows[-1], rule)


def numeric_rows(rows: Sequence[Mapping[str, str]], keys: Sequence[str]) -> list[dict[str, float]]:
    """``keys`` of each ``epochs.csv`` row as floats (a missing or empty cell is NaN)."""
    return [{key: float(row.get(key) or math.nan) for key in keys} for row in rows]


HISTORY_KEYS = ("epoch", "au", "kl_raw", "channel_nats", "z_sensitivity", "kl_weight", "capacity", "dip_weight")


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str  # why the trial ended, for people (Optuna's user attribute ``stop_reason``)


def trial_outcome(
    last: Mapping[str, object] | None,
    error: bool,
    streak: int,
    rule: CollapseRule | None,
    stopped_by_asha: bool,
    ends_collapsed: bool = False,
    predicted: str | None = None,
) -> Outcome:
    """How a trial ended, from its last reported metrics and the sweep's rules (``rule`` None: no collapse rule).

    ``streak`` is the trial's collapse streak and ``ends_collapsed`` whether its last epoch
    met the collapse criterion (see :func:`collapse_history`); ``predicted`` the reason of a
    collapse predicted from the data's spectrum (``sweeps.prediction``), which the sweep stops
    after the first epoch, or None. The collapse verdict comes
    before "completed": a trial collapsed in its last epochs is collapsed even when the
    budget ran out at the same moment, or before the rule's grace and patience were over. A
    trial that ended while still running, stopped by neither rule, was interrupted (the
    sweep was stopped).
    """
    if error:
        return Outcome("failed", "error: the trial raised (its Tune folder holds error.txt)")
    if not last:  # Tune let it go before it started
        return Outcome("interrupted", "stopped before its first epoch by the end of the sweep's driver")
    if last.get("status") == "diverged":
        return Outcome("diverged", f"the {last.get('diverged_term') or 'loss'} term became NaN or infinite "
                                   f"in epoch {last.get('epoch')}")
    if predicted:
        return Outcome("collapsed", predicted)
    if rule is not None and streak >= rule.patience:
        return Outcome("collapsed", f"{rule.criterion()} for {streak} full-strength epochs up to epoch {last.get('epoch')}")
    if last.get("status") == "completed":
        if rule is not None and ends_collapsed:
            return Outcome("collapsed", f"at the end: {rule.criterion()} in its last epoch ({last.get('epoch')}), "
                                        "before the rule's grace and patience had run out")
        return Outcome("completed", "")
    if stopped_by_asha:
        return Outcome("asha_stopped", f"ASHA stopped it after epoch {last.get('epoch')}")
    return Outcome("interrupted", f"stopped in epoch {last.get('epoch')} by the end of the sweep's driver")
