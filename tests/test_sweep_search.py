"""The sweep's searcher on its own (no Ray session): define-by-run suggestions, Tune's checkpoint of it, and the
public-API requeue of an unfinished trial."""
import optuna
import yaml
from optuna.trial import TrialState

from helpers import MINIMAL
from sweeps.search import SweepSearch, open_study, requeue_orphans, trial_by_number
from sweeps.space import RUN_NAME
from sweeps.spec import load_sweep


def _searcher(tmp_path, seed=0):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    sweep = load_sweep(str(path))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    open_study(storage, "s-r1", sweep)
    return SweepSearch(sweep, "s-r1", storage, tmp_path / "trials", seed=seed), storage


def test_suggestions_carry_the_parameters_and_a_run_name(tmp_path):
    searcher, _ = _searcher(tmp_path)
    first, second = searcher.suggest("tune-a"), searcher.suggest("tune-b")
    assert first[RUN_NAME] == "trial-0000" and second[RUN_NAME] == "trial-0001"
    assert 0.1 <= first["objective.kl.beta"] <= 10.0 and set(first) == {"objective.kl.beta", RUN_NAME}
    assert searcher.suggest("tune-a") == first  # asked once per Tune trial


def test_a_restored_searcher_tells_the_trials_it_had_asked(tmp_path):
    searcher, storage = _searcher(tmp_path)
    searcher.suggest("tune-a")
    searcher.suggest("tune-b")
    searcher.on_trial_complete("tune-b", result=None, error=True)
    searcher.save(str(tmp_path / "searcher.json"))
    restored = SweepSearch(searcher.sweep, "s-r1", storage, tmp_path / "trials", seed=1)
    restored.restore(str(tmp_path / "searcher.json"))
    assert restored.finished == {"tune-b"} and restored.trials["tune-a"].number == 0
    restored.on_trial_complete("tune-a", result=None, error=True)
    study = optuna.load_study(study_name="s-r1", storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["status"] for t in study.get_trials()] == ["failed", "failed"]


def test_an_orphan_is_closed_and_enqueued_again_through_public_calls(tmp_path):
    searcher, storage = _searcher(tmp_path)
    config = searcher.suggest("tune-a")  # left RUNNING, as by a killed driver
    study = optuna.load_study(study_name="s-r1", storage=storage)
    assert trial_by_number(study, storage, 0).params == {"objective.kl.beta": config["objective.kl.beta"]}
    assert requeue_orphans(study, storage) == ["trial-0000"]
    orphan, waiting = study.get_trials()
    assert orphan.state == TrialState.FAIL and orphan.user_attrs["status"] == "interrupted"
    assert waiting.state == TrialState.WAITING and waiting.user_attrs == {RUN_NAME: "trial-0000", "continues": 0}
    assert searcher.suggest("tune-c") == config  # the next ask continues it: same parameters, same run folder
