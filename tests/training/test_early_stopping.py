"""Best tracking and patience: NaN never wins, and the counter survives a resume."""

from __future__ import annotations

import math

from speechprompt.training.early_stopping import BestTracker


def test_patience_counts_evaluations_without_improvement() -> None:
    t = BestTracker(higher_is_better=True, patience=2)
    assert t.update(0.5, 10) and t.best_step == 10
    assert not t.update(0.5, 20) and not t.should_stop  # equal is not better
    assert not t.update(0.4, 30) and t.should_stop
    assert t.update(0.9, 40) and t.bad_evals == 0 and not t.should_stop


def test_nan_is_never_best_and_lower_is_better_for_losses() -> None:
    t = BestTracker(higher_is_better=False, patience=3)
    assert not t.update(math.nan, 1) and t.best is None and t.bad_evals == 1
    assert t.update(2.0, 2) and t.update(1.0, 3)
    assert not t.update(math.nan, 4) and not t.update(1.5, 5) and t.best == 1.0 and t.best_step == 3


def test_no_patience_never_stops_and_the_state_round_trips() -> None:
    t = BestTracker(True, patience=0)
    for step in range(10):
        t.update(0.0, step)
    assert not t.should_stop and t.bad_evals == 9
    resumed = BestTracker(True, patience=12)
    resumed.load_state_dict(t.state_dict())
    assert (resumed.best, resumed.best_step, resumed.bad_evals) == (0.0, 0, 9)
    for step in range(10, 13):
        resumed.update(-1.0, step)
    assert resumed.should_stop  # the 9 earlier evaluations still count after a resume
