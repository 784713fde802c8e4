"""Differentiable ODE solvers in EDM form: ``solver(denoiser, x, sigmas, sigmas_eval=None, *, order, cond=None)``.

Pure functions, differentiable in ``x``, ``sigmas`` and ``sigmas_eval`` (the caller decides ``no_grad``); the
multistep ones (``SolverSpec.coefficient_slots``, ``ld3.catalog.SOLVER_TABLE``) also take ``coefficients=`` learned corrections, differentiably.
"""

from ld3.catalog import coefficient_shape, nfe, solver_steps_for_nfe

from .adams_bashforth import ipndm
from .base import Denoiser, Solver
from .dpmpp_multistep import dpmpp
from .registry import SOLVER_SPECS, SOLVERS, SolverSpec, get_solver
from .singlestep import dpm_solver_2, euler, heun
from .unipc import unipc_bh1, unipc_bh2

__all__ = [
    "SOLVERS",
    "SOLVER_SPECS",
    "Denoiser",
    "Solver",
    "SolverSpec",
    "coefficient_shape",
    "dpm_solver_2",
    "dpmpp",
    "euler",
    "get_solver",
    "heun",
    "ipndm",
    "nfe",
    "solver_steps_for_nfe",
    "unipc_bh1",
    "unipc_bh2",
]
