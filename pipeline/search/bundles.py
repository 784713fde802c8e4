"""Batched trials (docs/design.md#batched-trials): K Tune trials of a cell trained in ONE ``LD3Bundle``.

With ``trials_per_bundle`` K > 1, Tune still runs one trial per Optuna suggestion, but each is a thin
*member* (``bundle_member``, ~0 CPU): the searcher numbers its suggestions into bundles of K (the config keys
``bundle`` and ``bundle_size``; a bundle lies inside one ``ConcurrencyLimiter`` batch), and the members of a
bundle meet at one ``BundleWorker`` actor, which holds the trial resources, loads the model and teacher data
once and trains all members' configs in one ``LD3Bundle``, round by round. After each round every member gets
its own ``StepMetrics`` (which it logs to its MLflow run step by step and reports to Tune at the steps the
halving rule records, ``reaches_rung``, and at the round's end, with a lone trial's values), its outcome and,
once it has finished, its final metrics (computed by the worker).
The worker starts the next round once every member still training has confirmed the round
(``BundleWorker.ack``) or ended: the driver's ``BundleMembers`` callback tells the cell's
``BundleCoordinator`` (which creates the workers) about every member Tune stopped or lost, and the worker
drops it from the bundle (``LD3Bundle.stop``). A member's run ends FINISHED, KILLED or FAILED as a trial of
its own would; a worker that dies fails its members with a one-line reason, and a rerun runs them again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray import tune
from ray.exceptions import RayActorError

from ld3.train import LD3Bundle, LD3Result, StepMetrics, TrainingDiverged
from pipeline.devices import placement_tags, worker_device
from pipeline.errors import StudyError, first_line
from pipeline.search.cell import CellContext
from pipeline.search.halving import study_halving
from pipeline.search.space import MEMBER_CPUS
from pipeline.search.trial import (
    EPOCH,
    TrialReporter,
    final_metrics,
    load_cell,
    record_finished,
    recorded_end,
    start_trial_run,
    steps_per_epoch,
    trial_config,
)

BUNDLE_KEY, BUNDLE_SIZE_KEY = "bundle", "bundle_size"  # added to a member's Tune config by the searcher
TAG_BUNDLE = "bundle"  # MLflow tag of a member's run: its bundle's number in the cell
JOIN_TIMEOUT_S = 600.0  # a worker starts with the members it has after this long
REPLY_TIMEOUT_S = 1800.0  # a member silent for this long is dropped; a member waits this long for a round


def bundle_suggestion(config: dict[str, Any] | None, index: int, num_trials: int, size: int) -> dict[str, Any] | None:
    """The ``index``-th suggestion of a search, numbered into bundles of ``size`` (the last may be smaller)."""
    if not isinstance(config, dict):
        return config
    bundle = index // size
    return {**config, BUNDLE_KEY: bundle, BUNDLE_SIZE_KEY: min(size, num_trials - bundle * size)}


def rerun_counts(trials: list[Any], retry_errored: bool) -> dict[int, int]:
    """Per bundle of a restored experiment, how many members will run again (its unfinished trials, and its
    errored ones when they are retried): the number of members its new worker waits for."""
    counts: dict[int, int] = {}
    for trial in trials:
        if BUNDLE_KEY not in trial.config:
            continue
        again = trial.status in ("PENDING", "RUNNING", "PAUSED") or (retry_errored and trial.status == "ERROR")
        counts[trial.config[BUNDLE_KEY]] = counts.get(trial.config[BUNDLE_KEY], 0) + int(again)
    return counts


@dataclass(frozen=True)
class RoundUpdate:
    """What a member gets after a round of its bundle."""

    round: int
    steps: tuple[StepMetrics, ...]  # its training steps of the round
    outcome: LD3Result | TrainingDiverged | None  # set once it has finished
    metrics: dict[str, float] | None = None  # final metrics of a finished LD3Result (``trial.final_metrics``)
    error: str | None = None  # the worker failed: one line


class BundleWorker:
    """A Ray actor (threaded) that trains one bundle's members in one ``LD3Bundle`` (module docstring)."""

    def __init__(self, ctx: CellContext, bundle: int, expected: int, ended: Mapping[str, str]):
        self.ctx, self.bundle, self.expected = ctx, bundle, expected
        self.device = worker_device(ctx.settings.gpus_per_trial)
        self.cond = threading.Condition()
        self.members: list[tuple[str, dict[str, Any]]] = []  # (trial id, sampled params) per slot
        self.updates: dict[int, dict[int, RoundUpdate]] = {}  # slot -> round -> update
        self.acked: dict[int, int] = {}  # slot -> last round it confirmed
        self.ended = dict(ended)  # trial id -> why Tune ended it (from the driver)
        self.error: str | None = None
        self.started = False

    # ---- called by the members and the coordinator ------------------------------------------------
    def join(self, trial_id: str, params: dict[str, Any]) -> tuple[int, dict[str, str]]:
        """Register a member; returns its slot and placement tags once the bundle starts."""
        with self.cond:
            if self.started:
                raise StudyError(f"bundle {self.bundle} started without trial {trial_id}; rerun the same command "
                                 "to run it again")
            slot = len(self.members)
            self.members.append((trial_id, params))
            self.updates[slot] = {}
            self.cond.notify_all()
            self.cond.wait_for(self._everyone_joined, timeout=JOIN_TIMEOUT_S)
            if not self.started:
                self.started = True
                threading.Thread(target=self._train, name=f"bundle-{self.bundle}", daemon=True).start()
            return slot, placement_tags(self.device)

    def result(self, slot: int, round_: int) -> RoundUpdate:
        """The member's update for ``round_`` (waits for the round to end)."""
        with self.cond:
            if not self.cond.wait_for(lambda: round_ in self.updates[slot] or self.error is not None,
                                      timeout=REPLY_TIMEOUT_S):
                raise StudyError(f"bundle {self.bundle} sent no round {round_} within {REPLY_TIMEOUT_S:g} s")
            update = self.updates[slot].get(round_)
            return update if update is not None else RoundUpdate(round_, (), None, error=self.error)

    def ack(self, slot: int, round_: int) -> None:
        """The member has reported ``round_`` to Tune and goes on."""
        with self.cond:
            self.acked[slot] = round_
            self.cond.notify_all()

    def member_ended(self, trial_id: str, reason: str) -> None:
        """Tune ended this member (stopped early, or its trial failed): drop it from the bundle."""
        with self.cond:
            self.ended[trial_id] = reason
            self.cond.notify_all()

    # ---- the training thread -------------------------------------------------------------------
    def _everyone_joined(self) -> bool:
        joined = {trial_id for trial_id, _ in self.members}
        return len(joined) + len(set(self.ended) - joined) >= self.expected

    def _train(self) -> None:
        try:
            torch.set_num_threads(max(1, int(self.ctx.settings.cpus_per_trial)))
            self._run_rounds()
        except Exception as err:  # every member fails with the reason; none waits forever
            with self.cond:
                self.error = f"bundle {self.bundle} failed: {type(err).__name__}: {first_line(err)}"
                self.cond.notify_all()

    def _run_rounds(self) -> None:
        ctx, loaded = self.ctx, load_cell(self.ctx)
        configs = [trial_config(params, ctx) for _, params in self.members]
        steps: list[list[StepMetrics]] = [[] for _ in configs]
        bundle = LD3Bundle(loaded.model.denoiser, ctx.solver.name, ctx.solver.order, loaded.model.schedule,
                           loaded.train, loaded.val, configs, n_steps=ctx.n_steps, decode=loaded.model.decode,
                           loss_fn=loaded.loss_fn, callbacks=[[log.append] for log in steps])
        self._drop_ended(bundle)
        while bundle.active():
            round_, live = bundle.round, bundle.active()
            bundle.run_round()
            outcomes = bundle.outcomes()
            for slot in live:  # every member in the bundle at the round's start gets its update
                outcome = outcomes[slot]
                metrics = final_metrics(ctx, loaded, outcome) if isinstance(outcome, LD3Result) else None
                self._publish(slot, RoundUpdate(round_, tuple(steps[slot]), outcome, metrics))
                steps[slot].clear()
            self._await_members(bundle, round_)

    def _publish(self, slot: int, update: RoundUpdate) -> None:
        with self.cond:
            self.updates[slot][update.round] = update
            self.cond.notify_all()

    def _await_members(self, bundle: LD3Bundle, round_: int) -> None:
        """Wait until every member still training has confirmed ``round_`` or been ended by Tune."""
        live = bundle.active()
        settled = lambda slot: self.acked.get(slot, -1) >= round_ or self.members[slot][0] in self.ended  # noqa: E731
        with self.cond:
            self.cond.wait_for(lambda: all(settled(slot) for slot in live), timeout=REPLY_TIMEOUT_S)
        for slot in live:
            if not settled(slot):
                self.ended[self.members[slot][0]] = f"no reply within {REPLY_TIMEOUT_S:g} s"
        self._drop_ended(bundle)

    def _drop_ended(self, bundle: LD3Bundle) -> None:
        for slot, (trial_id, _) in enumerate(self.members):
            if trial_id in self.ended and slot in bundle.active():
                bundle.stop(slot, self.ended[trial_id])


