"""Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", Alg. 2 and its 3rd-order extension).

Data prediction in EDM form (alpha = 1): with ``lambda = -log sigma``, ``h_i = lambda_{i+1} - lambda_i``,
the exponential integrator reads

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + integral_0^{h_i} e^{-(h_i - u)} D(lambda_i + u) du,

and the integrand's Taylor terms D, D', D'' (in lambda) are estimated from the last 1-3 denoiser
outputs. Every step is therefore ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sum_k w_{i,k} D_{i-k}``; the
weights w depend only on the step grid and are computed for all steps at once, before the loop.
Optional learned corrections (docs/method.md#learned-coefficients) add ``(1 - e^{-h_i}) delta_{i,k}`` to
``w_{i,k}`` with ``sum_k delta_{i,k} = 0``.
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
    denoise,
    prepare_coefficients,
    prepare_grids,
    shifted,
    step_orders,
    zero_sum_corrections,
)

# Like the DPM-Solver reference sampler: lower orders on the final steps only for short grids.
LOWER_ORDER_FINAL_BELOW_STEPS = 10


def dpmpp_weights(sigmas: Tensor, max_order: int) -> list[Tensor]:
    """``weights[p - 1]``: [N, p] weights of (D_i, D_{i-1}, ..., D_{i-p+1}) of order-p steps at every step i.

    Order 2 is DPM-Solver++(2M). Order 3 uses ``D1 ~ h D'`` and ``D2 ~ h^2 D''/2`` built from the ratios
    r0 = h_{i-1}/h_i, r1 = h_{i-2}/h_i as in DPM-Solver++(3M), weighted by the exact integrals
    ``int e^{-(h-u)} u^k/k! du``; note the public DPM-Solver/diffusers 3M puts half this weight on D2,
    which leaves it formally second order. Rows of steps without enough history hold unused finite values.
    """
    lam = -torch.log(sigmas)
    h = lam[1:] - lam[:-1]
    phi1 = (sigmas[:-1] - sigmas[1:]) / sigmas[:-1]  # 1 - e^{-h} = integral of e^{-(h-u)}
    weights = [phi1[:, None]]
    if max_order >= 2:
        r0 = shifted(h, 1) / h
        weights.append(torch.stack([phi1 * (1 + 0.5 / r0), -0.5 * phi1 / r0], dim=1))
    if max_order >= 3:
        r1 = shifted(h, 2) / h
        phi2 = 1 - phi1 / h  # (1/h) integral of e^{-(h-u)} u du
        phi3 = 1 - 2 * phi2 / h  # (2/h^2) integral of e^{-(h-u)} u^2/2 du
        # phi1 D_i + phi2 D1 + phi3 D2, with D1 = D1_0 + r0 (D1_0 - D1_1)/(r0 + r1), D2 = (D1_0 - D1_1)/(r0 + r1),
        # D1_0 = (D_i - D_{i-1})/r0, D1_1 = (D_{i-1} - D_{i-2})/r1, expanded into weights on D_i, D_{i-1}, D_{i-2}.
        g = (phi2 * r0 + phi3) / (r0 + r1)
        w0 = phi1 + (phi2 + g) / r0
        w1 = -(phi2 + g) / r0 - g / r1
        w2 = g / r1
        weights.append(torch.stack([w0, w1, w2], dim=1))
    return weights


def dpmpp(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 3,
    cond: Any = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """DPM-Solver++(order)M, multistep with data prediction; NFE = N.

    Warm start with lower orders; on grids of fewer than 10 steps the last steps also drop to lower
    orders (``lower_order_final``). Decoupled timesteps: D_i = D(x_i, sigma'_i); weights use sigmas only.
    ``coefficients``: optional [N, order] learned corrections (``ld3.catalog.coefficient_shape``), scaled by each
    step's weight sum 1 - e^{-h_i} and projected to zero sum per step.
    """
    sigmas, sigmas_eval = prepare_grids("dpmpp", x, sigmas, sigmas_eval, order)
    n_steps = sigmas.shape[0] - 1
    orders = step_orders(n_steps, order, lower_order_final=n_steps < LOWER_ORDER_FINAL_BELOW_STEPS)
    weights = dpmpp_weights(sigmas, max(orders))
    if coefficients is not None:
        raw = prepare_coefficients("dpmpp", x, coefficients, coefficient_shape("dpmpp", n_steps, order))
        delta = zero_sum_corrections(raw, orders)
        phi1 = (sigmas[:-1] - sigmas[1:]) / sigmas[:-1]
        weights = [corrected_weights(w, delta, phi1) for w in weights]
    decays = (sigmas[1:] / sigmas[:-1]).unbind()
    evals = sigmas_eval.unbind()
    history: list[Tensor] = []  # D_i, D_{i-1}, ... newest first
    for i, step_order in enumerate(orders):
        history = [denoise(denoiser, x, evals[i], cond), *history[: order - 1]]
        x = accumulate(decays[i] * x, weights[step_order - 1][i].unbind(), history[:step_order])
    return x

