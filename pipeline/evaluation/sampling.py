"""Sample quality of learned and baseline schedules: FID over Ray workers, exact Fréchet distance for the GMM.

For each schedule (the best learned grid of every (solver, NFE) and the fixed baselines) ``N`` samples are
solved from per-sample seeds ``seed_offset + i`` (disjoint from the teacher's, so no schedule is scored on
the latents it was trained on) by a Ray Data actor pool (pipeline.evaluation.workers). Each actor builds the
model once (the ``ModelSpec``'s resolved builder, as the teacher cache does) and the Inception network once
(ld3.fid), and turns every batch into mergeable float64 statistics. The driver merges them as they arrive
(a progress bar over the samples) and computes

- ``eval_fid``: FID against reference statistics (Heusel et al. 2017; ld3.fid), when a reference is given;
- ``eval_fd_exact``: for the embedded Gaussian mixture, the Fréchet distance between the samples' moments
  and the mixture's exact ones, in data space (ld3.metrics.frechet_distance).

Because latents come from per-sample seeds and statistics are sums, the results do not depend on how the
samples were split over actors and batches (up to float64 round-off).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ld3.metrics import frechet_distance
from pipeline.actor_pool import map_on_actor_pool
from pipeline.errors import StudyInputError
from pipeline.evaluation.config import EvaluationConfig
from pipeline.evaluation.targets import (
    CLASS_ACCURACY,
    FD_CLASSIFIER,
    FD_EXACT,
    FID,
    NUM_SAMPLES,
    EvaluationResult,
    ScheduleEvaluation,
    ScheduleTarget,
    fid_module,
)
from pipeline.evaluation.workers import _Partial, _SampleStatsWorker, evaluation_requests
from pipeline.models.spec import ModelSpec

if TYPE_CHECKING:
    from ld3.fid import FeatureStats, FeatureStatsAccumulator

# ---------------------------------------------------------------------------------------------
# Checks before any sampling
# ---------------------------------------------------------------------------------------------
def check_evaluation(config: EvaluationConfig, reserved_seeds: Iterable[int] = ()) -> FeatureStats | None:
    """Everything that can be checked before sampling; returns the FID reference statistics (None: no FID).

    Raises when the seeds overlap ``reserved_seeds`` (the teacher's), the Inception weights are missing
    (``MissingWeightsError``) or the reference statistics are missing or of the wrong dimension; warns
    when ``num_samples`` is below the feature dimension. A folder of reference images is reduced to
    statistics here, in the driver, once (then cached).
    """
    seeds = config.sample_seeds()
    clashes = sorted(s for s in reserved_seeds if s in seeds)
    if clashes:
        raise StudyInputError(
            f"EvaluationConfig.seed_offset={config.seed_offset}: evaluation seeds {seeds.start}..{seeds.stop - 1} "
            f"include {len(clashes)} teacher seed(s), e.g. {clashes[0]}; choose a seed_offset above the teacher's seeds"
        )
    if config.fid_reference is None:
        return None
    fid = fid_module()
    source = Path(config.fid_reference).expanduser()
    needs_network = source.exists() and source.suffix != ".npz"
    reference = None if needs_network else fid.reference_stats(source)  # a missing or bad file is named first
    weights = fid.inception_weights_path(config.inception_weights)
    if reference is None:
        reference = fid.reference_stats(source, fid.load_inception(weights))
    if config.num_samples < reference.dim:
        warnings.warn(
            f"EvaluationConfig.num_samples={config.num_samples} is below the feature dimension {reference.dim}: "
            "the FID is unreliable (rank-deficient covariance, biased upwards); published FIDs use 50,000 samples",
            stacklevel=2,
        )
    return reference


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
@dataclass
class _Totals:
    """A schedule's partial results merged so far."""

    count: int = 0
    features: FeatureStatsAccumulator | None = None
    data: FeatureStatsAccumulator | None = None
    data_reference: FeatureStats | None = None
    quality: FeatureStatsAccumulator | None = None
    quality_reference: FeatureStats | None = None
    correct: int = 0
    grid: dict[int, Tensor] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)

    def add(self, part: _Partial) -> None:
        combine = fid_module().FeatureStatsAccumulator.combine
        self.count += part.count
        self.nodes.add(part.node_id)
        if part.features is not None:
            self.features = part.features if self.features is None else combine([self.features, part.features])
        if part.data is not None:
            self.data = part.data if self.data is None else combine([self.data, part.data])
        if self.data_reference is None:
            self.data_reference = part.data_reference
        if part.quality is not None:
            self.quality = part.quality if self.quality is None else combine([self.quality, part.quality])
            self.quality_reference, self.correct = part.quality_reference, self.correct + part.correct
        if part.grid is not None:
            self.grid.update(zip(part.grid_index, part.grid))


