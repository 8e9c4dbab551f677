"""The chaos benchmark's own parts: its kill schedule and its watch over the trials' epoch rows."""
from __future__ import annotations

from collections import Counter

import pytest

from bench.chaos import DRIVER, RowWatch, kill_schedule


@pytest.mark.parametrize("workers, kinds", [(1, {"trial": 6}), (2, {"trial": 3, "ddp_worker": 3})])
def test_the_schedule_kills_each_kind_and_the_driver_once_mid_sweep(workers, kinds):
    trials, epochs = 20, 4
    schedule = kill_schedule(seed=3, kills=6, trials=trials, epochs=epochs, workers=workers)
    assert Counter(kill.kind for kill in schedule) == {DRIVER: 1, **kinds}
    assert schedule[0].kind != DRIVER
    points = [kill.after_rows for kill in schedule]
    assert points == sorted(set(points)) and points[0] >= 2 and points[-1] < 0.85 * trials * epochs
    assert kill_schedule(3, 6, trials, epochs, workers) == schedule  # seeded
    assert kill_schedule(4, 6, trials, epochs, workers) != schedule


def write_rows(folder, trial: str, rows: int, partial: bool = False) -> None:
    run_dir = folder / trial
    run_dir.mkdir(exist_ok=True)
    text = "epoch,au\n" + "".join(f"{e},1\n" for e in range(1, rows + 1)) + (f"{rows + 1}," if partial else "")
    (run_dir / "epochs.csv").write_text(text)


def test_the_watch_counts_rows_written_again_and_a_restart_from_scratch(tmp_path):
    watch = RowWatch(tmp_path)
    watch.poll()
    assert watch.rows == {}
    write_rows(tmp_path, "trial-0000", 3, partial=True)  # a row being appended is not counted yet
    write_rows(tmp_path, "trial-0001", 1)
    watch.poll()
    assert watch.rows == {"trial-0000": 3, "trial-0001": 1}
    write_rows(tmp_path, "trial-0000", 2)  # back to the checkpoint of epoch 2: epoch 3 is trained again
    write_rows(tmp_path, "trial-0001", 0)  # killed in epoch 2 before any checkpoint reached Tune: allowed
    watch.poll()
    write_rows(tmp_path, "trial-0000", 4)
    watch.poll()
    assert watch.written_twice == {"trial-0000": 1, "trial-0001": 1} and watch.from_scratch == set()
    write_rows(tmp_path, "trial-0000", 0)  # four epochs thrown away: trained again from scratch
    watch.poll()
    assert watch.written_twice["trial-0000"] == 5 and watch.from_scratch == {"trial-0000"}