class BundleCoordinator:
    """A Ray actor per cell (owned by the driver): creates each bundle's worker when its first member asks,
    forwards Tune's member ends to it, and ends the worker once all its members have left (a finished member
    leaves after its last update, any other when Tune ends it), freeing its resources for the next bundles.
    Workers die with it."""

    def __init__(self, ctx: CellContext, expected: Mapping[int, int]):
        self.ctx, self.expected = ctx, dict(expected)
        self.workers: dict[int, Any] = {}
        self.members: dict[int, set[str]] = {}  # bundle -> trial ids that asked for its worker
        self.left: dict[int, dict[str, str]] = {}  # bundle -> trial id -> why it left

    def worker(self, bundle: int, size: int, trial_id: str) -> Any:
        """The bundle's worker (created now with the trial resources if it does not exist)."""
        self.expected.setdefault(bundle, size)
        self.members.setdefault(bundle, set()).add(trial_id)
        if bundle not in self.workers:
            settings = self.ctx.settings
            # the members' CPU shares come out of the bundle's: a bundle asks Ray for cpus_per_trial in all
            cpus = settings.cpus_per_trial - settings.trials_per_bundle * MEMBER_CPUS
            actor = ray.remote(BundleWorker).options(num_cpus=cpus, num_gpus=settings.gpus_per_trial,
                                                     max_concurrency=2 * settings.trials_per_bundle + 4)
            self.workers[bundle] = actor.remote(self.ctx, bundle, self.expected[bundle], self.left.get(bundle, {}))
        return self.workers[bundle]

    def member_ended(self, trial_id: str, bundle: int, reason: str) -> None:
        """A member left its bundle: it finished, or Tune ended it (``reason``)."""
        self.left.setdefault(bundle, {})[trial_id] = reason
        if bundle not in self.workers:
            return
        self.workers[bundle].member_ended.remote(trial_id, reason)
        everyone = self.members[bundle] | set(self.left[bundle])
        if self.members[bundle] <= set(self.left[bundle]) and len(everyone) >= self.expected[bundle]:
            ray.kill(self.workers.pop(bundle))


