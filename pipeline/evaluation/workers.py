"""The evaluation's Ray Data actors: each builds the model and the feature network once, solves its batches of
per-sample seeds on every schedule and reduces them on the worker to mergeable float64 statistics (and the
few samples of the grid image); statistics travel back, samples do not."""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import ray
import torch
from torch import Tensor

from ld3.metrics import mixture_moments
from ld3.models.gmm import GaussianMixture
from ld3.sampling import sample
from ld3.utils import latents_from_seeds
from pipeline.actor_pool import request_blocks
from pipeline.devices import worker_device
from pipeline.errors import StudyInputError
from pipeline.evaluation.config import EvaluationConfig
from pipeline.evaluation.targets import ScheduleTarget, fid_module
from pipeline.models.registry import ConditionValue, LoadedModel

if TYPE_CHECKING:
    from ld3.fid import FeatureStats, FeatureStatsAccumulator

# ---------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Partial:
    """What an actor sends back for the samples of one schedule in one batch."""

    target: int
    count: int
    node_id: str
    features: FeatureStatsAccumulator | None
    data: FeatureStatsAccumulator | None
    data_reference: FeatureStats | None  # the model's exact data moments (GMM), for eval_fd_exact
    quality: FeatureStatsAccumulator | None  # features of the model's own metric (LoadedModel.quality)
    quality_reference: FeatureStats | None
    correct: int  # samples the model's own classifier assigns to their condition (with quality and conditions)
    grid_index: list[int]
    grid: Tensor | None


def exact_moments(model: LoadedModel, config: EvaluationConfig) -> FeatureStats | None:
    """Exact mean and covariance of the distribution sampled (GMM only): the class mixture the
    cycled ``conditions`` select, or the whole mixture when unconditional; None for other models."""
    gmm = model.denoiser
    if not isinstance(gmm, GaussianMixture) or model.decode is not None:
        return None
    if config.conditions is not None and any(isinstance(c, str) for c in config.conditions):
        return None
    conditions = None if config.conditions is None else [config.sample_condition(i) for i in range(config.num_samples)]
    return fid_module().FeatureStats(*mixture_moments(gmm, conditions))


def _is_image_batch(x: Tensor) -> bool:
    return x.ndim == 4 and x.shape[1] in (1, 3)


class _SampleStatsWorker:
    """Ray Data actor: builds the model and the feature network once; per batch solves and reduces."""

    def __init__(self, build: Callable[..., LoadedModel], targets: Sequence[ScheduleTarget], config: EvaluationConfig,
                 dtype: torch.dtype):
        fid = fid_module()
        self.fid, self.targets, self.config, self.dtype = fid, targets, config, dtype
        self.device = worker_device(config.num_gpus_per_actor)
        self.model = build(device=self.device, dtype=dtype)
        self.extractor = None
        if config.fid_reference is not None:
            self.extractor = fid.load_inception(config.inception_weights, device=self.device)
        self.data_reference = exact_moments(self.model, config)
        self.quality_reference = None
        if self.model.quality is not None:
            self.quality_reference = fid.FeatureStats(*self.model.quality.reference())
        self.grids = [target.grid(self.model.schedule, latent=self.model.decode is not None) for target in targets]
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, requests: pa.Table) -> pa.Table:
        # Raised here, not in __init__, to reach the caller as itself rather than as a dead actor.
        if self.extractor is None and self.data_reference is None and self.quality_reference is None:
            raise StudyInputError(
                "EvaluationConfig.fid_reference is required: this model has no metric of its own (the Gaussian "
                "mixture's exact moments, the digits model's classifier); give FID reference statistics")
        columns = requests.to_pydict()
        rows_of = defaultdict(list)
        for row, target in enumerate(columns["target"]):
            rows_of[target].append(row)
        partials = []
        for target, rows in sorted(rows_of.items()):
            sample_index = [columns["sample_index"][r] for r in rows]
            seeds = [columns["seed"][r] for r in rows]
            conditions = [columns["condition"][r] for r in rows] if "condition" in columns else None
            partials.append(pickle.dumps(self._partial(target, sample_index, seeds, conditions)))
        return pa.table({"partial": pa.array(partials, pa.binary())})

    def _partial(self, target: int, sample_index: list[int], seeds: list[int],
                 conditions: list[ConditionValue] | None) -> _Partial:
        """Solve one schedule's samples ``device_batch_size`` at a time, reducing each chunk right away."""
        features = None if self.extractor is None else self.fid.FeatureStatsAccumulator()
        data = None if self.data_reference is None else self.fid.FeatureStatsAccumulator(self.data_reference.dim)
        quality = None if self.quality_reference is None else self.fid.FeatureStatsAccumulator(self.quality_reference.dim)
        grid_index, grid, correct = [], [], 0
        step = self.config.device_batch_size
        for start in range(0, len(seeds), step):
            rows = slice(start, start + step)
            x = self._solve(target, seeds[rows], None if conditions is None else conditions[rows])
            if features is not None:
                features.add_images(x, self.extractor)
            if data is not None:
                data.update(x.flatten(1))
            if quality is not None:
                quality.update(self.model.quality.features(x))
                if conditions is not None:
                    correct += self.model.quality.correct(x, conditions[rows])
            shown = [i for i, s in enumerate(sample_index[rows]) if s < self.config.grid_size**2]
            if shown and _is_image_batch(x):
                grid_index += [sample_index[rows][i] for i in shown]
                grid.append(self.fid.to_uint8(x[shown]).cpu())
        return _Partial(target, len(seeds), self.node_id, features, data, self.data_reference, quality,
                        self.quality_reference, correct, grid_index, torch.cat(grid) if grid else None)

    def _solve(self, target: int, seeds: list[int], conditions: list[ConditionValue] | None) -> Tensor:
        """``decode(Solver(sigma_0 z))`` for the latents of ``seeds`` on the grid of schedule ``target``."""
        schedule = self.targets[target]
        sigmas, sigmas_eval = self.grids[target]
        z = latents_from_seeds(seeds, self.model.shape, self.dtype, self.device)
        cond = None if conditions is None else self.model.encode_condition(conditions, self.device)
        return sample(self.model.denoiser, schedule.solver, schedule.order, sigmas, z, sigmas_eval=sigmas_eval,
                      cond=cond, decode=self.model.decode, batch_size=len(seeds), coefficients=schedule.coefficients)


def evaluation_requests(targets: Sequence[ScheduleTarget], config: EvaluationConfig) -> list[pa.Table]:
    """Per-sample requests (target, sample_index, seed[, condition]), one Arrow block per batch of a schedule."""
    seeds = list(config.sample_seeds())
    conditions = None if config.conditions is None else [config.sample_condition(i) for i in range(config.num_samples)]
    return [block for target in range(len(targets))
            for block in request_blocks(seeds, conditions, config.batch_size, id_column="sample_index",
                                        constants={"target": target})]
