"""Sample quality of learned and baseline schedules: FID over Ray workers, exact Fréchet distance for the GMM.

For each schedule (the best learned grid of every (solver, NFE) and the fixed baselines) ``N`` samples are
solved from per-sample seeds ``seed_offset + i`` (disjoint from the teacher's, so no schedule is scored on
the latents it was trained on) by a Ray Data actor pool. Each actor builds the model once (the
``ModelSpec``'s resolved builder, as the teacher cache does) and the Inception network once (ld3.fid),
and turns every batch into mergeable float64 statistics on the worker (``FeatureStatsAccumulator``):
statistics travel back, samples do not (except the few shown in the sample grid). The driver merges them
as they arrive (a progress bar over the samples) and computes

- ``eval_fid``: FID against reference statistics (Heusel et al. 2017; ld3.fid), when a reference is given;
- ``eval_fd_exact``: for the embedded Gaussian mixture, the Fréchet distance between the samples' moments
  and the mixture's exact ones, in data space (ld3.metrics.frechet_distance).

Because latents come from per-sample seeds and statistics are sums, the results do not depend on how the
samples were split over actors and batches (up to float64 round-off).

Entry points: :func:`evaluate_schedules` (compute), :func:`record_evaluation` (metrics and a sample grid
on each schedule's MLflow run, metrics into the exported JSON), :func:`format_evaluation_table` (learned
vs baselines, like the paper's tables), :func:`evaluate_study` (the study's optional last stage) and
:func:`evaluate_exports` (an exports folder, after the fact).
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ld3.baselines import (
    AYS_MODEL_OF_FAMILY,
    BASELINE_NAMES,
    GITS,
    check_baseline_name,
    named_grid,
    study_baseline_names,
)
from ld3.metrics import frechet_distance
from ld3.models.gmm import GaussianMixture
from ld3.sampling import sample
from ld3.solvers import solver_steps_for_nfe
from ld3.utils import latents_from_seeds
from pipeline.devices import worker_device
from pipeline.export import ExportedSchedule, load_schedule, save_export
from pipeline.models import ConditionValue, LoadedModel, ModelSpec
from pipeline.tracking import IDENTITY_KEYS, TAG_KIND, TAG_RUN_KEY, connect

if TYPE_CHECKING:
    from ld3.fid import FeatureStats, FeatureStatsAccumulator
    from pipeline.study import CellResult, StudyConfig
    from pipeline.tracking import StudyTracker

__all__ = [
    "EvaluationConfig", "EvaluationResult", "ScheduleEvaluation", "ScheduleTarget", "LEARNED", "check_evaluation",
    "evaluate_exports", "evaluate_schedules", "evaluate_study", "exact_moments", "format_evaluation_table",
    "grid_image", "learned_target", "record_evaluation", "targets_from_cells", "targets_from_exports",
]

log = logging.getLogger(__name__)

LEARNED = "learned"  # name of a learned schedule among the baselines' names
DEFAULT_SEED_OFFSET = 2_000_000  # above the teacher's seeds (0..) and the study's FD seeds (1,000,000..)
FID, FD_EXACT, NUM_SAMPLES = "eval_fid", "eval_fd_exact", "eval_num_samples"
FD_CLASSIFIER, CLASS_ACCURACY = "eval_fd_classifier", "eval_class_accuracy"  # models with their own metric (digits)
GRID_ARTIFACT = "evaluation/samples.png"


def _fid() -> ModuleType:
    """ld3.fid, imported on first use: it needs torchvision (the ``models`` extra), the study does not."""
    import ld3.fid

    return ld3.fid


# ---------------------------------------------------------------------------------------------
# Configuration and what is evaluated
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"EvaluationConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Sample-quality evaluation settings. The first block decides the numbers; the second only where they run."""

    num_samples: int = 50_000  # samples per schedule; published FIDs use 50,000
    seed_offset: int = DEFAULT_SEED_OFFSET  # sample i has seed seed_offset + i; must miss the teacher's seeds
    fid_reference: str | None = None  # .npz with mu/sigma, or a folder/.zip of real images (stats cached); None: no FID
    inception_weights: str | None = None  # FID network file; None: the torch hub cache (ld3.fid.inception_weights_path)
    # Baselines evaluated beside the learned schedule (names of ld3.baselines.BASELINE_NAMES); None: every one the
    # study computed for the cell (ld3.baselines.cell_baselines: the fixed grids, GITS, DMN, AYS where published).
    baselines: tuple[str, ...] | None = None
    conditions: tuple[ConditionValue, ...] | None = None  # class ids or prompts, cycled over the samples; None: unconditional
    grid_size: int = 8  # the sample grid artifact shows grid_size x grid_size samples (0: no grid)

    batch_size: int = 1000  # samples per actor call; each call sends back one partial statistic per schedule (32 MB for FID)
    device_batch_size: int = 100  # samples per solve / Inception pass on the device (bounds GPU memory)
    concurrency: int = 1  # Ray actors, each holding the model and the Inception network once
    num_gpus_per_actor: float = 0.0  # > 0 runs the actors on CUDA (fractions share a GPU)
    num_cpus_per_actor: float = 1.0
    actor_start_timeout_s: int = 1800  # sampling starts once every actor is up (an error after this long, not a hang)

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, 2)
        _check_int("seed_offset", self.seed_offset, 0)
        _check_int("grid_size", self.grid_size, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("device_batch_size", self.device_batch_size, 1)
        _check_int("concurrency", self.concurrency, 1)
        _check_int("actor_start_timeout_s", self.actor_start_timeout_s, 1)
        for name in self.baselines or ():
            check_baseline_name(name)  # ValueError listing the valid names
        if self.conditions is not None:
            kinds = {isinstance(c, str) for c in self.conditions}
            if not self.conditions or len(kinds) > 1 or any(isinstance(c, bool) for c in self.conditions):
                raise ValueError("EvaluationConfig.conditions must be a non-empty tuple of only class ids or only prompts")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor <= 0:
            raise ValueError("EvaluationConfig.num_gpus_per_actor must be >= 0 and num_cpus_per_actor > 0, got "
                             f"{self.num_gpus_per_actor} and {self.num_cpus_per_actor}")

    def sample_seeds(self) -> range:
        return range(self.seed_offset, self.seed_offset + self.num_samples)

    def sample_condition(self, index: int) -> ConditionValue | None:
        return None if self.conditions is None else self.conditions[index % len(self.conditions)]


@dataclass(frozen=True, eq=False)
class ScheduleTarget:
    """One schedule to evaluate: a learned grid (``sigmas`` given, with its learned solver ``coefficients`` if
    any) or a baseline: the grid the study computed for the cell (``sigmas`` given; GITS depends on the model's
    teacher trajectories) or one the worker builds from the model's noise schedule alone (``sigmas`` None)."""

    model: str
    solver: str
    order: int
    nfe: int
    name: str  # LEARNED or a name of ld3.baselines.BASELINE_NAMES
    sigmas: Tensor | None = None
    sigmas_eval: Tensor | None = None
    mlflow_run_id: str | None = None  # the trial's or baseline's run, where the metrics go
    export_path: str | None = None  # the exported JSON of a learned schedule, where the metrics go too
    coefficients: Tensor | None = None  # learned solver coefficient corrections of a learned schedule, or None

    def __post_init__(self) -> None:
        if self.name == LEARNED:
            if self.sigmas is None:
                raise ValueError(f"ScheduleTarget {LEARNED!r}: give the learned sigmas (baselines may omit theirs)")
            return
        check_baseline_name(self.name)
        if self.sigmas_eval is not None or self.coefficients is not None:
            raise ValueError(f"ScheduleTarget {self.name!r}: a baseline has no sigmas_eval or coefficients")
        if self.sigmas is None and self.name == GITS:
            raise ValueError("ScheduleTarget 'gits': give the study's GITS grid (it depends on the model's teacher "
                             "trajectories, so the worker cannot rebuild it)")

    @property
    def cell(self) -> tuple[str, int, int]:
        return self.solver, self.order, self.nfe

    @property
    def label(self) -> str:
        return f"{self.solver}-o{self.order}/nfe{self.nfe}/{self.name}"

    def grid(self, schedule: Any, latent: bool = False) -> tuple[Tensor, Tensor | None]:
        """(sigmas, sigmas_eval) of this schedule for a model with noise schedule ``schedule`` (``latent``: a
        latent model, for DMN's recipe)."""
        if self.sigmas is not None:
            return self.sigmas, self.sigmas_eval
        return named_grid(self.name, solver_steps_for_nfe(self.solver, self.nfe), schedule, latent=latent), None


def learned_target(exported: ExportedSchedule, export_path: str | Path | None = None) -> ScheduleTarget:
    """The schedule of an exported JSON, learned coefficients included (its MLflow run from the provenance)."""
    return ScheduleTarget(exported.model, exported.solver, exported.order, exported.nfe, LEARNED,
                          sigmas=exported.sigmas, sigmas_eval=exported.sigmas_eval, coefficients=exported.coefficients,
                          mlflow_run_id=exported.provenance.mlflow_run_id,
                          export_path=None if export_path is None else str(export_path))


def targets_from_cells(model_id: str, cells: Iterable[CellResult],
                       baselines: Sequence[str] | None = None) -> list[ScheduleTarget]:
    """The exported best schedule of each study cell and the cell's baselines, with the grids the study computed
    and scored for them (``CellResult.baselines``, from ld3.baselines.cell_baselines): all of them, or those of
    ``baselines`` the cell has (a baseline the study could not compute for the model, e.g. AYS, is left out)."""
    targets = []
    for cell in cells:
        if cell.export_path is not None:
            targets.append(learned_target(load_schedule(cell.export_path), cell.export_path))
        for name in sorted(cell.baselines) if baselines is None else [b for b in baselines if b in cell.baselines]:
            measured = cell.baselines[name]
            targets.append(ScheduleTarget(model_id, cell.solver.name, cell.solver.order, cell.nfe, name,
                                          sigmas=torch.tensor(measured["sigmas"], dtype=torch.float64),
                                          mlflow_run_id=measured.get("mlflow_run_id")))
    return targets


def targets_from_exports(exports_dir: str | Path, *, model: str | None = None, client: MlflowClient | None = None,
                         baselines: Sequence[str] | None = None, ays_model: str | None = None) -> list[ScheduleTarget]:
    """The schedules exported in ``exports_dir`` (of ``model`` only, if given) and the baselines of their cells:
    ``baselines``, or the study's set (ld3.baselines.study_baseline_names with ``ays_model``). With ``client``,
    each baseline is matched to the study's baseline run of the same cell and takes the grid that run logged;
    GITS, which depends on the teacher trajectories, is evaluated only then."""
    folder = Path(exports_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"exports_dir {folder} is not a folder; pass the --exports-dir of the study")
    exported = [(path, load_schedule(path)) for path in sorted(folder.glob("*.json"))]
    exported = [(path, e) for path, e in exported if model is None or e.model == model]
    if not exported:
        raise ValueError(f"exports_dir {folder} holds no exported schedules{f' of model {model!r}' if model else ''}")
    targets = []
    for path, schedule in exported:
        targets.append(learned_target(schedule, path))
        run_ids = _sibling_baseline_runs(client, schedule.provenance.mlflow_run_id) if client is not None else {}
        for name in study_baseline_names(ays_model) if baselines is None else baselines:
            sigmas = _logged_grid(client, run_ids[name]) if name in run_ids else None
            if name == GITS and sigmas is None:
                log.warning("%s: no GITS grid logged for this cell (pass the study's tracking URI); GITS left out", path)
                continue
            targets.append(ScheduleTarget(schedule.model, schedule.solver, schedule.order, schedule.nfe, name,
                                          sigmas=sigmas, mlflow_run_id=run_ids.get(name)))
    return targets


def _logged_grid(client: MlflowClient, run_id: str) -> Tensor | None:
    """The σ grid a study's baseline run logged (its ``schedule.json``), or None where it logged none."""
    if "schedule.json" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        document = json.loads(Path(client.download_artifacts(run_id, "schedule.json", folder)).read_text())
    return torch.tensor(document["sigmas"], dtype=torch.float64)


def _sibling_baseline_runs(client: MlflowClient, trial_run_id: str | None) -> dict[str, str]:
    """Baseline name -> run id of the baseline runs in the same study and cell as ``trial_run_id``."""
    if trial_run_id is None:
        return {}
    trial = client.get_run(trial_run_id)
    parent = trial.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent is None:
        return {}
    clauses = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'", f"tags.`{TAG_KIND}` = 'baseline'"]
    clauses += [f"tags.`{key}` = '{trial.data.tags[key]}'" for key in IDENTITY_KEYS if key in trial.data.tags]
    runs = client.search_runs([trial.info.experiment_id], " and ".join(clauses), max_results=len(BASELINE_NAMES) * 4)
    return {run.data.tags[TAG_RUN_KEY]: run.info.run_id for run in runs}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScheduleEvaluation:
    """The numbers of one schedule."""

    target: ScheduleTarget
    metrics: dict[str, float]  # eval_num_samples, and eval_fid and/or eval_fd_exact
    feature_stats: FeatureStats | None  # Inception pool3 statistics of the samples (FID)
    data_stats: FeatureStats | None  # data-space statistics of the samples (exact FD)
    grid: Tensor | None  # uint8 [grid_size², 3, H, W]: the first samples by seed, for the grid image
    nodes: tuple[str, ...]  # Ray node ids of the actors that sampled it


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    config: EvaluationConfig
    schedules: tuple[ScheduleEvaluation, ...]

    @property
    def nodes(self) -> set[str]:
        return {node for evaluation in self.schedules for node in evaluation.nodes}


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
        raise ValueError(
            f"EvaluationConfig.seed_offset={config.seed_offset}: evaluation seeds {seeds.start}..{seeds.stop - 1} "
            f"include {len(clashes)} teacher seed(s), e.g. {clashes[0]}; choose a seed_offset above the teacher's seeds"
        )
    if config.fid_reference is None:
        return None
    fid = _fid()
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
    if config.conditions is None:
        return _fid().FeatureStats(gmm.mean(), gmm.covariance())
    if any(isinstance(c, str) for c in config.conditions):
        return None
    counts = Counter(int(config.sample_condition(i)) for i in range(config.num_samples))
    mean = sum(n * gmm.mean(c) for c, n in counts.items()) / config.num_samples
    second = sum(n * (gmm.covariance(c) + torch.outer(gmm.mean(c), gmm.mean(c))) for c, n in counts.items())
    return _fid().FeatureStats(mean, second / config.num_samples - torch.outer(mean, mean))


def _is_image_batch(x: Tensor) -> bool:
    return x.ndim == 4 and x.shape[1] in (1, 3)


class _SampleStatsWorker:
    """Ray Data actor: builds the model and the feature network once; per batch solves and reduces."""

    def __init__(self, build: Callable[..., LoadedModel], targets: Sequence[ScheduleTarget], config: EvaluationConfig,
                 dtype: torch.dtype):
        fid = _fid()
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
            raise ValueError(
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


def _request_blocks(targets: Sequence[ScheduleTarget], config: EvaluationConfig) -> list[pa.Table]:
    """Per-sample requests (target, sample_index, seed[, condition]), one Arrow block per batch of a schedule."""
    seeds = config.sample_seeds()
    blocks = []
    for target in range(len(targets)):
        for start in range(0, config.num_samples, config.batch_size):
            index = range(start, min(start + config.batch_size, config.num_samples))
            columns = {"target": pa.array([target] * len(index), pa.int64()),
                       "sample_index": pa.array(list(index), pa.int64()),
                       "seed": pa.array([seeds[i] for i in index], pa.int64())}
            if config.conditions is not None:
                columns["condition"] = pa.array([config.sample_condition(i) for i in index])
            blocks.append(pa.table(columns))
    return blocks


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
        combine = _fid().FeatureStatsAccumulator.combine
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
        metrics[FID] = _fid().fid_from_stats(feature_stats, reference)
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
    # from_blocks keeps one block per batch (each actor call gets one) and, unlike from_arrow, needs no Ray
    # task per block to read its metadata.
    dataset = ray.data.from_blocks(_request_blocks(targets, config)).map_batches(
        _SampleStatsWorker,
        fn_constructor_kwargs={"build": spec.resolve(), "targets": targets, "config": config, "dtype": dtype},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=config.num_gpus_per_actor,
    )
    # Start every actor before the first batch, so that the work spreads over all of them (and their nodes)
    # however small the evaluation; errors raised by the worker code are not wrapped by Ray Data.
    dataset.context.wait_for_min_actors_s = config.actor_start_timeout_s
    dataset.context.raise_original_map_exception = True
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


# ---------------------------------------------------------------------------------------------
# Recording and reporting
# ---------------------------------------------------------------------------------------------
def grid_image(images: Tensor, columns: int, *, min_tile: int = 32, pad: int = 2) -> Image.Image:
    """uint8 images [n, 3, h, w] -> one RGB image, ``columns`` per row, small tiles upscaled (nearest)."""
    n, channels, height, width = images.shape
    scale = -(-min_tile // min(height, width))
    tiles = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    tile_h, tile_w = height * scale + pad, width * scale + pad
    rows = -(-n // columns)
    canvas = torch.full((channels, rows * tile_h + pad, columns * tile_w + pad), 255, dtype=torch.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        canvas[:, pad + row * tile_h : (row + 1) * tile_h, pad + col * tile_w : (col + 1) * tile_w] = tile
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def _run_tags(config: EvaluationConfig, nodes: Sequence[str]) -> dict[str, str]:
    tags = {"eval_seed_offset": str(config.seed_offset), "eval_ray_nodes": ",".join(nodes)}
    if config.fid_reference is not None:
        tags["eval_fid_reference"] = str(config.fid_reference)
    return tags


def _log_to_run(client: MlflowClient, evaluation: ScheduleEvaluation, config: EvaluationConfig) -> None:
    run_id = evaluation.target.mlflow_run_id
    metrics = [Metric(key, value, 0, 0) for key, value in evaluation.metrics.items()]
    client.log_batch(run_id, metrics=metrics)
    for key, value in _run_tags(config, evaluation.nodes).items():
        client.set_tag(run_id, key, value)
    if evaluation.grid is not None:
        client.log_image(run_id, grid_image(evaluation.grid, max(1, config.grid_size)), GRID_ARTIFACT)


def _export_metrics(result: EvaluationResult) -> dict[str, dict[str, float]]:
    """Export path -> the metrics to add: its own, and each baseline's of the same cell as ``baseline_<name>_<metric>``."""
    by_cell: dict[tuple, list[ScheduleEvaluation]] = defaultdict(list)
    for evaluation in result.schedules:
        by_cell[evaluation.target.cell].append(evaluation)
    updates = {}
    for evaluations in by_cell.values():
        for learned in (e for e in evaluations if e.target.export_path is not None):
            metrics = dict(learned.metrics)
            for other in evaluations:
                if other.target.name != LEARNED:
                    metrics |= {f"baseline_{other.target.name}_{k}": v for k, v in other.metrics.items() if k != NUM_SAMPLES}
            updates[learned.target.export_path] = metrics
    return updates


def _update_export(path: str, metrics: Mapping[str, float], tracker: StudyTracker | None) -> Path:
    """Add ``metrics`` to an exported schedule (atomic rewrite; logged again to the study run if given)."""
    exported = load_schedule(path)
    updated = replace(exported, metrics={**exported.metrics, **metrics})
    return save_export(updated, Path(path).parent, tracker=tracker)


def record_evaluation(result: EvaluationResult, client: MlflowClient | None = None, *,
                      tracker: StudyTracker | None = None) -> None:
    """Log each schedule's metrics, placement tags and sample grid to its MLflow run (with ``client``), add the
    metrics to the exported JSON files, and log the table and per-cell metrics to the study run (``tracker``)."""
    client = client or (tracker.client if tracker is not None else None)
    if client is not None:
        for evaluation in result.schedules:
            if evaluation.target.mlflow_run_id is not None:
                _log_to_run(client, evaluation, result.config)
    for path, metrics in _export_metrics(result).items():
        _update_export(path, metrics, tracker)
    if tracker is not None:
        summary = {f"{e.target.solver}-o{e.target.order}_nfe{e.target.nfe}_{e.target.name}_{k}": v
                   for e in result.schedules for k, v in e.metrics.items() if k != NUM_SAMPLES}
        tracker.log_metrics(summary)
        tracker.flush()
        tracker.log_dict({"config": result.config, "schedules": [_summary_row(e) for e in result.schedules]},
                         "evaluation.json")
        tracker.client.log_text(tracker.run_id, format_evaluation_table(result), "evaluation.txt")


def _summary_row(evaluation: ScheduleEvaluation) -> dict[str, Any]:
    target = evaluation.target
    return {"solver": target.solver, "order": target.order, "nfe": target.nfe, "schedule": target.name,
            "metrics": evaluation.metrics, "mlflow_run_id": target.mlflow_run_id, "export": target.export_path,
            "ray_nodes": list(evaluation.nodes)}


_METRIC_TITLES = {FID: "FID (lower is better)", FD_EXACT: "exact data-space Fréchet distance (lower is better)",
                  FD_CLASSIFIER: "classifier Fréchet distance, an FID analogue (lower is better)",
                  CLASS_ACCURACY: "classifier accuracy on the asked class (higher is better)"}


def format_evaluation_table(result: EvaluationResult) -> str:
    """One table per metric: rows (solver, NFE), columns the baselines and the learned schedule (lower is better)."""
    names = sorted({e.target.name for e in result.schedules} - {LEARNED}) + [LEARNED]
    cells = sorted({e.target.cell for e in result.schedules})
    value = {(e.target.cell, e.target.name): e.metrics for e in result.schedules}
    width = max(12, *(len(n) + 2 for n in names))
    blocks = []
    for metric, title in _METRIC_TITLES.items():
        if not any(metric in e.metrics for e in result.schedules):
            continue
        header = f"{'solver':<16}{'NFE':>4}" + "".join(f"{n:>{width}}" for n in names)
        lines = [f"{title}, {result.config.num_samples} samples per schedule", header, "-" * len(header)]
        for solver, order, nfe in cells:
            entries = [value.get(((solver, order, nfe), n), {}).get(metric) for n in names]
            lines.append(f"{f'{solver}-o{order}':<16}{nfe:>4}"
                         + "".join(f"{'—' if v is None else f'{v:.4g}':>{width}}" for v in entries))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Entry points for a study and for an exports folder
# ---------------------------------------------------------------------------------------------
def study_evaluation_config(study: StudyConfig) -> EvaluationConfig:
    """The study's evaluation settings; unconditional settings of a conditional teacher take its conditions."""
    config = study.evaluation
    if config.conditions is None and study.teacher.conditions is not None:
        config = replace(config, conditions=tuple(study.teacher.sample_conditions()))
    return config


def evaluate_study(study: StudyConfig, cells: Sequence[CellResult], tracker: StudyTracker,
                   show_progress: bool = True) -> EvaluationResult:
    """The study's last stage: evaluate each cell's exported schedule and baselines, record and return."""
    config = study_evaluation_config(study)
    targets = targets_from_cells(study.model.model_id, cells, config.baselines)
    log.info("evaluating %d schedules with %d samples each", len(targets), config.num_samples)
    result = evaluate_schedules(study.model, targets, config, dtype=study.teacher.torch_dtype,
                                reserved_seeds=study.teacher.sample_seeds(), show_progress=show_progress)
    record_evaluation(result, tracker=tracker)
    return result


def evaluate_exports(spec: ModelSpec, exports_dir: str | Path, config: EvaluationConfig = EvaluationConfig(), *,
                     tracking_uri: str | None = None, dtype: torch.dtype = torch.float32,
                     reserved_seeds: Iterable[int] = (), show_progress: bool = True) -> EvaluationResult:
    """Evaluate the schedules exported for ``spec`` in ``exports_dir`` and the baselines of their cells; with
    ``tracking_uri`` (the study's), log to the trial and baseline runs. Metrics go into the JSON files."""
    client = connect(tracking_uri) if tracking_uri is not None else None
    targets = targets_from_exports(exports_dir, model=spec.model_id, client=client, baselines=config.baselines,
                                   ays_model=AYS_MODEL_OF_FAMILY.get(spec.family))
    result = evaluate_schedules(spec, targets, config, dtype=dtype, reserved_seeds=reserved_seeds,
                                show_progress=show_progress)
    record_evaluation(result, client)
    return result

