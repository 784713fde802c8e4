"""Sampling with a given discretisation: ``ŷ = decode(Solver(σ_0 · z))`` (docs/method.md#objective).

The one place that turns latents into outputs; the trainer, the teacher, baseline evaluation and
sample generation all go through :func:`solve_from_latents`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ld3.solvers import Denoiser, Solver, get_solver
from ld3.solvers.base import initial_state

LossFn = Callable[[Tensor, Tensor], Tensor]


def solve_from_latents(
    denoiser: Denoiser,
    solver: str | Solver,
    order: int,
    sigmas: Tensor,
    z: Tensor,
    *,
    sigmas_eval: Tensor | None = None,
    cond: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """Start at ``x_T = sigmas[0] · z`` and solve down to ``sigmas[-1]``; decode latent models' outputs.

    ``sigmas`` (and ``sigmas_eval``) are one grid [N+1] or one grid per latent [M, N+1] (ld3.solvers.base).
    Differentiable in ``z``, ``sigmas``, ``sigmas_eval`` and ``coefficients`` (the caller decides ``no_grad``);
    the grid is cast to ``z``'s dtype and device. ``coefficients``: learned corrections of a multistep
    solver's weights (docs/method.md#learned-coefficients), passed to the solver only when given.
    """
    solve = get_solver(solver) if isinstance(solver, str) else solver
    sigmas = sigmas.to(device=z.device, dtype=z.dtype)
    if sigmas_eval is not None:
        sigmas_eval = sigmas_eval.to(device=z.device, dtype=z.dtype)
    extra = {} if coefficients is None else {"coefficients": coefficients}
    x = solve(denoiser, initial_state(sigmas, z), sigmas, sigmas_eval, order=order, cond=cond, **extra)
    return x if decode is None else decode(x)


def _rows(cond: Any, index: slice) -> Any:
    """The conditions of a slice of samples (a tensor, or a list/tuple of prompts)."""
    return None if cond is None else cond[index]


def _grid_rows(grid: Tensor | None, index: slice) -> Tensor | None:
    """A shared grid [N+1] as it is; per-sample grids [M, N+1] sliced like the latents."""
    return grid if grid is None or grid.ndim == 1 else grid[index]


def _solve_in_batches(denoiser: Denoiser, solver: str | Solver, order: int, sigmas: Tensor, z: Tensor,
                      sigmas_eval: Tensor | None, cond: Any, decode: Callable[[Tensor], Tensor] | None,
                      batch_size: int, coefficients: Tensor | None) -> Iterator[tuple[slice, Tensor]]:
    """(rows, decoded outputs) of :func:`solve_from_latents`, ``batch_size`` latents at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, z.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        yield rows, solve_from_latents(denoiser, solver, order, _grid_rows(sigmas, rows), z[rows],
                                       sigmas_eval=_grid_rows(sigmas_eval, rows),
                                       cond=_rows(cond, rows), decode=decode, coefficients=coefficients)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    solver: str | Solver,
    order: int,
    sigmas: Tensor,
    z: Tensor,
    *,
    sigmas_eval: Tensor | None = None,
    cond: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    coefficients: Tensor | None = None,
) -> Tensor:
    """:func:`solve_from_latents` without gradients, ``batch_size`` latents at a time."""
    batches = _solve_in_batches(denoiser, solver, order, sigmas, z, sigmas_eval, cond, decode, batch_size, coefficients)
    return torch.cat([outputs for _, outputs in batches])


@torch.no_grad()
def sample_losses(
    denoiser: Denoiser,
    solver: str | Solver,
    order: int,
    sigmas: Tensor,
    z: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    sigmas_eval: Tensor | None = None,
    cond: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    coefficients: Tensor | None = None,
) -> Tensor:
    """Per-sample losses ``d(ŷ, y)`` [M] of a schedule on teacher pairs (z, y), left on the device (no host sync)."""
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"z and y must hold the same number of samples, got {z.shape[0]} and {y.shape[0]}")
    batches = _solve_in_batches(denoiser, solver, order, sigmas, z, sigmas_eval, cond, decode, batch_size, coefficients)
    return torch.cat([loss_fn(outputs, y[rows]) for rows, outputs in batches])


def schedule_loss(
    denoiser: Denoiser,
    solver: str | Solver,
    order: int,
    sigmas: Tensor,
    z: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    **options: Any,
) -> float:
    """Mean per-sample loss of a schedule (:func:`sample_losses`, same options): the validation metric."""
    losses = sample_losses(denoiser, solver, order, sigmas, z, y, loss_fn, **options)
    return float(losses.to(torch.float64).mean())
