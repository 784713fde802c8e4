"""Shared plumbing of the ODE solvers: input validation, grid preparation, the denoiser call.

Every solver integrates the probability-flow ODE in EDM form (docs/method.md#edm-form)

    dx/dsigma = (x - D(x, sigma)) / sigma = eps(x, sigma)

from ``sigmas[0]`` down to ``sigmas[-1]`` (no final jump to sigma = 0). Decoupled timesteps
(docs/method.md#the-learnable-discretisation): the step formulas use the step grid ``sigmas``; the denoiser call
and any conversion of its output (D <-> eps) use the evaluation grid ``sigmas_eval``.

Per-sample grids (docs/method.md#batched-trials): ``sigmas`` may be [N+1] (one grid for the batch) or [B, N+1]
(one grid per sample, e.g. K trials' schedules solved in one batch). Solvers work on the *step-major* layout
that ``prepare_grids`` returns, [N+1] or [N+1, B, 1, ..., 1]: indexing and slicing steps act on dim 0, the
per-step coefficients then broadcast against x, and all solver arithmetic is written once for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ld3.catalog import check_order


class Denoiser(Protocol):
    """``D(x, sigma, cond) -> x0_hat`` in EDM form, ``sigma`` of shape [B] in x's dtype."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor: ...


class Solver(Protocol):
    """``solver(denoiser, x, sigmas, sigmas_eval=None, *, order, cond=None) -> x at sigmas[-1]``."""

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        sigmas_eval: Tensor | None = None,
        *,
        order: int = ...,
        cond: Any = None,
    ) -> Tensor: ...


def _check_shapes(x: Tensor, sigmas: Tensor, sigmas_eval: Tensor) -> None:
    for name, value in (("x", x), ("sigmas", sigmas), ("sigmas_eval", sigmas_eval)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not x.is_floating_point() or x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"x must be a floating-point tensor [B, ...] with B >= 1, got {x.dtype} of shape {tuple(x.shape)}"
        )
    per_sample = sigmas.ndim == 2 and sigmas.shape[0] == x.shape[0]
    if not (sigmas.ndim == 1 or per_sample) or sigmas.shape[-1] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of N+1 >= 2 noise levels (N solver steps), or one such grid per sample "
            f"[{x.shape[0]}, N+1], got shape {tuple(sigmas.shape)}"
        )
    if sigmas_eval.shape != sigmas.shape:
        raise ValueError(
            f"sigmas_eval must have the shape of sigmas {tuple(sigmas.shape)} (one evaluation point per grid point), "
            f"got {tuple(sigmas_eval.shape)}"
        )


def _check_values(x: Tensor, sigmas: Tensor, sigmas_eval: Tensor) -> None:
    """Value checks with a single host synchronisation; details are computed only on failure.

    Skipped while a CUDA graph is captured (a host synchronisation is illegal there): the graph's eager
    warm-up call checks them (``ld3.cuda_graphs``).
    """
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    s, se = sigmas.detach(), sigmas_eval.detach()
    flags = torch.stack(
        [
            torch.isfinite(x.detach()).all(),
            torch.isfinite(s).all() & (s > 0).all(),
            (s[1:] < s[:-1]).all(),
            torch.isfinite(se).all() & (se > 0).all(),
        ]
    ).tolist()
    x_ok, sigmas_ok, decreasing, eval_ok = flags
    if not x_ok:
        raise ValueError(f"x contains {int((~torch.isfinite(x.detach())).sum())} NaN/Inf values; check the latents")
    if not sigmas_ok:
        raise ValueError(f"sigmas must be finite and > 0, got {s.tolist()}")
    if not decreasing:
        bad = torch.nonzero(s[1:] >= s[:-1])[0].tolist()  # (step, sample...) in the step-major layout
        step, where = bad[0] + 1, tuple(bad[1:])
        sample = f" (sample {where[0]})" if where else ""
        raise ValueError(
            f"sigmas must decrease strictly (sigma_max first, sigma_min last) in {x.dtype}{sample}; "
            f"sigmas[{step}]={float(s[(step, *where)]):.8g} >= sigmas[{step - 1}]={float(s[(step - 1, *where)]):.8g}"
        )
    if not eval_ok:
        raise ValueError(f"sigmas_eval must be finite and > 0, got {se.tolist()}")


def prepare_grids(
    solver: str,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None,
    order: int,
) -> tuple[Tensor, Tensor]:
    """Validate a solver call; return ``(sigmas, sigmas_eval)`` in x's dtype and on x's device, in the step-major
    layout (module docstring): [N+1] as given, or [B, N+1] per-sample grids as [N+1, B, 1, ..., 1].

    ``sigmas_eval=None`` means "evaluate on the step grid": the very same tensor is used for both,
    so the result is bit-identical to passing ``sigmas_eval=sigmas``. Casting is differentiable.
    The values are checked after the cast (a grid strictly decreasing in float64 may not be in float32).
    """
    check_order(solver, order)  # the solver's orders: ld3.catalog.SOLVER_TABLE
    if sigmas_eval is None:
        sigmas_eval = sigmas
    _check_shapes(x, sigmas, sigmas_eval)
    sigmas, sigmas_eval = (step_major(g.to(device=x.device, dtype=x.dtype), x) for g in (sigmas, sigmas_eval))
    _check_values(x, sigmas, sigmas_eval)
    return sigmas, sigmas_eval


