"""The Grafana dashboard shipped for a sweep: every query names a metric the sweep exports, by its labels."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

from sweeps.collapse_rule import Outcome
from sweeps.monitoring import (
    EXPORTED_METRICS, METRIC_PREFIX, STATUS_TAG_KEYS, STATUSES, TAG_KEYS, TRIALS_METRIC, status_counts,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "sweeps" / "grafana" / "collapse_sweep.json"
EXPORTED = {f"ray_{METRIC_PREFIX}{key}": set(TAG_KEYS) for key in EXPORTED_METRICS}
EXPORTED[f"ray_{METRIC_PREFIX}{TRIALS_METRIC}"] = set(STATUS_TAG_KEYS)
SELECTOR = re.compile(r"(ray_\w+)(?:\{([^}]*)\})?")
LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def _queries(dashboard: dict) -> list[str]:
    panels = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return panels + variables


def test_every_query_names_an_exported_metric_by_its_own_labels():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert queries
    for query in queries:
        selectors = SELECTOR.findall(query)
        assert selectors, query
        for metric, labels in selectors:
            assert metric in EXPORTED, f"{query}: {metric} is not exported"
            assert set(LABEL.findall(labels)) <= EXPORTED[metric], query
        grouped = re.findall(r"by \(([^)]*)\)", query)
        for group in grouped:
            assert {g.strip() for g in group.split(",")} <= set().union(*EXPORTED.values()), query


def test_the_dashboard_shows_what_the_issue_of_collapse_needs():
    dashboard = json.loads(DASHBOARD.read_text())
    charted = {m for q in _queries(dashboard) for m, _ in SELECTOR.findall(q)}
    for key in ("au", "kl_raw", "recon_mu", "semantic_r2", TRIALS_METRIC):
        assert f"ray_{METRIC_PREFIX}{key}" in charted
    # Grafana's provisioning takes a dashboard with a uid, a title, panels with ids and a datasource variable
    assert dashboard["uid"] == "collapse-sweep" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])


def test_trials_are_counted_by_how_they_ended_or_running():
    trials = [SimpleNamespace(trial_id=t, status=s) for t, s in
              [("a", "RUNNING"), ("b", "TERMINATED"), ("c", "TERMINATED"), ("d", "PENDING")]]
    outcomes = {"b": Outcome("collapsed", "predicted: ..."), "c": Outcome("completed", "")}
    counts = status_counts(trials, outcomes)
    assert set(counts) == set(STATUSES)
    assert counts == {**dict.fromkeys(STATUSES, 0), "running": 1, "collapsed": 1, "completed": 1}
