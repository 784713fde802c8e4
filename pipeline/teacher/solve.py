"""The teacher solve (docs/method.md, "Objective"): pairs ``(z, y)`` with ``y = decode(Solver(sigma_max z))``.

:class:`TeacherConfig` (pipeline.teacher.config) says what the teacher computes and how the work is spread over Ray actors;
:func:`solve_teacher` is the one in-process implementation of the solve, used by every Ray actor of
the teacher cache and by anyone who needs the same data without the cache (tests, benchmarks).
Latents come from per-sample seeds, so a sample's data never depends on the batch it was solved in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ld3.discretizations import get_baseline
from ld3.sampling import solve_from_latents
from ld3.utils import latents_from_seeds
from pipeline.models.registry import ConditionValue, Denoiser, LoadedModel
from pipeline.teacher.config import TeacherConfig


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
