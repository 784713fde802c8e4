"""The halving rule decides from reported values only: the order in which concurrent trials report is irrelevant."""

from __future__ import annotations

import itertools

import pytest
from ray.tune.schedulers import TrialScheduler

from pipeline.search.halving import BatchedSuccessiveHalving

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _scheduler() -> BatchedSuccessiveHalving:
    scheduler = BatchedSuccessiveHalving(time_attr="epoch", grace_period=1.0, reduction_factor=3, max_t=9.0, batch_size=2)
    for trial_id in ("a", "b", "c", "d"):  # batches {a, b} and {c, d}, in creation order
        scheduler.decide(trial_id, 0.0, 0.0)
    return scheduler


def test_rungs_are_grace_times_powers_of_the_reduction_factor_below_max_t():
    assert _scheduler().rungs == (1.0, 3.0)


def test_the_first_batch_is_never_stopped_and_later_batches_meet_asha_cutoff():
    scheduler = _scheduler()
    assert scheduler.decide("a", 1.0, 2.0) == CONTINUE
    assert scheduler.decide("b", 1.0, 4.0) == CONTINUE  # same batch as a: not compared with it
    # cutoff at rung 1 = 33.3rd percentile of {2, 4} = 2.667 (ASHA's (1 - 1/η) quantile of rewards = -loss)
    assert scheduler.decide("c", 1.0, 2.6) == CONTINUE
    assert scheduler.decide("d", 1.5, 2.7) == STOP
    assert scheduler.stopped == {"d"}


@pytest.mark.parametrize("order", list(itertools.permutations(["c", "d"])))
def test_decisions_do_not_depend_on_which_concurrent_trial_reports_first(order):
    scheduler = _scheduler()
    scheduler.decide("a", 1.0, 1.0)
    scheduler.decide("b", 1.0, 3.0)
    values = {"c": 2.0, "d": 1.2}
    decisions = {trial_id: scheduler.decide(trial_id, 1.0, values[trial_id]) for trial_id in order}
    assert decisions == {"c": STOP, "d": CONTINUE}


def test_a_trial_is_judged_once_per_rung_and_again_at_the_next():
    scheduler = _scheduler()
    for trial_id, value in (("a", 1.0), ("b", 1.0)):
        scheduler.decide(trial_id, 3.0, value)  # records both rungs at once
    assert scheduler.decide("c", 1.0, 0.5) == CONTINUE
    assert scheduler.decide("c", 2.0, 9.0) == CONTINUE  # no rung between 1 and 3
    assert scheduler.decide("c", 3.0, 1.5) == STOP
