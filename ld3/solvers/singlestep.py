"""One-step solvers in sigma: Euler, Heun (EDM 2nd order) and DPM-Solver-2 (singlestep).

In EDM form the ODE is ``dx/dsigma = eps(x, sigma)`` with ``eps = (x - D) / sigma'`` (sigma' the
decoupled evaluation point, docs/method.md); these solvers step it directly in sigma.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Denoiser, accumulate, noise_prediction, prepare_grids


def euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 1,
    cond: Any = None,
) -> Tensor:
    """Euler's method in sigma (Karras et al. 2022, Alg. 1 without the correction); NFE = N.

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps(x_i, sigma'_i)``.
    """
    sigmas, sigmas_eval = prepare_grids("euler", x, sigmas, sigmas_eval, order)
    step_sizes = (sigmas[1:] - sigmas[:-1]).unbind()
    for step_size, sigma_eval in zip(step_sizes, sigmas_eval.unbind()):
        x = torch.addcmul(x, step_size, noise_prediction(denoiser, x, sigma_eval, cond))
    return x


def heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 2,
    cond: Any = None,
) -> Tensor:
    """EDM's 2nd-order Heun method (Karras et al. 2022, Alg. 1), correction on every step; NFE = 2N.

    Decoupled timesteps: the Euler predictor lands on the step point sigma_{i+1}, and its slope is
    evaluated at that point's evaluation sigma'_{i+1}, exactly as the next step would evaluate it.
    """
    sigmas, sigmas_eval = prepare_grids("heun", x, sigmas, sigmas_eval, order)
    step_sizes = sigmas[1:] - sigmas[:-1]
    half_steps = (0.5 * step_sizes).unbind()
    evals = sigmas_eval.unbind()
    for i, step_size in enumerate(step_sizes.unbind()):
        slope = noise_prediction(denoiser, x, evals[i], cond)
        x_euler = torch.addcmul(x, step_size, slope)  # Euler step
        slope_next = noise_prediction(denoiser, x_euler, evals[i + 1], cond)
        x = accumulate(x, (half_steps[i], half_steps[i]), (slope, slope_next))  # 2nd-order correction
    return x


def dpm_solver_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 2,
    cond: Any = None,
) -> Tensor:
    """Singlestep DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r_1 = 1/2, noise prediction); NFE = 2N.

    In EDM form it is the midpoint method in sigma with the midpoint taken in lambda = -log sigma:
    ``sigma_mid = sqrt(sigma_i sigma_{i+1})``, ``u = x_i + (sigma_mid - sigma_i) eps(x_i, sigma'_i)``,
    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) eps(u, sigma'_mid)``.
    Decoupled timesteps: the midpoint is evaluated at the lambda-midpoint of the evaluation points,
    ``sigma'_mid = sqrt(sigma'_i sigma'_{i+1})`` (shifted like its endpoints; equal to sigma_mid when
    sigmas_eval == sigmas).
    """
    sigmas, sigmas_eval = prepare_grids("dpm_solver_2", x, sigmas, sigmas_eval, order)
    mids = torch.sqrt(sigmas[:-1] * sigmas[1:])
    mids_eval = torch.sqrt(sigmas_eval[:-1] * sigmas_eval[1:]).unbind()
    to_mid = (mids - sigmas[:-1]).unbind()
    step_sizes = (sigmas[1:] - sigmas[:-1]).unbind()
    evals = sigmas_eval.unbind()
    for i, step_size in enumerate(step_sizes):
        x_mid = torch.addcmul(x, to_mid[i], noise_prediction(denoiser, x, evals[i], cond))
        x = torch.addcmul(x, step_size, noise_prediction(denoiser, x_mid, mids_eval[i], cond))
    return x
