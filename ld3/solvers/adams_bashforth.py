"""iPNDM (Zhang & Chen 2023, DEIS; as used by LD3): Adams-Bashforth in sigma on eps = (x - D) / sigma'.

``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j c_j eps_{i-j}`` with the fixed coefficients of equal-step
Adams-Bashforth (docs/method.md#solvers), warm-started with the lower orders. The coefficients ignore the
grid's spacing, so on non-uniform grids the observed order is below the nominal one: that is the method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Denoiser, accumulate, noise_prediction, prepare_grids, step_orders

IPNDM_ORDERS = (1, 2, 3, 4)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 4,
    cond: Any = None,
) -> Tensor:
    """iPNDM of the given order (1-4); NFE = N. Decoupled timesteps: eps_i = (x_i - D(x_i, sigma'_i)) / sigma'_i."""
    sigmas, sigmas_eval = prepare_grids("ipndm", x, sigmas, sigmas_eval, order, IPNDM_ORDERS)
    n_steps = sigmas.numel() - 1
    step_sizes = sigmas[1:] - sigmas[:-1]
    # Python-float coefficients times the step sizes: no host-to-device copy.
    coefficients = {p: torch.stack([c * step_sizes for c in ADAMS_BASHFORTH[p]], dim=1) for p in range(1, order + 1)}
    evals = sigmas_eval.unbind()
    history: list[Tensor] = []  # eps_i, eps_{i-1}, ... newest first
    for i, step_order in enumerate(step_orders(n_steps, order, lower_order_final=False)):
        history = [noise_prediction(denoiser, x, evals[i], cond), *history[: order - 1]]
        x = accumulate(x, coefficients[step_order][i].unbind(), history[:step_order])
    return x
