"""Validation of exported schedules (pipeline.recording.exports): each check raises a one-line ``ValueError``
naming the field, the problem and, where it helps, the fix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ld3.schedules import EDMSchedule, VPCosineSchedule, VPLinearSchedule
from ld3.solvers import coefficient_shape
from ld3.solvers import nfe as solver_nfe

SIGMA_RANGE = (1e-5, 1e4)  # EDM-form σ of every published diffusion model lies inside (VE's largest: ~1350)
_CONTINUOUS_TIME = (VPLinearSchedule.name, VPCosineSchedule.name)  # native time in (0, 1]


def check_coefficients(values: Tensor, solver: str, order: int, n_steps: int) -> None:
    """Learned coefficient corrections: the solver takes them, and they are finite of shape [N, slots]."""
    try:
        shape = coefficient_shape(solver, n_steps, order)
    except ValueError as err:
        raise ValueError(f"coefficients {err}") from None
    require(tuple(values.shape) == shape, "coefficients",
             f"must have shape {list(shape)} for {solver} order {order} on {n_steps} steps, got {list(values.shape)}")
    require(bool(torch.isfinite(values).all()), "coefficients", "must be finite numbers")


def require(condition: bool, name: str, problem: str) -> None:
    """One-line validation error ``<name> <problem>`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{name} {problem}")


def check_keys(document: Any, expected: tuple[str, ...], prefix: str, optional: tuple[str, ...] = (), *,
               schema_version: int) -> None:
    """``document`` is an object with every ``expected`` key and no other than ``optional`` ones."""
    require(isinstance(document, dict), prefix.rstrip(".") or "document", "must be a JSON object")
    missing = [k for k in expected if k not in document]
    unknown = sorted(k for k in document if k not in expected + optional)
    require(not missing, f"{prefix}{missing[0] if missing else ''}", "is missing")
    require(not unknown, f"{prefix}{unknown[0] if unknown else ''}",
             f"is not a field of schema version {schema_version} (fields: {', '.join(expected + optional)})")


def tensor(values: Any, name: str) -> Tensor:
    """``values`` as a float64 CPU tensor (a copy), or a one-line error naming the field."""
    try:
        tensor = torch.as_tensor(values.detach() if isinstance(values, Tensor) else values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a list of numbers") from None
    return tensor.cpu().clone()


def check_grid(values: Tensor, name: str, *, strict: bool, positive: bool = False, length: int | None = None) -> None:
    """1-D, finite, descending (strictly if ``strict``), optionally positive and of a given length."""
    require(isinstance(values, Tensor) and values.ndim == 1 and values.numel() >= 2, name,
             "must be a 1-D list of at least 2 numbers (N+1 grid points)")
    require(length is None or values.numel() == length, name,
             f"has {values.numel()} points but sigmas has {length}; all grids need N+1 points")
    require(bool(torch.isfinite(values).all()), name, "contains NaN or infinite values")
    require(not positive or bool((values > 0).all()), name, f"must be positive, min is {float(values.min()):.6g}")
    steps = values[1:] - values[:-1]
    descending = bool((steps < 0).all()) if strict else bool((steps <= 0).all())
    require(descending, name, f"must be {'strictly ' if strict else ''}descending (from sigma_max to sigma_min)")
    if positive:
        low, high = SIGMA_RANGE
        require(bool(((values >= low) & (values <= high)).all()), name,
                 f"has values from {float(values.min()):.6g} to {float(values.max()):.6g}, outside [{low:g}, {high:g}] "
                 "where diffusion models' sigmas lie")


def check_solver_nfe(solver: str, order: int, nfe: int, n_steps: int) -> None:
    """The solver exists, takes ``order`` and spends exactly ``nfe`` denoiser calls on ``n_steps`` steps."""
    try:
        calls = solver_nfe(solver, n_steps, order)
    except ValueError as err:
        raise ValueError(f"solver/order: {err}") from None
    require(calls == nfe, "nfe", f"is {nfe} but {solver} spends {calls} denoiser calls on {n_steps} steps")


def check_times_match_sigmas(noise_schedule: str, sigmas: Tensor, timesteps: Tensor, suffix: str) -> None:
    """Native times consistent with the σ grid: equal to σ for EDM, inside the schedule's time range for VP
    (their parameters are not in the file, so VP times are checked for range only)."""
    name = f"timesteps{suffix}"
    if noise_schedule == EDMSchedule.name:
        require(torch.allclose(timesteps, sigmas, rtol=1e-9, atol=0.0), name,
                 f"must equal sigmas{suffix} for the edm schedule (native time is sigma)")
    elif noise_schedule in _CONTINUOUS_TIME:
        require(bool(((timesteps > 0) & (timesteps <= 1)).all()), name,
                 f"must lie in (0, 1] for the {noise_schedule} schedule")
    else:
        require(bool((timesteps >= 0).all()), name, f"must be >= 0 (training-step indices) for {noise_schedule}")
