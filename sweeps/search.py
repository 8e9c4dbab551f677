"""The Ray Tune and Optuna side of a sweep: the study, the searcher, the stopper, ASHA and the trainable.

How a trial ends, as Optuna records it (Ray's stock ``OptunaSearch`` records every stopped trial
as COMPLETE with its last value and leaves a trial whose value is NaN RUNNING forever; the
sweep's own :class:`SweepSearch` tells Optuna what happened):

============  =========  =============================================================
status        state      why
============  =========  =============================================================
completed     COMPLETE   ran its epochs; its last values are the objectives
collapsed     PRUNED     the collapse rule stopped it (``sweeps.collapse_rule``), or collapse
                         was predicted (``sweeps.prediction``) and it stopped after epoch 1
asha_stopped  PRUNED     ASHA stopped it
diverged      FAIL       a loss term became NaN or infinite
failed        FAIL       it raised, or an objective was missing or not finite
interrupted   FAIL       the sweep stopped before it ended (or began): it is enqueued
                         again with its parameters and run directory, so a resumed
                         sweep continues it
============  =========  =============================================================

``status`` and ``stop_reason`` go to the trial's user attributes; a COMPLETE or PRUNED trial
also carries each of the sweep's constraints (``Trial.set_constraint``, :func:`constraint_value`:
the last value's excess over its bound; infinite for a collapsed trial or a value never
reported), which TPE uses to rank a trial that breaks one below every trial that meets them all,
and those that break them by their excess. PRUNED counts as bad for
TPE: Optuna 5's ``TPESampler._sample`` takes COMPLETE and PRUNED trials, and
``_split_trials`` fills the "good" group with COMPLETE trials first (best first) and
only then with PRUNED ones, so a PRUNED trial is never preferred to a COMPLETE one;
without intermediate values (every multi-objective study) PRUNED trials tie among
themselves (``_get_pruned_trial_score``). FAIL trials are left out of the model.

Each trial's run directory is ``<run_root>/trial-NNNN``, numbered in the order trials first
start (:func:`next_run_name`), recorded in the user attribute ``run_name``: a trial enqueued
again keeps it, so it resumes from the checkpoint there, and the names stay a sequence
without gaps while Optuna's trial numbers count each continuation as a new trial.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from trainables.trial import train_trial
from vae.config import ConfigError
from vae.run_files import read_epochs

from .space import RUN_NAME
from .spec import Constraint, Sweep
from .collapse_rule import HISTORY_KEYS, Outcome, ScheduleTargets, collapse_history, numeric_rows, trial_outcome

PREDICTION_KEYS = (*HISTORY_KEYS, "recon_mu")  # the sigma-VAE's sigma^2_eff needs the first epoch's recon(mu)

logger = logging.getLogger(__name__)

STATES = {
    "completed": TrialState.COMPLETE, "collapsed": TrialState.PRUNED, "asha_stopped": TrialState.PRUNED,
    "diverged": TrialState.FAIL, "failed": TrialState.FAIL, "interrupted": TrialState.FAIL,
}


# --------------------------------------------------------------------------- the study


def open_study(storage: optuna.storages.BaseStorage, study_name: str, sweep: Sweep) -> optuna.Study:
    """The sweep's study, created with the sweep's directions and its enqueued points, or loaded."""
    directions = ["maximize" if mode == "max" else "minimize" for _, mode in sweep.objectives]
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions)
        for point in sweep.spec.enqueue:
            study.enqueue_trial(point.params, user_attrs={"enqueued": point.name, "audited": point.audited})
        return study
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study '{study_name}' optimises {study.directions}, not this sweep's objectives")
    return study


def trial_by_number(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> optuna.Trial:
    """The unfinished trial ``number`` of ``study``, to set attributes on (Optuna's storage interface)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def requeue(
    study: optuna.Study, storage: optuna.storages.BaseStorage, trial: FrozenTrial | optuna.Trial, reason: str
) -> None:
    """Close an unfinished ``trial`` as FAIL (interrupted) and enqueue its parameters and run directory again."""
    running = trial if isinstance(trial, optuna.Trial) else trial_by_number(study, storage, trial.number)
    running.set_user_attr("status", "interrupted")
    running.set_user_attr("stop_reason", reason)
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    carried = {key: trial.user_attrs[key] for key in (RUN_NAME, "enqueued", "audited") if key in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={**carried, "continues": trial.number})