def _finish(target: ScheduleTarget, totals: _Totals, reference: FeatureStats | None, conditional: bool) -> ScheduleEvaluation:
    """Statistics -> metrics (FID against ``reference``, exact FD against the model's own moments)."""
    metrics: dict[str, float] = {NUM_SAMPLES: float(totals.count)}
    feature_stats = data_stats = None
    if totals.features is not None:
        with warnings.catch_warnings():  # check_evaluation already warned about too few samples
            warnings.simplefilter("ignore", UserWarning)
            feature_stats = totals.features.stats()
        metrics[FID] = fid_module().fid_from_stats(feature_stats, reference)
    if totals.data is not None:
        data_stats = totals.data.stats()
        ref = totals.data_reference
        metrics[FD_EXACT] = frechet_distance(data_stats.mu, data_stats.sigma, ref.mu, ref.sigma)
    if totals.quality is not None:
        stats, ref = totals.quality.stats(), totals.quality_reference
        metrics[FD_CLASSIFIER] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        if conditional:
            metrics[CLASS_ACCURACY] = totals.correct / totals.count
    grid = torch.stack([totals.grid[i] for i in sorted(totals.grid)]) if totals.grid else None
    return ScheduleEvaluation(target, metrics, feature_stats, data_stats, grid, tuple(sorted(totals.nodes)))


def _partials(dataset: ray.data.Dataset) -> Iterator[_Partial]:
    """The workers' partial results as they arrive; an exception raised by worker code is re-raised as itself."""
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in batch.column("partial").to_pylist():
                yield pickle.loads(blob)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from err


def evaluate_schedules(
    spec: ModelSpec,
    targets: Sequence[ScheduleTarget],
    config: EvaluationConfig = EvaluationConfig(),
    *,
    dtype: torch.dtype = torch.float32,
    reserved_seeds: Iterable[int] = (),
    show_progress: bool = True,
) -> EvaluationResult:
    """Sample every target ``config.num_samples`` times on a Ray actor pool and compute its metrics.

    Uses the running Ray instance (Ray Data starts a local one otherwise). ``reserved_seeds`` (the
    teacher's) must not overlap the evaluation seeds. Inputs are checked before anything is sampled.
    """
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty; pass the schedules to evaluate (targets_from_cells / targets_from_exports)")
    reference = check_evaluation(config, reserved_seeds)
    # Every actor starts before the first batch, so that the work spreads over all of them (and their nodes)
    # however small the evaluation; errors raised by the worker code are not wrapped by Ray Data.
    dataset = map_on_actor_pool(
        evaluation_requests(targets, config), _SampleStatsWorker,
        {"build": spec.resolve(), "targets": targets, "config": config, "dtype": dtype},
        batch_size=config.batch_size, concurrency=config.concurrency, num_cpus=config.num_cpus_per_actor,
        num_gpus=config.num_gpus_per_actor, start_all_actors_s=config.actor_start_timeout_s, raise_original=True)
    totals = [_Totals() for _ in targets]
    total = len(targets) * config.num_samples
    with tqdm(total=total, unit="sample", desc=f"evaluating {len(targets)} schedules", disable=not show_progress) as bar:
        for part in _partials(dataset):
            totals[part.target].add(part)
            bar.update(part.count)
    for target, merged in zip(targets, totals):
        if merged.count != config.num_samples:
            raise RuntimeError(f"{target.label}: the actors returned {merged.count} of {config.num_samples} samples")
    conditional = config.conditions is not None
    return EvaluationResult(config, tuple(_finish(t, m, reference, conditional) for t, m in zip(targets, totals)))
