"""Solver registry by name: each solver's function beside its entry of ``ld3.catalog.SOLVER_TABLE`` (its orders,
denoiser calls per step and learnable coefficients); the NFE arithmetic lives in ``ld3.catalog``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ld3.catalog import SOLVER_TABLE, matching_registry, solver_info

from .adams_bashforth import ipndm
from .base import Solver
from .dpmpp_multistep import dpmpp
from .singlestep import dpm_solver_2, euler, heun
from .unipc import unipc_bh1, unipc_bh2


@dataclass(frozen=True)
class SolverSpec:
    """What the registry knows about a solver: its function, its orders, its denoiser calls per step, and
    how many learnable coefficient corrections it takes per step at a given order (None: it takes none)."""

    fn: Solver
    orders: tuple[int, ...]
    calls_per_step: int
    coefficient_slots: Callable[[int], int] | None = None


_FUNCTIONS = matching_registry("solvers", tuple(SOLVER_TABLE), {
    "euler": euler, "heun": heun, "dpm_solver_2": dpm_solver_2, "dpmpp": dpmpp,
    "unipc_bh1": unipc_bh1, "unipc_bh2": unipc_bh2, "ipndm": ipndm,
})
SOLVER_SPECS: dict[str, SolverSpec] = {
    name: SolverSpec(fn, info.orders, info.calls_per_step,
                     None if info.coefficient_slots is None else info.coefficient_slots.__getitem__)
    for (name, fn), info in zip(_FUNCTIONS.items(), SOLVER_TABLE.values())
}
SOLVERS: dict[str, Solver] = {name: spec.fn for name, spec in SOLVER_SPECS.items()}


def get_spec(name: str) -> SolverSpec:
    """The registry entry of solver ``name``; ValueError listing the valid names otherwise."""
    solver_info(name)
    return SOLVER_SPECS[name]


def get_solver(name: str) -> Solver:
    """The solver function registered as ``name``."""
    return get_spec(name).fn