ORPHANED = "interrupted: the sweep's driver ended while it ran; continued by a later trial"


def requeue_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage, reason: str = ORPHANED) -> list[str]:
    """Run names of the trials a stopped driver left RUNNING, now closed and enqueued again."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        requeue(study, storage, trial, reason)
    return [trial.user_attrs.get(RUN_NAME, f"Optuna trial {trial.number}") for trial in orphans]


def continuations(study: optuna.Study) -> list[str]:
    """Run names of the interrupted trials enqueued again and waiting to continue."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return [t.user_attrs[RUN_NAME] for t in waiting if "continues" in t.user_attrs and RUN_NAME in t.user_attrs]


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the sweep's ``num_samples``: finished, and not interrupted."""
    return sum(
        1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        if t.user_attrs.get("status") != "interrupted"
    )


def next_run_name(study: optuna.Study) -> str:
    """``trial-NNNN`` with the first number no trial's run directory has: trials are numbered in the
    order they first start, without gaps, whatever Optuna numbers the trials that continue them."""
    taken = {t.user_attrs.get(RUN_NAME) for t in study.get_trials(deepcopy=False)}
    number = len(taken - {None})
    while f"trial-{number:04d}" in taken:
        number += 1
    return f"trial-{number:04d}"


def suggest(sweep: Sweep, trial: optuna.Trial) -> dict[str, Any]:
    """Define-by-run space of :class:`SweepSearch`: samples the parameters, names the run directory."""
    sweep.space.suggest(trial)
    run_name = trial.user_attrs.get(RUN_NAME) or next_run_name(trial.study)
    trial.set_user_attr(RUN_NAME, run_name)
    return {RUN_NAME: run_name}


# --------------------------------------------------------------------------- a trial's history


def params_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial config's sampled parameters (everything but its run name)."""
    return {key: value for key, value in config.items() if key != RUN_NAME}


def trial_collapse(sweep: Sweep, run_root: Path, config: Mapping[str, Any]) -> tuple[int, bool, str | None]:
    """``(streak, ends_collapsed, predicted)`` of the trial of ``config``, from its ``epochs.csv``: its
    collapse history (:func:`sweeps.collapse_rule.collapse_history`) and, when the sweep stops
    predicted collapse and the trial has run an epoch, the prediction's reason (else None)."""
    early, params = sweep.spec.early_stop, params_of(config)
    rows = numeric_rows(read_epochs(run_root / config[RUN_NAME]), PREDICTION_KEYS)
    predicted = None
    if early.stops_predicted and rows:
        prediction = sweep.predicted_collapse(params, first_epoch=rows[0])
        predicted = prediction.reason() if prediction is not None else None
    if early.collapse_rule is None:
        return 0, False, predicted
    targets = ScheduleTargets.of(sweep.experiment_for(params))
    return (*collapse_history(rows, early.collapse_rule, targets), predicted)


class CollapseStopper(Stopper):
    """Stops a trial once its collapse streak reaches the rule's patience, or after its first epoch
    when its collapse is predicted.

    Stateless: both are recomputed from the trial's own ``epochs.csv`` at every result.
    """

    def __init__(self, sweep: Sweep, run_root: Path):
        self.sweep, self.run_root = sweep, run_root
        rule = sweep.spec.early_stop.collapse_rule
        self.patience = rule.patience if rule is not None else math.inf

    def __call__(self, trial_id: str, result: dict) -> bool:
        streak, _, predicted = trial_collapse(self.sweep, self.run_root, result["config"])
        return streak >= self.patience or predicted is not None

    def stop_all(self) -> bool:
        return False


