"""A cell of the study, one (solver, order, NFE): what its trials and baseline tasks receive (picklable data
only) and what the search found in it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ld3.train import LD3Config
from pipeline.models.registry import LoadedModel
from pipeline.recording.tracking import TrackingContext
from pipeline.search.space import SearchSpace, SolverChoice

QUALITY_KEYS = ("fd_exact", "fd_classifier", "class_accuracy")  # sample-quality metrics of a schedule
FD_KEYS = ("fd_exact", "fd_classifier")  # the sample-quality distances among them (lower is better)


@dataclass(frozen=True)
class SearchSettings:
    """What the search stage needs of a study (``pipeline.driver.search_settings``): the data split, the trainer's
    base config and space, the Tune budget and each trial's resources."""

    model_id: str
    family: str
    dtype: torch.dtype  # of the teacher data and the model
    num_train: int
    num_validation: int
    trainer: LD3Config
    search: SearchSpace
    num_trials: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    asha_grace_epochs: float
    asha_reduction_factor: int
    fd_samples: int
    eval_batch_size: int
    seed: int
    trials_per_bundle: int = 1  # K > 1: K trials train in one LD3Bundle on a bundle worker (pipeline.search.bundles)

    @property
    def resources(self) -> dict[str, float]:
        """What one trial (one bundle worker when K > 1) or baseline task asks Ray for."""
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}

    @property
    def bundled(self) -> bool:
        return self.trials_per_bundle > 1


@dataclass(frozen=True)
class CellContext:
    """Everything a trial or baseline task needs, picklable (strings, dataclasses, no live objects)."""

    settings: SearchSettings
    solver: SolverChoice
    nfe: int
    n_steps: int
    cache_root: str
    cache_key: str
    tracking: TrackingContext
    build_model: Callable[..., LoadedModel]  # the model's builder, resolved in the driver (ModelSpec.resolve)
    best_baseline: str | None = None  # set once the cell's baselines are evaluated
    baseline_sigmas: Mapping[str, tuple[float, ...]] | None = None  # the cell's baseline grids, likewise
    baseline_costs: Mapping[str, float] | None = None  # seconds each grid took to compute, likewise
    bundle_coordinator: str | None = None  # name of the cell's bundle coordinator actor (trials_per_bundle > 1)

    @property
    def identity(self) -> dict[str, Any]:
        return {"model": self.settings.model_id, "solver": self.solver.name, "order": self.solver.order,
                "nfe": self.nfe, "teacher_cache_key": self.cache_key}


@dataclass(frozen=True)
class CellResult:
    """Learned vs baselines for one (solver, order, NFE), and what was exported for it."""

    solver: SolverChoice
    nfe: int
    baselines: dict[str, dict[str, Any]]
    best: dict[str, Any] | None  # the best finished trial's last report (None if no trial finished)
    trials: dict[str, int]  # counts: finished, stopped (early, by the halving rule), failed
    export_path: str | None
    export_note: str = ""  # what happened to an earlier export of the cell (kept or replaced), for the console

    @property
    def best_baseline(self) -> tuple[str, dict[str, Any]]:
        return min(self.baselines.items(), key=lambda item: item[1]["final_val_loss"])

    @property
    def fd_key(self) -> str | None:
        """The sample-quality distance the cell's runs report (``fd_exact`` or ``fd_classifier``), if any."""
        return next((k for k in FD_KEYS if k in self.best_baseline[1]), None)

    @property
    def best_fd_baseline(self) -> tuple[str, float] | None:
        """The baseline with the lowest sample-quality distance, which need not be the best in val loss."""
        key = self.fd_key
        scored = [(name, m[key]) for name, m in self.baselines.items() if key is not None and key in m]
        return min(scored, key=lambda item: item[1]) if scored else None

    @property
    def learned_wins(self) -> bool:
        """A finished trial's validation loss beats every baseline's (ties go to the baseline)."""
        return self.best is not None and self.best["final_val_loss"] < self.best_baseline[1]["final_val_loss"]

    @property
    def winner(self) -> str:
        """The best schedule measured for the cell: "learned" or "baseline:<name>" (what is exported)."""
        return "learned" if self.learned_wins else f"baseline:{self.best_baseline[0]}"

    @property
    def winner_run_id(self) -> str:
        return (self.best if self.learned_wins else self.best_baseline[1])["mlflow_run_id"]
