"""What runs in the Ray workers of a cell: the baselines' evaluation and one LD3 trial (a Tune function
trainable). Each builds the model, loads and verifies the cached teacher data and builds the loss once."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from ray import tune

from ld3.baselines import AYS_MODEL_OF_FAMILY, cell_baselines
from ld3.losses import LossFn, get_loss
from ld3.metrics import gmm_frechet_distance
from ld3.models.gmm import GaussianMixture
from ld3.sampling import sample, schedule_loss
from ld3.schedules import NoiseSchedule
from ld3.train import Callback, LD3Config, LD3Result, StepMetrics, TeacherData, train_ld3
from ld3.utils import latents_from_seeds
from pipeline.devices import placement_tags, worker_device
from pipeline.errors import StudyError
from pipeline.models.registry import LoadedModel
from pipeline.recording.runs import TrialLogger
from pipeline.recording.tracking import TAG_FAILURE, failure_reason
from pipeline.search.cell import CellContext
from pipeline.search.space import hyperparameters_to_config
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.dataset import TeacherDataset

OBJECTIVE = "objective"  # what Optuna and ASHA minimise: best validation loss so far, then the final one
EPOCH = "epoch"  # ASHA's clock: passes over the training data (comparable across train batch sizes)
FD_SEED_OFFSET = 1_000_000  # seeds of the samples used for data-space metrics, disjoint from teacher seeds


@dataclass
class _Loaded:
    model: LoadedModel
    train: TeacherData
    val: TeacherData
    device: torch.device
    loss_fn: LossFn  # built once per worker (LPIPS loads a VGG network), shared by training and metrics


def _teacher_data(data: TeacherDataset, model: LoadedModel, device: torch.device) -> TeacherData:
    cond = None
    if data.condition is not None:
        conditions = list(data.condition) if isinstance(data.condition, tuple) else data.condition.tolist()
        cond = model.encode_condition(conditions, device)
    return TeacherData(z=data.z.to(device), y=data.y.to(device), cond=cond)


def load_cell(ctx: CellContext) -> _Loaded:
    """Build the model and read the cached teacher data (verified) in this process."""
    settings = ctx.settings
    device = worker_device(settings.gpus_per_trial)
    model = ctx.build_model(device=device, dtype=settings.dtype)
    entry = TeacherCache(ctx.cache_root).entry(ctx.cache_key)
    if entry is None:
        raise StudyError(f"teacher data {ctx.cache_key} vanished from {ctx.cache_root}; rerun the study to regenerate it")
    train, val = entry.load().split(settings.num_train, settings.num_validation)
    loss_fn = get_loss(settings.trainer.loss)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    return _Loaded(model, _teacher_data(train, model, device), _teacher_data(val, model, device), device, loss_fn)


def baseline_grids(ctx: CellContext) -> dict[str, torch.Tensor]:
    """The cell's baseline grids, as evaluated by :func:`evaluate_baselines`."""
    return {name: torch.tensor(sigmas, dtype=torch.float64) for name, sigmas in (ctx.baseline_sigmas or {}).items()}


def _data_metrics(ctx: CellContext, loaded: _Loaded, sigmas: torch.Tensor, sigmas_eval: torch.Tensor | None,
                  coefficients: torch.Tensor | None = None) -> dict[str, float]:
    """Sample quality of fresh samples: the GMM's exact data-space Fréchet distance (``fd_exact``), or the
    model's own metrics (``LoadedModel.quality``: the digits model's ``fd_classifier`` and ``class_accuracy``)."""
    model, settings = loaded.model, ctx.settings
    exact = isinstance(model.denoiser, GaussianMixture)
    if not (exact or model.quality is not None) or settings.fd_samples < 2:
        return {}
    seeds = range(FD_SEED_OFFSET, FD_SEED_OFFSET + settings.fd_samples)
    z = latents_from_seeds(seeds, model.shape, loaded.train.z.dtype, loaded.device)
    conditions = None if exact else model.quality.conditions(len(seeds))
    cond = None if conditions is None else model.encode_condition(conditions, loaded.device)
    x = sample(model.denoiser, ctx.solver.name, ctx.solver.order, sigmas, z, sigmas_eval=sigmas_eval, cond=cond,
               decode=model.decode, batch_size=settings.eval_batch_size, coefficients=coefficients).cpu()
    return {"fd_exact": gmm_frechet_distance(x, model.denoiser)} if exact else model.quality(x, conditions)


def _final_metrics(ctx: CellContext, loaded: _Loaded, sigmas: torch.Tensor, sigmas_eval: torch.Tensor | None,
                   coefficients: torch.Tensor | None = None) -> dict[str, float]:
    """Validation loss on the original latents and the data metrics of a grid (with its learned coefficients)."""
    val_loss = schedule_loss(loaded.model.denoiser, ctx.solver.name, ctx.solver.order, sigmas, loaded.val.z, loaded.val.y,
                             loaded.loss_fn, sigmas_eval=sigmas_eval, cond=loaded.val.cond, decode=loaded.model.decode,
                             batch_size=ctx.settings.eval_batch_size, coefficients=coefficients)
    return {"final_val_loss": val_loss, **_data_metrics(ctx, loaded, sigmas, sigmas_eval, coefficients)}


