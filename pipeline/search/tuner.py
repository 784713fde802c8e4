"""The search of one cell on Ray Tune: ``OptunaSearch`` (seeded TPE, define-by-run space, the paper's recipe as
the first point) in batches of ``max_concurrent`` trials with batched successive halving (pipeline.search.halving),
resumable from the Tune experiment's storage path; then the cell's trials summarised and their MLflow runs closed."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ld3.train import TrainingDiverged
from pipeline.recording.runs import StudyTracker
from pipeline.recording.tracking import TAG_FAILURE, TAG_STOPPED_BY, failure_reason
from pipeline.search.bundles import bundle_coordinator, bundle_member, bundle_suggestion, rerun_counts
from pipeline.search.cell import CellContext
from pipeline.search.halving import study_halving
from pipeline.search.space import MEMBER_CPUS, reference_point
from pipeline.search.trial import EPOCH, OBJECTIVE, evaluate_baselines, ld3_trial

log = logging.getLogger(__name__)

NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # Tune's console engine switch ("0": the legacy one)


def submit_baselines(ctx: CellContext) -> ray.ObjectRef:
    """Evaluate a cell's baselines in a Ray task (with a trial's resources); returns its future."""
    task = ray.remote(evaluate_baselines).options(num_cpus=ctx.settings.cpus_per_trial,
                                                  num_gpus=ctx.settings.gpus_per_trial)
    return task.remote(ctx)


def with_baselines(ctx: CellContext, baselines: dict[str, dict[str, Any]]) -> CellContext:
    """The cell's context once its baselines are in: the best one's name, every grid and its cost."""
    return replace(ctx, best_baseline=min(baselines, key=lambda name: baselines[name]["final_val_loss"]),
                   baseline_sigmas={name: tuple(b["sigmas"]) for name, b in baselines.items()},
                   baseline_costs={name: b["schedule_cost_s"] for name, b in baselines.items()})


def run_search(ctx: CellContext, path: str, *, resume: bool, verbose: int,
               callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """Run (or resume, from ``path``) the cell's Tune experiment to its end (with ``trials_per_bundle`` > 1,
    its trials trained in bundles: pipeline.search.bundles)."""
    restore = resume and tune.Tuner.can_restore(path)
    retry = restore and _retry_errored(path)
    expected = rerun_counts(tune.ExperimentAnalysis(path).trials, retry) if restore and ctx.settings.bundled else {}
    with _tune_console(verbose), bundle_coordinator(ctx, expected) as (ctx, bundle_callbacks):
        return _tuner(ctx, path, restore, retry, verbose, [*callbacks, *bundle_callbacks]).fit()


@contextlib.contextmanager
def _tune_console(verbose: int) -> Iterator[None]:
    """Tune's legacy console engine honours verbose=0 (silent); its new one prints a config box and hints anyway."""
    previous = os.environ.get(NEW_OUTPUT_ENV)
    if verbose == 0:
        os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = previous