class RecordingASHA(ASHAScheduler):
    """ASHA on one metric, counted in epochs, remembering which trials it stopped.

    The record tells an ASHA stop apart from a trial stopped by the end of the sweep.
    """

    def __init__(self, sweep: Sweep):
        metric, mode = sweep.asha_objective
        asha = sweep.spec.early_stop.asha
        # Epochs, not training_iteration: the latter starts again at 1 when Tune retries a trial.
        super().__init__(
            time_attr="epoch", metric=metric, mode=mode, max_t=sweep.epochs,
            grace_period=min(asha.grace_period, sweep.epochs), reduction_factor=asha.reduction_factor,
        )
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return decision


# --------------------------------------------------------------------------- the searcher


def make_sampler(sweep: Sweep, seed: int | None) -> optuna.samplers.TPESampler:
    """The sweep's TPE sampler (``sampler:`` in the sweep file; ``bench/samplers.py`` measures the choices)."""
    spec = sweep.spec.sampler
    return optuna.samplers.TPESampler(seed=seed, multivariate=spec.multivariate, group=spec.group,
                                      constant_liar=spec.constant_liar)


class SweepSearch(Searcher):
    """Tune's searcher over a sweep's Optuna study: each Tune trial is one ``study.ask()`` whose
    parameters the sweep's space samples (define-by-run), told how it really ended (module docstring).

    Built on the public interfaces only: Tune's ``Searcher`` and Optuna's ask-and-tell.
    """

    def __init__(
        self,
        sweep: Sweep,
        study_name: str,
        storage: optuna.storages.BaseStorage,
        run_root: Path,
        seed: int | None = None,
        asha: RecordingASHA | None = None,
    ):
        super().__init__()  # no metric or mode for Tune: the study has the sweep's objectives
        self.sweep, self.run_root, self.asha, self.storage = sweep, run_root, asha, storage
        self.study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(sweep, seed))
        self.trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial
        self.finished: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}  # Tune trial id -> how it ended
        self._first_epoch: dict[str, int] = {}

    def suggest(self, trial_id: str) -> dict[str, Any]:
        ot_trial = self.trials.setdefault(trial_id, self.study.ask())
        run_name = suggest(self.sweep, ot_trial)
        return {**ot_trial.params, **run_name}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._first_epoch.setdefault(trial_id, int(result["epoch"]))
        if len(self.sweep.objectives) > 1 or trial_id in self.finished:
            return  # Optuna takes no intermediate values in a multi-objective study
        value = result.get(self.sweep.objectives[0][0])
        if isinstance(value, (int, float)) and math.isfinite(value):
            try:
                self.trials[trial_id].report(float(value), step=int(result["epoch"]))
            except (UpdateFinishedTrialError, NotImplementedError) as err:
                logger.warning("trial %s: intermediate value not recorded: %s", trial_id, err)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self.trials.get(trial_id)
        if ot_trial is None or trial_id in self.finished:
            return
        self.finished.add(trial_id)
        outcome, values = self._judge(trial_id, result, error)
        self.outcomes[trial_id] = outcome
        try:
            if trial_id in self._first_epoch:
                ot_trial.set_user_attr("first_epoch", self._first_epoch[trial_id])
            if outcome.status == "interrupted":
                requeue(self.study, self.storage, ot_trial, outcome.reason)
            else:
                self._tell(ot_trial, outcome, values, result)
        except UpdateFinishedTrialError:
            logger.warning("trial %s: already finished in the study; left as it is", trial_id)

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint: which Optuna trial each Tune trial is (the study itself is in its storage)."""
        state = {"trials": {tune_id: t.number for tune_id, t in self.trials.items()}, "finished": sorted(self.finished)}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.trials = {tune_id: trial_by_number(self.study, self.storage, number)
                       for tune_id, number in state["trials"].items()}
        self.finished = set(state["finished"])

    def _judge(self, trial_id: str, result: dict | None, error: bool) -> tuple[Outcome, list]:
        """How the trial ended, and its objectives' last values."""
        ot_trial, rule = self.trials[trial_id], self.sweep.spec.early_stop.collapse_rule
        streak, ends_collapsed, predicted = 0, False, None
        if result and not error:
            config = {**ot_trial.params, RUN_NAME: ot_trial.user_attrs[RUN_NAME]}
            streak, ends_collapsed, predicted = trial_collapse(self.sweep, self.run_root, config)
        asha_stopped = self.asha is not None and trial_id in self.asha.stopped
        outcome = trial_outcome(result, error, streak, rule, asha_stopped, ends_collapsed, predicted)
        metrics = [metric for metric, _ in self.sweep.objectives]
        values = [result.get(metric) for metric in metrics] if result else []
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if outcome.status == "completed" and not finite:
            outcome = Outcome("failed", f"an objective ({', '.join(metrics)}) was missing or not finite: {values}")
        return outcome, values

    def _tell(self, ot_trial: optuna.Trial, outcome: Outcome, values: list, result: dict | None) -> None:
        ot_trial.set_user_attr("status", outcome.status)
        ot_trial.set_user_attr("stop_reason", outcome.reason)
        state = STATES[outcome.status]
        if state != TrialState.FAIL:  # TPE models COMPLETE and PRUNED trials: both carry their constraints
            for constraint in self.sweep.spec.constraints:
                ot_trial.set_constraint(constraint.metric, constraint_value(constraint, outcome, result))
        try:
            self.study.tell(ot_trial, values if state == TrialState.COMPLETE else None, state=state)
        except ValueError as err:  # a value Optuna refuses: never leave the trial RUNNING
            logger.warning("trial %d: %s; recorded as FAIL", ot_trial.number, err)
            self.study.tell(ot_trial, state=TrialState.FAIL)