def evaluate_baselines(ctx: CellContext) -> tuple[dict[str, dict[str, Any]], NoiseSchedule]:
    """Validation loss (original latents), data metrics and compute time of each baseline grid available for
    the cell (ld3.baselines.cell_baselines: GITS from the training latents), one nested run each; also returns
    the model's noise schedule (so the driver never loads the network)."""
    loaded = load_cell(ctx)
    timed = cell_baselines(ctx.n_steps, loaded.model.schedule, loaded.model.denoiser, loaded.train.z, loaded.train.cond,
                           latent=loaded.model.decode is not None, ays_model=AYS_MODEL_OF_FAMILY.get(ctx.settings.family))
    grids, costs = {k: v.sigmas for k, v in timed.items()}, {k: v.cost_s for k, v in timed.items()}
    results = {}
    for name, sigmas in grids.items():
        metrics = {**_final_metrics(ctx, loaded, sigmas, None), "schedule_cost_s": costs[name]}
        with TrialLogger.start(ctx.tracking, kind="baseline", key=name, **ctx.identity,
                               params={"discretization": name, "n_steps": ctx.n_steps},
                               tags=placement_tags(loaded.device)) as run:
            run.log_final_metrics(metrics)
            run.log_schedule(sigmas, None, baselines={k: v for k, v in grids.items() if k != name}, costs=costs)
        results[name] = {**metrics, "sigmas": sigmas.tolist(), "mlflow_run_id": run.run_id}
    return results, loaded.model.schedule


class TrialReporter(Callback):
    """Trainer callback: per-step metrics to MLflow (batched) and to Tune (for ASHA)."""

    def __init__(self, run: TrialLogger, steps_per_epoch: int):
        self.run, self.steps_per_epoch = run, steps_per_epoch

    def on_step(self, m: StepMetrics) -> None:
        self.record(m, to_tune=True)

    def record(self, m: StepMetrics, *, to_tune: bool) -> None:
        """Log a step's metrics to MLflow and, if ``to_tune``, report them to Tune."""
        metrics = {"train_loss": m.train_loss, "val_loss": m.val_loss, "best_val_loss": m.best_val_loss,
                   "lr1": m.lr1, "lr2": m.lr2, "shift_lr": m.shift_lr, "accepted_fraction": m.accepted_fraction}
        self.run.log_metrics(metrics, m.step)
        if to_tune:
            tune.report({OBJECTIVE: m.best_val_loss, EPOCH: m.step / self.steps_per_epoch, "step": m.step,
                         "phase": m.phase, **metrics})


def trial_config(params: dict[str, Any], ctx: CellContext) -> LD3Config:
    """The trainer's config of a trial's sampled hyperparameters in this cell."""
    return hyperparameters_to_config(params, ctx.settings.trainer, ctx.best_baseline)


def start_trial_run(ctx: CellContext, config: LD3Config, tags: dict[str, str]) -> TrialLogger:
    """The trial's MLflow run (keyed by its Tune trial id), its config logged as params."""
    trial_id = tune.get_context().get_trial_id() or "local"
    return TrialLogger.start(ctx.tracking, kind="trial", key=trial_id, **ctx.identity,
                             params={**asdict(config), "n_steps": ctx.n_steps}, tags=tags, flush_interval_s=2.0)


def steps_per_epoch(ctx: CellContext, config: LD3Config) -> int:
    """Training steps per pass over the training data (ASHA's clock)."""
    return math.ceil(ctx.settings.num_train / config.train_batch_size)


@contextmanager
def recorded_end(run: TrialLogger) -> Iterator[None]:
    """End ``run`` KILLED when Tune stops the trial, FAILED (tag ``failure``) when the block raises."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        # Tune stops a function trainable by raising SystemExit from tune.report (ray.train's session, when the
        # scheduler stops the trial or the experiment ends): the trial was stopped, it did not fail.
        run.end("KILLED")
        raise
    except Exception as err:
        run.set_tags({TAG_FAILURE: failure_reason(err)})
        run.end("FAILED")
        raise


def record_finished(run: TrialLogger, ctx: CellContext, result: LD3Result, metrics: dict[str, float]) -> None:
    """A trial that trained to its end: final metrics, schedule (and coefficients) to MLflow, FINISHED, and its
    last report to Tune (what the cell's summary and export read)."""
    coefficients = None if result.coefficients is None else result.coefficients.tolist()
    run.log_final_metrics({**metrics, "train_steps": result.steps, "train_wall_time_s": result.wall_time_s})
    run.log_schedule(result.sigmas, result.sigmas_eval, baselines=baseline_grids(ctx), costs=ctx.baseline_costs)
    if coefficients is not None:
        run.log_dict({"coefficients": coefficients}, "coefficients.json")
    run.set_tags({"stop_reason": result.stop_reason})
    run.end("FINISHED")
    tune.report({OBJECTIVE: metrics["final_val_loss"], **metrics, "step": result.steps,
                 "sigmas": result.sigmas.tolist(), "sigmas_eval": result.sigmas_eval.tolist(),
                 "coefficients": coefficients, "mlflow_run_id": run.run_id, "stop_reason": result.stop_reason})


def final_metrics(ctx: CellContext, loaded: _Loaded, result: LD3Result) -> dict[str, float]:
    """A trained schedule's validation loss on the original latents and its data metrics."""
    return _final_metrics(ctx, loaded, result.sigmas, result.sigmas_eval, result.coefficients)


def ld3_trial(params: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable: one LD3 run with the sampled hyperparameters."""
    torch.set_num_threads(max(1, int(ctx.settings.cpus_per_trial)))
    loaded = load_cell(ctx)
    config = trial_config(params, ctx)
    run = start_trial_run(ctx, config, placement_tags(loaded.device))
    with recorded_end(run):
        result = train_ld3(loaded.model.denoiser, ctx.solver.name, ctx.solver.order, loaded.model.schedule,
                           loaded.train, loaded.val, config, n_steps=ctx.n_steps, decode=loaded.model.decode,
                           loss_fn=loaded.loss_fn, callbacks=[TrialReporter(run, steps_per_epoch(ctx, config))])
    record_finished(run, ctx, result, final_metrics(ctx, loaded, result))
