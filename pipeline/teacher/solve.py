"""The teacher solve (docs/method.md, "Objective"): pairs ``(z, y)`` with ``y = decode(Solver(sigma_max z))``.

:class:`TeacherConfig` says what the teacher computes and how the work is spread over Ray actors;
:func:`solve_teacher` is the one in-process implementation of the solve, used by every Ray actor of
the teacher cache and by anyone who needs the same data without the cache (tests, benchmarks).
Latents come from per-sample seeds, so a sample's data never depends on the batch it was solved in.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ld3.discretizations import get_baseline
from ld3.sampling import solve_from_latents
from ld3.solvers import nfe as solver_nfe
from ld3.solvers import solver_steps_for_nfe
from ld3.utils import latents_from_seeds
from pipeline.errors import check_int
from pipeline.models.registry import ConditionValue, Denoiser, LoadedModel

TEACHER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
}


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
        get_baseline(self.discretization)  # each check raises a ValueError that lists the valid choices
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
        return TEACHER_DTYPES[self.dtype]

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


@dataclass(frozen=True)
class TeacherBatch:
    """Teacher data of one batch of samples."""

    z: Tensor  # [B, *latent_shape] standard-normal latents; x_T = sigma_max z
    y: Tensor  # [B, *output_shape] teacher output, decoded for latent models
    trajectory: Tensor | None  # [B, NFE, *latent_shape] states at the denoiser calls (keep_trajectory)
    trajectory_sigmas: Tensor | None  # [NFE] float64 evaluation sigma of each of those calls


def teacher_sigmas(schedule: Any, config: TeacherConfig) -> Tensor:
    """The teacher's descending float64 grid over the model's full sigma range."""
    return get_baseline(config.discretization)(config.n_steps, schedule, **config.discretization_kwargs)


class NonFiniteTeacherError(ValueError):
    """The teacher solve produced NaN/Inf values; such data is never cached or used."""


class _DenoiserCallRecorder:
    """Wraps a denoiser and records every call's sigma and whether its output was finite (without a host
    sync per call); with ``keep_states`` also a copy of every input state (the solve's trajectory)."""

    def __init__(self, denoiser: Denoiser, keep_states: bool):
        self.denoiser = denoiser
        self.keep_states = keep_states
        self.states: list[Tensor] = []
        self.sigmas: list[Tensor] = []
        self.finite: list[Tensor] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if self.keep_states:
            self.states.append(x.detach().clone())
        self.sigmas.append(sigma.detach()[0].to(torch.float64))
        out = self.denoiser(x, sigma, cond)
        self.finite.append(torch.isfinite(out).all())
        return out

    def check_finite(self, y: Tensor, config: TeacherConfig, seeds: Sequence[int]) -> None:
        """Raise NonFiniteTeacherError naming the σ of the first denoiser call that returned NaN/Inf."""
        if bool(torch.isfinite(y).all()):
            return
        what = (f"the teacher solve ({config.solver}-{config.order}, NFE {config.nfe}) of {len(seeds)} samples "
                f"(seeds {min(seeds)}..{max(seeds)}) gave NaN/Inf outputs")
        bad_calls = (~torch.stack(self.finite)).nonzero().flatten().tolist()
        if not bad_calls:
            raise NonFiniteTeacherError(f"{what}, although every denoiser call returned finite values: the solver or "
                                        "the decoder overflowed; check the model's sigma range and dtype")
        first = bad_calls[0]
        raise NonFiniteTeacherError(
            f"{what}: the denoiser first returned NaN/Inf at sigma={float(self.sigmas[first]):.6g} "
            f"(call {first + 1} of {len(self.finite)}); check the model at that noise level, or its sigma_min"
        )


def solve_teacher(
    model: LoadedModel,
    config: TeacherConfig,
    seeds: Sequence[int],
    conditions: Sequence[ConditionValue] | None = None,
    device: torch.device | str = "cpu",
) -> TeacherBatch:
    """Solve the teacher ODE for one batch: ``z`` from ``seeds``, ``x_T = sigma_max z``, ``y = decode(x_0)``.

    Raises NonFiniteTeacherError when the outputs hold NaN/Inf (naming the σ where the denoiser failed).
    """
    device = torch.device(device)
    sigmas = teacher_sigmas(model.schedule, config).to(device)
    z = latents_from_seeds(seeds, model.shape, config.torch_dtype, device)
    cond = None if conditions is None else model.encode_condition(list(conditions), device)
    recorder = _DenoiserCallRecorder(model.denoiser, keep_states=config.keep_trajectory)
    with torch.no_grad():
        y = solve_from_latents(recorder, config.solver, config.order, sigmas, z, cond=cond, decode=model.decode)
    recorder.check_finite(y, config, seeds)
    if not config.keep_trajectory:
        return TeacherBatch(z=z, y=y, trajectory=None, trajectory_sigmas=None)
    return TeacherBatch(
        z=z,
        y=y,
        trajectory=torch.stack(recorder.states, dim=1),
        trajectory_sigmas=torch.stack(recorder.sigmas).cpu(),
    )