class BundleMembers(tune.Callback):
    """Driver side: tells the coordinator about every member Tune ended, so no bundle waits for it."""

    def __init__(self, coordinator: Any):
        self.coordinator = coordinator

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "asha")  # a member that trained to its end has left its bundle already

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "its Tune trial failed")

    def _ended(self, trial: Any, reason: str) -> None:
        if BUNDLE_KEY in trial.config:
            self.coordinator.member_ended.remote(trial.trial_id, trial.config[BUNDLE_KEY], reason)


@contextmanager
def bundle_coordinator(ctx: CellContext, expected: Mapping[int, int]) -> Iterator[tuple[CellContext, list[tune.Callback]]]:
    """For a bundled cell: its coordinator actor for the duration of the search, the context naming it and the
    driver callback; for K = 1 the context unchanged and no callback."""
    if not ctx.settings.bundled:
        yield ctx, []
        return
    name = f"ld3-bundles-{uuid.uuid4().hex[:12]}"
    coordinator = ray.remote(BundleCoordinator).options(name=name, num_cpus=0).remote(ctx, expected)
    try:
        yield replace(ctx, bundle_coordinator=name), [BundleMembers(coordinator)]
    finally:
        ray.kill(coordinator)


def bundle_member(params: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable of a bundled cell: one member of a bundle (module docstring)."""
    if BUNDLE_KEY not in params:
        raise StudyError("this trial was created by a study without bundles (trials_per_bundle 1); resume it with "
                         "the same --trials-per-bundle, or start anew with --no-resume")
    config = trial_config(params, ctx)
    run = start_trial_run(ctx, config, {TAG_BUNDLE: str(params[BUNDLE_KEY])})
    with recorded_end(run):
        update = _train_in_bundle(run, params, ctx, steps_per_epoch(ctx, config))
        if isinstance(update.outcome, TrainingDiverged):
            raise update.outcome
    record_finished(run, ctx, update.outcome, update.metrics)


def reaches_rung(step: int, epoch_steps: int, rungs: tuple[float, ...]) -> bool:
    """Whether ``step`` is the first whose epoch reaches a rung of the halving rule: the one report at which the
    rule records a trial at that rung (so reporting only these and each round's last step to Tune leaves its
    decisions those of a report per step, at a fraction of the controller's work)."""
    return any((step - 1) / epoch_steps < rung <= step / epoch_steps for rung in rungs)


def _train_in_bundle(run: Any, params: dict[str, Any], ctx: CellContext, epoch_steps: int) -> RoundUpdate:
    """Join the bundle, then report each round's steps to MLflow and Tune until this member finishes."""
    bundle = params[BUNDLE_KEY]
    try:
        coordinator = ray.get_actor(ctx.bundle_coordinator)
        trial_id = tune.get_context().get_trial_id()
        worker = ray.get(coordinator.worker.remote(bundle, params[BUNDLE_SIZE_KEY], trial_id))
        slot, placement = ray.get(worker.join.remote(trial_id, params))
        run.set_tags(placement)
        reporter, round_ = TrialReporter(run, epoch_steps), 0
        rungs = study_halving(ctx.settings, EPOCH).rungs
        while True:
            update = ray.get(worker.result.remote(slot, round_))
            for metrics in update.steps:
                reporter.record(metrics, to_tune=metrics is update.steps[-1]
                                or reaches_rung(metrics.step, epoch_steps, rungs))
            if update.error is not None:
                raise StudyError(update.error)
            if update.outcome is not None:
                coordinator.member_ended.remote(trial_id, bundle, "finished")
                return update
            ray.get(worker.ack.remote(slot, round_))
            round_ += 1
    except RayActorError as err:
        raise StudyError(f"the worker of bundle {bundle} died ({first_line(err)}); rerun the same command to run "
                         "its trials again") from None
