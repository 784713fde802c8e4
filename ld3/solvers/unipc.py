"""UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector, data prediction, EDM form.

With ``lambda = -log sigma``, ``h_i = lambda_{i+1} - lambda_i`` and ``r_k = (lambda_{i-k} - lambda_i) / h_i``:

    predictor  x~_{i+1} = (sigma_{i+1}/sigma_i) x_i + phi1 D_i - B(h) sum_{k<p} rho^p_k (D_{i-k} - D_i) / r_k
    corrector  x_{i+1}  = (sigma_{i+1}/sigma_i) x_i + phi1 D_i - B(h) [sum_{k<p} rho^c_k (D_{i-k} - D_i) / r_k
                                                                      + rho^c_p (D~_{i+1} - D_i)]

with ``phi1 = 1 - e^{-h}``, ``B(h) = -h`` (bh1) or ``e^{-h} - 1`` (bh2), and rho solving the order conditions
``sum_k rho_k r_k^(j-1) = j! phi_{j+1}(-h) (-h) / B(h)`` (the paper's Eq. 11 / Alg. 2-3). ``D~_{i+1} =
D(x~_{i+1}, sigma'_{i+1})`` is the next step's model evaluation, so the corrector costs no extra call.
All coefficients depend only on the step grid and are computed for every step at once, as weights on the
stored D values; every operation keeps the graph (no ``torch.tensor(list_of_tensors)``). Optional learned
corrections (docs/method.md#learned-coefficients) add ``phi1_i delta_{i,k}`` to the predictor's and the
corrector's weights, each with ``sum_k delta_{i,k} = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def solve_vandermonde(nodes: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``sum_k rho_k nodes_k^j = rhs_j`` (j = 0..p-1) for every step: nodes, rhs [N, p] -> rho [N, p].

    One batched, differentiable solve without error check (no host synchronisation). Step-major per-sample
    inputs [N, p, B, 1, ...] give rho of that shape.
    """
    nodes, rhs = nodes.movedim(1, -1), rhs.movedim(1, -1)  # [N, ..., p]
    vandermonde = torch.stack([nodes**j for j in range(nodes.shape[-1])], dim=-2)  # [N, ..., j, k] = nodes_k^j
    return torch.linalg.solve_ex(vandermonde, rhs)[0].movedim(-1, 1)


def _past_ratios(lam: Tensor, h: Tensor, k: int) -> Tensor:
    """r_k = (lambda_{i-k} - lambda_i) / h_i for every step i; -k (a finite stand-in) where i < k."""
    r = (shifted(lam[:-1], k) - lam[:-1]) / h
    has_history = (torch.arange(h.shape[0], device=h.device) >= k).reshape(-1, *([1] * (h.ndim - 1)))
    return torch.where(has_history, r, torch.full_like(r, -float(k)))


def _history_weights(phi1: Tensor, b_h: Tensor, rho: Tensor, ratios: Tensor, new_weight: Tensor) -> Tensor:
    """[N, 1 + K] weights of (D_i, D_{i-1}, ..., D_{i-K}) in ``phi1 D_i - B(h) sum_k rho_k (D_{i-k} - D_i) / r_k``
    when the term ``new_weight * (D_new - D_i)`` is added too."""
    past = -b_h[:, None] * rho / ratios
    return torch.cat([(phi1 - past.sum(dim=1) - new_weight)[:, None], past], dim=1)


