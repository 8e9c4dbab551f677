"""The shipped sweeps' smoke runs, as the README starts them: the audited trial collapses in every
one, and a run replayed with the seed its sweep.json recorded suggests the same trials and ends
them the same way."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, params_of, ray_env, read_csv

pytestmark = pytest.mark.system


def smoke(name: str, scratch, run: str, *args: str) -> list[dict[str, str]]:
    """``python sweeps/run.py NAME --smoke``; the rows of its trials.csv."""
    results = scratch / "results"
    env = ray_env(scratch)
    done = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), name, "--smoke", "--results", str(results),
                           "--run", run, *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return read_csv(results / name / run / "trials.csv")


def audited(rows: list[dict[str, str]]) -> dict[str, str]:
    (row,) = [row for row in rows if row["audited"] == "true"]
    return row


def test_dip_sbd_smoke_is_replayed_by_its_recorded_seed(scratch):
    first = smoke("dip_sbd", scratch, "first")  # fresh entropy
    seed = json.loads((scratch / "results" / "dip_sbd" / "first" / "sweep.json").read_text())["seed"]
    assert isinstance(seed, int)
    again = smoke("dip_sbd", scratch, "again", "--seed", str(seed))
    assert [params_of(row) for row in again] == [params_of(row) for row in first]
    assert [(row["trial_id"], row["status"]) for row in again] == [(row["trial_id"], row["status"]) for row in first]
    for rows in (first, again):
        assert audited(rows)["status"] == "collapsed", audited(rows)


@pytest.mark.parametrize("name", ["tcvae_sbd", "baseline"])
def test_the_audited_trial_of_every_smoke_collapses(name, scratch):
    row = audited(smoke(name, scratch, "smoke"))
    assert row["status"] == "collapsed" and float(row["final/kl_raw"]) <= 1.0, row
