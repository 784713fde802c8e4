"""iPNDM (Zhang & Chen 2023, DEIS; as used by LD3): Adams-Bashforth in sigma on eps = (x - D) / sigma'.

``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j c_j eps_{i-j}`` with the fixed coefficients of equal-step
Adams-Bashforth (docs/method.md#solvers), warm-started with the lower orders. The coefficients ignore the
grid's spacing, so on non-uniform grids the observed order is below the nominal one: that is the method.
Optional learned corrections (docs/method.md#learned-coefficients) replace c_j by ``c_j + delta_{i,j}`` with
``sum_j delta_{i,j} = 0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ld3.catalog import coefficient_shape

from .base import (
    Denoiser,
    accumulate,
    corrected_weights,
    noise_prediction,
    prepare_coefficients,
    prepare_grids,
    step_orders,
    zero_sum_corrections,
)

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
    coefficients: Tensor | None = None,
) -> Tensor:
    """iPNDM of the given order (1-4); NFE = N. Decoupled timesteps: eps_i = (x_i - D(x_i, sigma'_i)) / sigma'_i.

    ``coefficients``: optional [N, order] learned corrections (``ld3.catalog.coefficient_shape``); step i adds
    ``(sigma_{i+1} - sigma_i) delta_{i,j}`` to the weight of eps_{i-j}, delta the zero-sum projection of row i.
    """
    sigmas, sigmas_eval = prepare_grids("ipndm", x, sigmas, sigmas_eval, order)
    n_steps = sigmas.shape[0] - 1
    orders = step_orders(n_steps, order, lower_order_final=False)
    step_sizes = sigmas[1:] - sigmas[:-1]
    # Python-float coefficients times the step sizes: no host-to-device copy.
    weights = {p: torch.stack([c * step_sizes for c in ADAMS_BASHFORTH[p]], dim=1) for p in range(1, order + 1)}
    if coefficients is not None:
        raw = prepare_coefficients("ipndm", x, coefficients, coefficient_shape("ipndm", n_steps, order))
        delta = zero_sum_corrections(raw, orders)
        weights = {p: corrected_weights(w, delta, step_sizes) for p, w in weights.items()}
    evals = sigmas_eval.unbind()
    history: list[Tensor] = []  # eps_i, eps_{i-1}, ... newest first
    for i, step_order in enumerate(orders):
        history = [noise_prediction(denoiser, x, evals[i], cond), *history[: order - 1]]
        x = accumulate(x, weights[step_order][i].unbind(), history[:step_order])
    return x