def unipc_weights(sigmas: Tensor, orders: Iterable[int], variant: str) -> dict[int, tuple[Tensor, Tensor]]:
    """Predictor and corrector weights of UniPC steps of each order in ``orders``, for every step i.

    Returns ``{p: (predictor [N, p], corrector [N, p + 1])}``: weights of (D_i, D_{i-1}, ...) and, for the
    corrector, a last column for the new evaluation D~_{i+1}. Rows of steps without enough history hold
    unused finite values.
    """
    lam = -torch.log(sigmas)
    h = lam[1:] - lam[:-1]
    phi1 = (sigmas[:-1] - sigmas[1:]) / sigmas[:-1]  # 1 - e^{-h}
    hh = -h
    b_h = hh if variant == "bh1" else -phi1  # B(h): -h (bh1) or e^{-h} - 1 (bh2)
    max_order = max(orders)
    # Right-hand sides b_j = j! phi_{j+1}(hh) hh / B(h), with g_j = phi_j(hh) - 1/j! by the phi recursion.
    g, rhs = -phi1 / hh - 1, []
    for j in range(1, max_order + 1):
        rhs.append(g * math.factorial(j) / b_h)
        g = g / hh - 1 / math.factorial(j + 1)
    rhs = torch.stack(rhs, dim=1)
    ones = torch.ones_like(h)[:, None]
    ratios = torch.stack([_past_ratios(lam, h, k) for k in range(1, max_order)] + [ones[:, 0]], dim=1)
    weights = {}
    for p in orders:
        past_ratios = ratios[:, : p - 1]
        if p == 1:  # the simplified choices of the reference implementation for orders 1 and 2
            rho_p, rho_c = past_ratios, 0.5 * ones  # rho_p: [N, 0], no past terms
        elif p == 2:
            rho_p, rho_c = 0.5 * ones, solve_vandermonde(torch.cat([past_ratios, ones], dim=1), rhs[:, :p])
        else:
            rho_p = solve_vandermonde(past_ratios, rhs[:, : p - 1])
            rho_c = solve_vandermonde(torch.cat([past_ratios, ones], dim=1), rhs[:, :p])
        predictor = _history_weights(phi1, b_h, rho_p, past_ratios, torch.zeros_like(h))
        new_weight = -b_h * rho_c[:, -1]
        corrector_history = _history_weights(phi1, b_h, rho_c[:, :-1], past_ratios, new_weight)
        corrector = torch.cat([corrector_history, new_weight[:, None]], dim=1)
        weights[p] = (predictor, corrector)
    return weights



def _corrected_unipc_weights(weights: dict[int, tuple[Tensor, Tensor]], raw: Tensor, orders: list[int],
                             order: int, phi1: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Predictor and corrector weights plus ``phi1 delta`` (zero-sum per step, separately for each)."""
    delta_p = zero_sum_corrections(raw[:, :order], orders)
    delta_c = zero_sum_corrections(raw[:, order:], [p + 1 for p in orders])
    return {p: (corrected_weights(pred, delta_p, phi1), corrected_weights(corr, delta_c, phi1))
            for p, (pred, corr) in weights.items()}


def _unipc(
    variant: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None,
    order: int,
    cond: Any,
    coefficients: Tensor | None,
) -> Tensor:
    name = f"unipc_{variant}"
    sigmas, sigmas_eval = prepare_grids(name, x, sigmas, sigmas_eval, order)
    n_steps = sigmas.shape[0] - 1
    orders = step_orders(n_steps, order, lower_order_final=True)
    weights = unipc_weights(sigmas, set(orders), variant)
    if coefficients is not None:
        raw = prepare_coefficients(name, x, coefficients, coefficient_shape(name, n_steps, order))
        phi1 = (sigmas[:-1] - sigmas[1:]) / sigmas[:-1]
        weights = _corrected_unipc_weights(weights, raw, orders, order, phi1)
    decays = (sigmas[1:] / sigmas[:-1]).unbind()
    evals = sigmas_eval.unbind()
    history = [denoise(denoiser, x, evals[0], cond)]  # D_i, D_{i-1}, ... newest first
    for i, step_order in enumerate(orders):
        predictor, corrector = (w[i].unbind() for w in weights[step_order])
        x_decayed = decays[i] * x
        x_pred = accumulate(x_decayed, predictor, history[:step_order])
        if i == n_steps - 1:  # no corrector on the last step: it would cost an extra evaluation
            return x_pred
        denoised = denoise(denoiser, x_pred, evals[i + 1], cond)
        x = accumulate(x_decayed, corrector, [*history[:step_order], denoised])
        history = [denoised, *history[: order - 1]]
    raise AssertionError("unreachable: the loop returns on its last step")


def unipc_bh1(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 3,
    cond: Any = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """UniPC-p with B(h) = h (bh1, the paper's choice for pixel models); NFE = N.

    UniC on every step but the last; warm start and final steps with lower orders (``lower_order_final``).
    Decoupled timesteps: D_i = D(x_i, sigma'_i); coefficients use sigmas only. ``coefficients``: optional
    [N, 2 order + 1] learned corrections (``ld3.catalog.coefficient_shape``).
    """
    return _unipc("bh1", denoiser, x, sigmas, sigmas_eval, order, cond, coefficients)


def unipc_bh2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sigmas_eval: Tensor | None = None,
    *,
    order: int = 3,
    cond: Any = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """UniPC-p with B(h) = e^h - 1 (bh2, the paper's choice for latent models); NFE = N.

    UniC on every step but the last; warm start and final steps with lower orders (``lower_order_final``).
    Decoupled timesteps: D_i = D(x_i, sigma'_i); coefficients use sigmas only. ``coefficients``: optional
    [N, 2 order + 1] learned corrections (``ld3.catalog.coefficient_shape``).
    """
    return _unipc("bh2", denoiser, x, sigmas, sigmas_eval, order, cond, coefficients)