def constraint_value(constraint: Constraint, outcome: Outcome, result: dict | None) -> float:
    """What Optuna is told of ``constraint`` for a trial that ended as ``outcome`` (> 0: broken).

    A collapsed trial breaks every constraint (infinitely): a collapsed code trivially sits at the
    prior, and TPE puts a PRUNED trial that meets the constraints *above* a COMPLETE one that does
    not, so it would steer the search towards collapse. A value never reported breaks it too.
    """
    value = (result or {}).get(constraint.metric)
    if outcome.status == "collapsed" or not (isinstance(value, (int, float)) and math.isfinite(value)):
        return math.inf
    return constraint.violation(value)


# --------------------------------------------------------------------------- the trainable


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep: Sweep) -> None:
    """The sweep's Tune trainable: a trial config of ``trainables`` from the sampled parameters.

    ``base`` is :func:`trainables.trial_config` of the sweep's experiment. A trial whose run
    directory already holds its final epoch (it ended while the sweep's driver was being
    killed, before Optuna heard of it) reports that epoch again instead of training.
    """
    run_dir = Path(base["run_root"]) / config[RUN_NAME]
    rows = read_epochs(run_dir)
    if rows and rows[-1]["status"] in ("completed", "diverged"):
        tune.report({key: _number(value) for key, value in rows[-1].items()})
        return
    train_trial({**base, "overrides": sweep.trial_overrides(params_of(config)), "run_name": config[RUN_NAME]})


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def trainable(sweep: Sweep, base: dict[str, Any]):
    """:func:`run_trial` with its constants and the resources of one trial, for ``tune.Tuner``."""
    resources = sweep.spec.resources.trial_resources()
    return tune.with_resources(tune.with_parameters(run_trial, base=base, sweep=sweep), resources.placement())
