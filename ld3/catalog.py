"""The names LD3's configs accept, as plain data: losses, fixed discretisations, baselines and solvers.

This is the one home of each list. It imports only the standard library, so a config (``ld3.config.LD3Config``,
the pipeline's study configs) validates its names without loading torch; the torch-side registries
(``ld3.losses``, ``ld3.discretizations.BASELINES``, ``ld3.solvers.SOLVER_SPECS``) are built against these
lists with :func:`matching_registry`, which refuses an implementation missing from them or one they lack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Losses (ld3.losses) and fixed discretisations (ld3.discretizations)
# ---------------------------------------------------------------------------------------------
PIXEL_LOSS_NAMES = ("l2", "l1")  # per-sample distances over pixels
LOSS_NAMES = (*PIXEL_LOSS_NAMES, "lpips")
DISCRETIZATION_NAMES = ("time_uniform", "time_quadratic", "logsnr_uniform", "edm_rho")

# ---------------------------------------------------------------------------------------------
# Baselines from the literature (ld3.baselines)
# ---------------------------------------------------------------------------------------------
GITS, DMN = "gits", "dmn"
AYS_PREFIX = "ays_"
# NVIDIA's published 10-step Align-Your-Steps lists (sigma_max first; the last entry is the model's sigma_min, which
# diffusers' AysSchedules replaces by 0.0 for its own samplers).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
LITERATURE_BASELINES = (GITS, DMN, *(AYS_PREFIX + model for model in AYS_SIGMAS))
BASELINE_NAMES = (*DISCRETIZATION_NAMES, *LITERATURE_BASELINES)


def check_baseline_name(name: Any) -> str:
    """``name`` if it names a baseline of :data:`BASELINE_NAMES`, else a ValueError listing them."""
    if not isinstance(name, str) or name not in BASELINE_NAMES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINE_NAMES)}")
    return name


def check_discretization_name(name: Any) -> str:
    """``name`` if it names a fixed discretisation of :data:`DISCRETIZATION_NAMES`, else a ValueError listing them."""
    if not isinstance(name, str) or name not in DISCRETIZATION_NAMES:
        raise ValueError(f"unknown baseline discretisation {name!r}; choose one of {sorted(DISCRETIZATION_NAMES)}")
    return name


# ---------------------------------------------------------------------------------------------
# Solvers (ld3.solvers)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverInfo:
    """What a solver is, without its code: its orders, its denoiser calls per step, and how many learnable
    coefficient corrections a step takes at each order (None: none; docs/method.md#learned-coefficients)."""

    orders: tuple[int, ...]
    calls_per_step: int
    coefficient_slots: Mapping[int, int] | None = None


SOLVER_TABLE: dict[str, SolverInfo] = {
    "euler": SolverInfo((1,), 1),
    "heun": SolverInfo((2,), 2),
    "dpm_solver_2": SolverInfo((2,), 2),
    # multistep: one correction per stored D (the first p are used at order p)
    "dpmpp": SolverInfo((1, 2, 3), 1, {order: order for order in (1, 2, 3)}),
    # UniPC: ``order`` for the predictor's D_i, D_{i-1}, ..., then ``order + 1`` for the corrector's (the same and
    # D~_{i+1}); an order-p step uses the first p and p + 1 of each
    "unipc_bh1": SolverInfo((1, 2, 3), 1, {order: 2 * order + 1 for order in (1, 2, 3)}),
    "unipc_bh2": SolverInfo((1, 2, 3), 1, {order: 2 * order + 1 for order in (1, 2, 3)}),
    # iPNDM: one correction per eps in the step's history (the first p are used at order p)
    "ipndm": SolverInfo((1, 2, 3, 4), 1, {order: order for order in (1, 2, 3, 4)}),
}


def solver_info(name: str) -> SolverInfo:
    """The table entry of solver ``name``; ValueError listing the valid names otherwise."""
    try:
        return SOLVER_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVER_TABLE)}") from None


def check_order(solver: str, order: int) -> None:
    """Raise ValueError unless ``order`` is one of solver ``solver``'s orders."""
    supported = solver_info(solver).orders
    if isinstance(order, bool) or not isinstance(order, int) or order not in supported:
        raise ValueError(f"order={order!r} is not supported by {solver}; choose one of {supported}")


def _check_n_steps(n_steps: Any) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")


def nfe(name: str, n_steps: int, order: int | None = None) -> int:
    """Denoiser calls solver ``name`` spends on a grid of ``n_steps`` steps (``order`` is only validated:
    the multistep solvers reuse evaluations, so no order changes the count)."""
    info = solver_info(name)
    if order is not None:
        check_order(name, order)
    _check_n_steps(n_steps)
    return info.calls_per_step * n_steps


def solver_steps_for_nfe(name: str, nfe: int) -> int:
    """Grid steps N on which solver ``name`` spends exactly ``nfe`` denoiser calls (inverse of ``nfe``)."""
    calls = solver_info(name).calls_per_step
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < calls or nfe % calls:
        raise ValueError(
            f"nfe={nfe!r} is impossible for {name}: it spends {calls} denoiser call(s) per step, "
            f"so nfe must be a positive multiple of {calls}"
        )
    return nfe // calls


def coefficient_shape(name: str, n_steps: int, order: int) -> tuple[int, int]:
    """Shape ``(N, slots)`` of solver ``name``'s learned coefficient corrections (docs/method.md#learned-coefficients)."""
    info = solver_info(name)
    check_order(name, order)
    if info.coefficient_slots is None:
        learnable = sorted(n for n, s in SOLVER_TABLE.items() if s.coefficient_slots is not None)
        raise ValueError(f"solver {name!r} has no learnable coefficients; use one of {learnable} "
                         "or learn_coefficients=False")
    _check_n_steps(n_steps)
    return n_steps, info.coefficient_slots[order]


# ---------------------------------------------------------------------------------------------
# Implementations checked against the names
# ---------------------------------------------------------------------------------------------
def matching_registry(what: str, names: tuple[str, ...], implementations: Mapping[str, T]) -> dict[str, T]:
    """``implementations`` in the order of ``names``, if it implements exactly those names; a ValueError naming the
    difference otherwise (a torch-side registry may neither add a name to this catalog nor lack one)."""
    missing, extra = sorted(set(names) - set(implementations)), sorted(set(implementations) - set(names))
    if missing or extra:
        raise ValueError(f"the {what} implemented ({sorted(implementations)}) differ from ld3.catalog's "
                         f"(missing {missing}, not in the catalog {extra}); add the name to ld3/catalog.py")
    return {name: implementations[name] for name in names}
