"""Working with an export after the study: its noise schedule in the model's native form (diffusers'
discrete VP from the model's scheduler config, EDM/VE where time is σ) and resizing it to another step count
by log-σ interpolation (labelled as not learned)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ld3.schedules import EDMSchedule, NoiseSchedule
from ld3.solvers import nfe as solver_nfe
from pipeline.recording.exports import HONOURS_COEFFICIENTS, INTERPOLATED_MODE, ExportedSchedule, build_export


def noise_schedule_named(name: str, sigmas: Tensor, scheduler_config: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """The noise schedule ``name`` of an export with grid ``sigmas``: EDM/VE (time is σ) or discrete VP built from
    the model's diffusers scheduler config (its betas)."""
    if name == "edm":
        return EDMSchedule(sigma_min=float(sigmas.min()), sigma_max=float(sigmas.max()))
    if name != "vp_discrete":
        raise ValueError(f"noise_schedule {name!r} is not supported here (only edm and vp_discrete: diffusers has no "
                         "pipelines for continuous-time VP models); sample with ld3.sampling.sample")
    if scheduler_config is None:
        raise ValueError("a vp_discrete schedule needs the model's scheduler config for its betas "
                         "(pipe.scheduler.config, or the file scheduler/scheduler_config.json of the model)")
    from ld3.models.diffusers_models import schedule_from_scheduler_config

    schedule = schedule_from_scheduler_config(scheduler_config)
    schedule.check_sigmas(sigmas, "sigmas")
    return schedule


def native_schedule(exported: ExportedSchedule, scheduler_config: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """:func:`noise_schedule_named` of an export, refusing a scheduler config whose timesteps are not the export's."""
    schedule = noise_schedule_named(exported.noise_schedule, exported.sigmas, scheduler_config)
    gap = float((schedule.t_from_sigma(exported.sigmas) - exported.timesteps).abs().max())
    if gap > 1e-6 * max(1.0, float(exported.timesteps.abs().max())):
        raise ValueError(f"the export's timesteps differ from this model's by up to {gap:.4g}; it was learned for a model "
                         "with another noise schedule (check the scheduler config)")
    return schedule


def loglinear_interpolation(sigmas: Tensor, n_steps: int) -> Tensor:
    """``n_steps + 1`` values: log σ interpolated linearly over the normalised step index i/N (as Align Your
    Steps resizes its schedules); both endpoints are kept exactly."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    log_sigmas = sigmas.to(torch.float64).log()
    position = torch.linspace(0, log_sigmas.numel() - 1, n_steps + 1, dtype=torch.float64)
    left = position.floor().long().clamp(max=log_sigmas.numel() - 2)
    fraction = position - left
    resized = torch.exp(log_sigmas[left] + fraction * (log_sigmas[left + 1] - log_sigmas[left]))
    resized[[0, -1]] = sigmas[[0, -1]].to(torch.float64)
    return resized


def interpolated_export(exported: ExportedSchedule, n_steps: int, schedule: NoiseSchedule, source: str) -> ExportedSchedule:
    """``exported`` resized to ``n_steps`` steps by :func:`loglinear_interpolation` (σ and σ_eval alike), labelled
    as not learned: ``mode`` is ``"interpolated"``, no metrics, the origin in ``provenance.config``. Learned solver
    coefficients belong to their grid's steps and cannot be resized: such an export is refused."""
    if exported.coefficients is not None:
        raise ValueError(f"{source} carries learned solver coefficients, one row per step of its {exported.n_steps}-step "
                         f"grid, which interpolation cannot resize; run it at {exported.n_steps} steps with "
                         f"{' or '.join(HONOURS_COEFFICIENTS)}")
    return build_export(
        sigmas=loglinear_interpolation(exported.sigmas, n_steps),
        sigmas_eval=None if exported.sigmas_eval is None else loglinear_interpolation(exported.sigmas_eval, n_steps),
        noise_schedule=schedule, model=exported.model, solver=exported.solver, order=exported.order,
        nfe=solver_nfe(exported.solver, n_steps), mode=INTERPOLATED_MODE, metrics={},
        config={"not_learned": f"log-sigma interpolation of {source} ({exported.n_steps} steps, mode {exported.mode}) "
                               f"to {n_steps} steps", "source_config": exported.provenance.config},
        teacher_cache_key=exported.provenance.teacher_cache_key, study=exported.provenance.study,
    )
