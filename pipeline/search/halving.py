"""Early stopping whose decisions depend on reported values only, never on timing.

Ray Tune's ASHA compares a trial reaching a rung with whatever other trials happened to record that rung
before it, so two runs of one study stop different trials when concurrent trials race. Here trials run
in batches (``ConcurrencyLimiter(batch=True)``: a batch of ``batch_size`` trials starts only after the
previous batch has ended), and a trial reaching a rung is compared only with the values that trials of
*earlier* batches recorded there, which are final by then. The rule is ASHA's (Li et al., 2020,
"A System for Massively Parallel Hyperparameter Tuning", Alg. 2): rungs at ``grace·η^k < max_t``; stop a
trial whose objective is worse than the best 1/η of the values recorded at that rung.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from pipeline.search.cell import SearchSettings


class BatchedSuccessiveHalving(FIFOScheduler):
    """ASHA's rung rule, restricted to finished batches (see the module docstring). It minimises the metric of
    ``tune.TuneConfig(metric=..., mode="min")``."""

    def __init__(self, *, time_attr: str, grace_period: float, reduction_factor: float, max_t: float,
                 batch_size: int):
        if not 0 < grace_period <= max_t or reduction_factor <= 1 or batch_size < 1:
            raise ValueError("BatchedSuccessiveHalving needs 0 < grace_period <= max_t, reduction_factor > 1, "
                             "batch_size >= 1")
        super().__init__()
        self.time_attr = time_attr
        self.reduction_factor, self.batch_size = reduction_factor, batch_size
        self.rungs = _rungs(grace_period, reduction_factor, max_t)
        self._batch_of: dict[str, int] = {}  # trial id -> batch index (creation order // batch_size)
        self._recorded: list[dict[str, float]] = [{} for _ in self.rungs]  # per rung: trial id -> objective
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if mode not in (None, "min"):
            raise ValueError(f"BatchedSuccessiveHalving minimises; got mode={mode!r}")
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._batch_of[trial.trial_id] = len(self._batch_of) // self.batch_size

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self.time_attr not in result or self.metric not in result:
            return TrialScheduler.CONTINUE
        return self.decide(trial.trial_id, float(result[self.time_attr]), float(result[self.metric]))

    def decide(self, trial_id: str, time: float, value: float) -> str:
        """Record ``value`` at every rung ``time`` has newly reached; STOP if it loses at one of them."""
        batch = self._batch_of.setdefault(trial_id, len(self._batch_of) // self.batch_size)
        for milestone, recorded in zip(self.rungs, self._recorded):
            if time < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = value
            earlier = [v for other, v in recorded.items() if self._batch_of[other] < batch]
            if earlier and value > float(np.percentile(earlier, 100.0 / self.reduction_factor)):
                self.stopped.add(trial_id)
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"BatchedSuccessiveHalving: rungs {self.rungs}, {len(self.stopped)} stopped"


def study_halving(settings: SearchSettings, time_attr: str) -> BatchedSuccessiveHalving:
    """The halving rule of a cell: grace ``asha_grace_epochs``, η ``asha_reduction_factor``, batches of
    ``max_concurrent``, ``max_t`` the most epochs a trial can run."""
    return BatchedSuccessiveHalving(time_attr=time_attr, grace_period=settings.asha_grace_epochs,
                                    reduction_factor=settings.asha_reduction_factor,
                                    max_t=max(settings.search.max_epochs, settings.asha_grace_epochs),
                                    batch_size=settings.max_concurrent)


def _rungs(grace_period: float, reduction_factor: float, max_t: float) -> tuple[float, ...]:
    """``grace·η^k`` for every k with ``grace·η^k < max_t`` (at least the grace period)."""
    rungs = [grace_period]
    while rungs[-1] * reduction_factor < max_t:
        rungs.append(rungs[-1] * reduction_factor)
    return tuple(rungs)
