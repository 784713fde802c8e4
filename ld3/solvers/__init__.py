"""Differentiable ODE solvers in EDM form: ``solver(denoiser, x, sigmas, sigmas_eval=None, *, order, cond=None)``.

Pure functions, differentiable in ``x``, ``sigmas`` and ``sigmas_eval`` (the caller decides ``no_grad``); the
multistep ones (``SolverSpec.coefficient_slots``) also take ``coefficients=`` learned corrections, differentiably.
"""

from .adams_bashforth import ipndm
from .base import Denoiser, Solver
from .dpmpp_multistep import dpmpp
from .registry import SOLVER_SPECS, SOLVERS, SolverSpec, coefficient_shape, get_solver, nfe, solver_steps_for_nfe
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