def step_major(grid: Tensor, x: Tensor) -> Tensor:
    """A [N+1] grid as it is; per-sample grids [B, N+1] as [N+1, B, 1, ..., 1], broadcasting against x per step."""
    if grid.ndim == 1:
        return grid
    return grid.transpose(0, 1).reshape(grid.shape[1], grid.shape[0], *([1] * (x.ndim - 1)))


def initial_state(sigmas: Tensor, z: Tensor) -> Tensor:
    """``x_T = sigmas[0] · z``, with each sample's own sigma_max when ``sigmas`` holds one grid per sample [B, N+1]."""
    if sigmas.ndim == 1:
        return sigmas[0] * z
    return step_major(sigmas, z)[0] * z


def denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    """``D(x, sigma)`` for one step's ``sigma`` (0-dim, or [B, 1, ..., 1] per sample), handed over as a [B] tensor."""
    return denoiser(x, sigma.reshape(-1).expand(x.shape[0]), cond)


def noise_prediction(denoiser: Denoiser, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    """``eps = (x - D(x, sigma)) / sigma``, the ODE's right-hand side dx/dsigma."""
    return (x - denoise(denoiser, x, sigma, cond)) / sigma


def accumulate(base: Tensor, weights: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """``base + sum_k weights[k] * values[k]`` for 0-dim weights, one fused multiply-add per term."""
    for weight, value in zip(weights, values, strict=True):
        base = torch.addcmul(base, weight, value)
    return base


def step_orders(n_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each step of a multistep method: warm start ``min(order, i + 1)``, and with
    ``lower_order_final`` also ``min(order, N - i)`` so the last steps fall back to lower orders."""
    return [min(order, i + 1, n_steps - i if lower_order_final else order) for i in range(n_steps)]


def shifted(values: Tensor, k: int) -> Tensor:
    """``values[i - k]`` for every step i (``values[0]`` where ``i < k``): past entries, vectorised over steps (dim 0)."""
    index = (torch.arange(values.shape[0], device=values.device) - k).clamp_min(0)
    return values[index]


def prepare_coefficients(solver: str, x: Tensor, coefficients: Tensor, shape: tuple[int, int]) -> Tensor:
    """Validate learned coefficient corrections (docs/method.md#learned-coefficients): [N, slots], finite,
    cast to x's dtype and device (differentiably). The finiteness check is skipped during CUDA graph capture."""
    if not isinstance(coefficients, Tensor):
        raise TypeError(f"coefficients must be a torch.Tensor, got {type(coefficients).__name__}")
    if tuple(coefficients.shape) != shape:
        raise ValueError(
            f"coefficients for {solver} must have shape {shape} (N steps x slots of this order, "
            f"ld3.solvers.coefficient_shape), got {tuple(coefficients.shape)}"
        )
    coefficients = coefficients.to(device=x.device, dtype=x.dtype)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not bool(torch.isfinite(coefficients.detach()).all()):
        raise ValueError(f"coefficients contain NaN/Inf values: {coefficients.detach().tolist()}")
    return coefficients


def zero_sum_corrections(raw: Tensor, counts: Sequence[int]) -> Tensor:
    """``delta[i, k] = raw[i, k] - mean_{k' < counts[i]} raw[i, k']`` for ``k < counts[i]``, 0 beyond.

    Each step's corrections sum to zero over the ``counts[i]`` weights it uses, so a corrected step keeps the
    sum of its weights (first-order consistency); a step with one weight has no freedom (delta = 0).
    """
    sizes = torch.tensor(counts, dtype=raw.dtype).to(raw.device)[:, None]  # one host-to-device copy
    active = torch.arange(raw.shape[1], device=raw.device) < sizes
    used = torch.where(active, raw, torch.zeros_like(raw))
    mean = used.sum(dim=1, keepdim=True) / sizes
    return torch.where(active, raw - mean, torch.zeros_like(raw))


def corrected_weights(weights: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
    """``weights[i, k] + scale[i] * delta[i, k]`` for the [N, p] weights of order-p steps (delta's first p columns).

    ``scale`` is each step's weight sum (Δσ for iPNDM, 1 - e^{-h} for data prediction), so a correction is a
    fraction of the step's own size. With delta = 0 the weights are returned bit for bit (w + 0 == w).
    Step-major per-sample weights [N, p, B, 1, ...] take the same corrections for every sample."""
    delta = delta[:, : weights.shape[1]]
    return weights + scale[:, None] * delta.reshape(*delta.shape, *([1] * (weights.ndim - 2)))
