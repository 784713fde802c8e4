"""What the teacher computes and how its work is spread over Ray actors (``TeacherConfig``): plain data checked
against ``ld3.catalog``'s solver and discretisation names, no torch, so a study's config is built and checked
without loading the solver (``pipeline.teacher.solve`` runs it)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ld3.catalog import check_discretization_name, solver_steps_for_nfe
from ld3.catalog import nfe as solver_nfe
from pipeline.errors import check_int

if TYPE_CHECKING:
    import torch

    from pipeline.models.registry import ConditionValue

TEACHER_DTYPES = ("float32", "float64", "float16")  # names of torch dtypes


def _check_positive(name: str, value: Any, allow_zero: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"TeacherConfig.{name} must be a finite number {bound}, got {value!r}")


def _all_class_ids(values: Sequence[Any]) -> bool:
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)


def _all_prompts(values: Sequence[Any]) -> bool:
    return all(isinstance(v, str) for v in values)


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher settings. The first block decides the data (and the cache key); the second only how it is computed."""

    # What the teacher computes. Defaults: the paper's pixel-model teacher, UniPC-3 with NFE 20 on EDM rho=7.
    solver: str = "unipc_bh1"  # ld3.solvers name
    order: int = 3  # solver order
    nfe: int = 20  # denoiser calls; the grid has solver_steps_for_nfe(solver, nfe) steps
    discretization: str = "edm_rho"  # ld3.discretizations baseline of the teacher grid
    discretization_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"rho": 7.0}; {} = its defaults
    dtype: str = "float32"  # dtype of the latents, the solve and the stored tensors
    keep_trajectory: bool = False  # also store the states at which the teacher called the denoiser
    num_samples: int = 100  # rows; sample ids are 0 .. num_samples-1
    seed_offset: int = 0  # seed of sample i is seed_offset + i ...
    seeds: tuple[int, ...] | None = None  # ... unless explicit per-sample seeds are given (len == num_samples)
    conditions: tuple[ConditionValue, ...] | None = None  # one class id or prompt per sample; None = unconditional

    # How it is computed (results do not depend on these; not part of the cache key).
    batch_size: int = 16  # samples per actor call (and per Parquet part)
    concurrency: int = 1  # Ray actors, each holding one copy of the model
    num_gpus_per_actor: float = 0.0  # > 0 runs the actors on CUDA (fractions share a GPU)
    num_cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        check_discretization_name(self.discretization)  # each check raises a ValueError that lists the valid choices
        check_int("TeacherConfig", "order", self.order, 1)
        check_int("TeacherConfig", "nfe", self.nfe, 1)
        solver_nfe(self.solver, self.n_steps, self.order)  # known solver, supported order, feasible NFE
        if self.dtype not in TEACHER_DTYPES:
            raise ValueError(f"TeacherConfig.dtype must be one of {sorted(TEACHER_DTYPES)}, got {self.dtype!r}")
        check_int("TeacherConfig", "num_samples", self.num_samples, 1)
        check_int("TeacherConfig", "seed_offset", self.seed_offset, 0)
        self._check_per_sample("seeds", self.seeds)
        if self.seeds is not None:
            for seed in self.seeds:
                check_int("TeacherConfig", "seeds[...]", seed, 0)
        self._check_per_sample("conditions", self.conditions)
        if self.conditions is not None and not (_all_class_ids(self.conditions) or _all_prompts(self.conditions)):
            raise ValueError("TeacherConfig.conditions must hold only integer class ids or only str prompts")
        check_int("TeacherConfig", "batch_size", self.batch_size, 1)
        check_int("TeacherConfig", "concurrency", self.concurrency, 1)
        _check_positive("num_gpus_per_actor", self.num_gpus_per_actor, allow_zero=True)
        _check_positive("num_cpus_per_actor", self.num_cpus_per_actor, allow_zero=False)

    def _check_per_sample(self, name: str, values: Sequence | None) -> None:
        if values is not None and len(values) != self.num_samples:
            raise ValueError(
                f"TeacherConfig.{name} must hold one entry per sample (num_samples={self.num_samples}), "
                f"got {len(values)}; set num_samples=len({name})"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # only where tensors are made: the config itself is plain data

        return getattr(torch, self.dtype)

    @property
    def n_steps(self) -> int:
        """Grid steps N of the teacher solve that spend ``nfe`` denoiser calls."""
        return solver_steps_for_nfe(self.solver, self.nfe)

    def sample_seeds(self) -> list[int]:
        """Per-sample seeds, indexed by sample id."""
        if self.seeds is not None:
            return [int(s) for s in self.seeds]
        return list(range(self.seed_offset, self.seed_offset + self.num_samples))

    def sample_conditions(self) -> list[ConditionValue] | None:
        """Per-sample conditions (plain int class ids or str prompts), indexed by sample id; None if unconditional."""
        if self.conditions is None:
            return None
        return [c if isinstance(c, str) else int(c) for c in self.conditions]

    def data_settings(self) -> dict[str, Any]:
        """The settings that change the data, as plain JSON (seeds and conditions are hashed separately)."""
        return {
            "solver": self.solver,
            "order": self.order,
            "nfe": self.nfe,
            "n_steps": self.n_steps,
            "discretization": self.discretization,
            "discretization_kwargs": dict(self.discretization_kwargs),
            "dtype": self.dtype,
            "keep_trajectory": self.keep_trajectory,
            "num_samples": self.num_samples,
        }