def _tuner(ctx: CellContext, path: str, restore: bool, retry: bool, verbose: int,
           callbacks: Sequence[tune.Callback]) -> tune.Tuner:
    settings = ctx.settings
    if settings.bundled:  # thin members; the bundle workers take the trial resources
        trainable = tune.with_resources(tune.with_parameters(bundle_member, ctx=ctx), {"cpu": MEMBER_CPUS, "gpu": 0})
    else:
        trainable = tune.with_resources(tune.with_parameters(ld3_trial, ctx=ctx), settings.resources)
    if restore:
        log.info("resuming Tune experiment at %s%s", path, " (running its errored trials again)" if retry else "")
        # resume (not restart) keeps the trial ids, so a rerun trial's MLflow run supersedes its earlier one
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=retry)
    searcher = _RestartableOptunaSearch(
        space=settings.search.suggest, metric=OBJECTIVE, mode="min",
        points_to_evaluate=[reference_point(settings.trainer, settings.search, ctx.n_steps)],
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(2, settings.num_trials // 3)),
    )
    searcher.number_into_bundles(settings.trials_per_bundle, settings.num_trials)
    # Batches of max_concurrent trials, the searcher told only once a batch has ended, and a halving rule
    # that compares with earlier batches only: the same seed gives the same trials and the same stops.
    scheduler = study_halving(settings, EPOCH)
    storage, name = os.path.split(path.rstrip("/"))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="min", scheduler=scheduler,
                                    search_alg=ConcurrencyLimiter(searcher, settings.max_concurrent, batch=True),
                                    num_samples=settings.num_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=verbose, callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


class _RestartableOptunaSearch(OptunaSearch):
    """OptunaSearch that lets an errored trial run again on resume (``resume_errored``) quietly: Optuna closed its
    trial as failed when it errored, and plain OptunaSearch logs a warning with the whole result at every report
    (or, for a trial it does not know, ends the search with a KeyError). Such reports reach Tune and ASHA;
    Optuna's sampler does not learn from them."""

    bundle_size, num_trials, suggested = 1, 0, 0  # bundles of suggestions (pipeline.search.bundles)

    def number_into_bundles(self, bundle_size: int, num_trials: int) -> None:
        """With ``bundle_size`` > 1, tag each suggestion with its bundle (``bundle_suggestion``)."""
        self.bundle_size, self.num_trials = bundle_size, num_trials

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if self.bundle_size == 1 or not isinstance(config, dict):
            return config
        self.suggested += 1
        return bundle_suggestion(config, self.suggested - 1, self.num_trials, self.bundle_size)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._is_open(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._is_open(trial_id):
            super().on_trial_complete(trial_id, result, error)

    def _is_open(self, trial_id: str) -> bool:
        return trial_id in self._ot_trials and trial_id not in self._completed_trials


def _retry_errored(path: str) -> bool:
    """Whether a trial of the saved experiment errored for another reason than diverging (e.g. the tracking server
    went away): then resuming restarts the errored trials. Diverged trials alone would only diverge again."""
    results = tune.ResultGrid(tune.ExperimentAnalysis(path))
    return any(r.error is not None and not _diverged(r.error) for r in results)


def _diverged(error: BaseException) -> bool:
    return isinstance(error, TrainingDiverged) or isinstance(getattr(error, "cause", None), TrainingDiverged)


def _is_finished(result: tune.Result) -> bool:
    # Only a trial that ran to its end reports final_val_loss (Tune also marks early-stopped trials "done").
    return result.error is None and bool(result.metrics) and "final_val_loss" in result.metrics


def summarise_trials(results: tune.ResultGrid) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The best finished trial's last report (None if none finished) and the counts finished / stopped / failed."""
    finished = [r.metrics for r in results if _is_finished(r)]
    failed = sum(1 for r in results if r.error is not None)
    counts = {"finished": len(finished), "stopped": len(results) - len(finished) - failed, "failed": failed}
    best = min(finished, key=lambda m: m["final_val_loss"]) if finished else None
    return best, counts


def close_trial_runs(tracker: StudyTracker, ctx: CellContext, results: tune.ResultGrid) -> None:
    """Give every trial run of the cell its final status: a trial stopped early by the halving rule is KILLED
    with tag stopped_by=asha, an errored one FAILED with its reason in tag failure (the trial process marks
    itself, this covers processes that ended before they could), one still RUNNING otherwise KILLED."""
    stopped, errors = set(), {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if result.error is not None and trial_id:
            errors[trial_id] = result.error
        elif trial_id and not _is_finished(result):
            stopped.add(trial_id)
    cell_tags = {"solver": ctx.solver.name, "order": str(ctx.solver.order), "nfe": str(ctx.nfe)}
    for run in tracker.child_runs(kind="trial"):
        tags = run.data.tags
        if any(tags.get(k) != v for k, v in cell_tags.items()):
            continue
        run_id, key = run.info.run_id, tags.get("run_key")
        if key in stopped:
            tracker.close_run(run_id, "KILLED", {TAG_STOPPED_BY: "asha"})
        elif key in errors and (run.info.status != "FAILED" or TAG_FAILURE not in tags):
            tracker.close_run(run_id, "FAILED", {TAG_FAILURE: tags.get(TAG_FAILURE) or failure_reason(errors[key])})
        elif run.info.status == "RUNNING":
            tracker.close_run(run_id, "KILLED")
