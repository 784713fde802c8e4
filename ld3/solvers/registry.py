"""Solver registry by name, and the number of denoiser calls (NFE) a solver spends on a grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adams_bashforth import IPNDM_ORDERS, ipndm, ipndm_coefficient_slots
from .base import Solver, check_order
from .dpmpp_multistep import DPMPP_ORDERS, dpmpp, dpmpp_coefficient_slots
from .singlestep import DPM_SOLVER_2_ORDERS, EULER_ORDERS, HEUN_ORDERS, dpm_solver_2, euler, heun
from .unipc import UNIPC_ORDERS, unipc_bh1, unipc_bh2, unipc_coefficient_slots


@dataclass(frozen=True)
class SolverSpec:
    """What the registry knows about a solver: its function, its orders, its denoiser calls per step, and
    how many learnable coefficient corrections it takes per step at a given order (None: it takes none)."""

    fn: Solver
    orders: tuple[int, ...]
    calls_per_step: int
    coefficient_slots: Callable[[int], int] | None = None


SOLVER_SPECS: dict[str, SolverSpec] = {
    "euler": SolverSpec(euler, EULER_ORDERS, 1),
    "heun": SolverSpec(heun, HEUN_ORDERS, 2),
    "dpm_solver_2": SolverSpec(dpm_solver_2, DPM_SOLVER_2_ORDERS, 2),
    "dpmpp": SolverSpec(dpmpp, DPMPP_ORDERS, 1, dpmpp_coefficient_slots),
    "unipc_bh1": SolverSpec(unipc_bh1, UNIPC_ORDERS, 1, unipc_coefficient_slots),
    "unipc_bh2": SolverSpec(unipc_bh2, UNIPC_ORDERS, 1, unipc_coefficient_slots),
    "ipndm": SolverSpec(ipndm, IPNDM_ORDERS, 1, ipndm_coefficient_slots),
}
SOLVERS: dict[str, Solver] = {name: spec.fn for name, spec in SOLVER_SPECS.items()}


def get_spec(name: str) -> SolverSpec:
    """The registry entry of solver ``name``; ValueError listing the valid names otherwise."""
    try:
        return SOLVER_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVER_SPECS)}") from None


def get_solver(name: str) -> Solver:
    """The solver function registered as ``name``."""
    return get_spec(name).fn


def nfe(name: str, n_steps: int, order: int | None = None) -> int:
    """Denoiser calls solver ``name`` spends on a grid of ``n_steps`` steps (``order`` is only validated:
    the multistep solvers reuse evaluations, so no order changes the count)."""
    spec = get_spec(name)
    if order is not None:
        check_order(name, order, spec.orders)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    return spec.calls_per_step * n_steps


def solver_steps_for_nfe(name: str, nfe: int) -> int:
    """Grid steps N on which solver ``name`` spends exactly ``nfe`` denoiser calls (inverse of ``nfe``)."""
    calls = get_spec(name).calls_per_step
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < calls or nfe % calls:
        raise ValueError(
            f"nfe={nfe!r} is impossible for {name}: it spends {calls} denoiser call(s) per step, "
            f"so nfe must be a positive multiple of {calls}"
        )
    return nfe // calls


def coefficient_shape(name: str, n_steps: int, order: int) -> tuple[int, int]:
    """Shape ``(N, slots)`` of solver ``name``'s learned coefficient corrections (docs/method.md#learned-coefficients)."""
    spec = get_spec(name)
    check_order(name, order, spec.orders)
    if spec.coefficient_slots is None:
        learnable = sorted(n for n, s in SOLVER_SPECS.items() if s.coefficient_slots is not None)
        raise ValueError(f"solver {name!r} has no learnable coefficients; use one of {learnable} "
                         "or learn_coefficients=False")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    return n_steps, spec.coefficient_slots(order)
