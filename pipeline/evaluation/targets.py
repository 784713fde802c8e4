"""What the evaluation stage samples and what it returns: the schedules (``ScheduleTarget``: a learned grid of an
export, or a baseline the worker builds from the model's noise schedule) found in a study's cells or an exports
folder, and the numbers of each schedule. Its settings: ``pipeline.evaluation.config.EvaluationConfig``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ld3.baselines import named_grid, study_baseline_names
from ld3.catalog import GITS, check_baseline_name
from ld3.solvers import solver_steps_for_nfe
from pipeline.errors import StudyInputError
from pipeline.evaluation.config import EvaluationConfig
from pipeline.recording.exports import ExportedSchedule, load_schedule
from pipeline.recording.runs import Client, logged_grid, sibling_baseline_runs

if TYPE_CHECKING:
    from ld3.fid import FeatureStats
    from pipeline.search.cell import CellResult

log = logging.getLogger(__name__)

LEARNED = "learned"  # name of a learned schedule among the baselines' names
FID, FD_EXACT, NUM_SAMPLES = "eval_fid", "eval_fd_exact", "eval_num_samples"
FD_CLASSIFIER, CLASS_ACCURACY = "eval_fd_classifier", "eval_class_accuracy"  # models with their own metric (digits)
GRID_ARTIFACT = "evaluation/samples.png"


def fid_module() -> ModuleType:
    """ld3.fid, imported on first use: it needs torchvision (the ``models`` extra), the study does not."""
    import ld3.fid

    return ld3.fid


# ---------------------------------------------------------------------------------------------
# What is evaluated
# ---------------------------------------------------------------------------------------------
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


def targets_from_exports(exports_dir: str | Path, *, model: str | None = None, client: Client | None = None,
                         baselines: Sequence[str] | None = None, ays_model: str | None = None) -> list[ScheduleTarget]:
    """The schedules exported in ``exports_dir`` (of ``model`` only, if given) and the baselines of their cells:
    ``baselines``, or the study's set (ld3.baselines.study_baseline_names with ``ays_model``). With ``client``,
    each baseline is matched to the study's baseline run of the same cell and takes the grid that run logged;
    GITS, which depends on the teacher trajectories, is evaluated only then."""
    folder = Path(exports_dir).expanduser()
    if not folder.is_dir():
        raise StudyInputError(f"exports_dir {folder} is not a folder; pass the --exports-dir of the study")
    exported = [(path, load_schedule(path)) for path in sorted(folder.glob("*.json"))]
    exported = [(path, e) for path, e in exported if model is None or e.model == model]
    if not exported:
        raise StudyInputError(f"exports_dir {folder} holds no exported schedules{f' of model {model!r}' if model else ''}")
    targets = []
    for path, schedule in exported:
        targets.append(learned_target(schedule, path))
        run_ids = sibling_baseline_runs(client, schedule.provenance.mlflow_run_id) if client is not None else {}
        for name in study_baseline_names(ays_model) if baselines is None else baselines:
            sigmas = logged_grid(client, run_ids[name]) if name in run_ids else None
            if name == GITS and sigmas is None:
                log.warning("%s: no GITS grid logged for this cell (pass the study's tracking URI); GITS left out", path)
                continue
            targets.append(ScheduleTarget(schedule.model, schedule.solver, schedule.order, schedule.nfe, name,
                                          sigmas=sigmas, mlflow_run_id=run_ids.get(name)))
    return targets


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
