"""Baseline schedules from the literature beside the four fixed grids: GITS, DMN and AYS.

- **GITS** (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", arXiv 2405.11326,
  Sec. 4): a teacher trajectory on a fine grid; the cost of jumping from fine point i to j is the distance
  of one Euler step from the teacher's state at i to the teacher's state at j, averaged over a few
  trajectories; dynamic programming picks the N-step sub-grid of least (weighted) total cost. Model-dependent.
- **DMN** (Xue et al. 2024, "Accelerating Diffusion Sampling with Optimized Time Steps", arXiv 2402.17376,
  CVPR 2024, the "DM-NonUniform" method): the half log-SNR steps that minimise a data-free bound on the
  local errors of a third-order multistep data-prediction solver. The objective follows the authors'
  reference implementation (``step_optim.py`` of scxue/DM-NonUniform); the paper's own equations could not be
  read here, only its abstract (which names the same problem and the constrained trust-region solver).
  Depends only on the sigma range.
- **AYS** (Sabour et al. 2024, "Align Your Steps", arXiv 2404.14507): NVIDIA's published 10-step sigma lists
  for the models they optimised (SD 1.5, SDXL, Stable Video Diffusion), log-linearly interpolated to
  other step counts as the authors recommend. Only for those models; elsewhere unavailable, never invented.

Every function returns a descending float64 sigma grid with the schedule's exact ``sigma_max`` / ``sigma_min``
at the ends, like :mod:`ld3.discretizations`. :func:`named_grid` builds any baseline by name (also LD3's
``init_prior``); :func:`cell_baselines` builds the whole set of a study cell and times each one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ld3.catalog import AYS_PREFIX, AYS_SIGMAS, DMN, GITS, check_baseline_name
from ld3.discretizations import (
    BASELINES,
    _check_n_steps,
    _pin_endpoints,
    logsnr_uniform,
    sigma_range,
    time_uniform,
)
from ld3.schedules import NoiseSchedule
from ld3.solvers import Denoiser, ipndm

# ---------------------------------------------------------------------------------------------
# AYS: published lists
# ---------------------------------------------------------------------------------------------
# NVIDIA's published lists: ld3.catalog.AYS_SIGMAS (their names are plain data there).
# Model families (pipeline ``ModelSpec.family``) whose networks an AYS list was optimised for; this project's
# "stable_diffusion" family loads Stable Diffusion v1.x only.
AYS_MODEL_OF_FAMILY: dict[str, str] = {"stable_diffusion": "sd15"}
# The published values have 3 decimals (700.00 / 54.5 for SVD): their ends may differ from the exact range by that.
_AYS_END_ATOL = 5e-4
_AYS_END_RTOL = 1e-3


def ays(n_steps: int, schedule: NoiseSchedule, model: str) -> Tensor:
    """AYS grid of ``model`` (a key of :data:`AYS_SIGMAS`) with ``n_steps`` steps.

    The published 10-step list is interpolated linearly in log sigma over the step index (the authors'
    ``loglinear_interp``); the ends are set to the schedule's exact range after checking that the published
    ends are that range up to their rounding (otherwise the list was made for another model: ValueError).
    """
    n_steps = _check_n_steps(n_steps)
    if model not in AYS_SIGMAS:
        raise ValueError(f"no published AYS schedule for {model!r}; AYS lists exist for {sorted(AYS_SIGMAS)}")
    published = torch.tensor(AYS_SIGMAS[model], dtype=torch.float64)
    lo, hi = sigma_range(schedule)
    for value, exact, label in ((float(published[0]), hi, "sigma_max"), (float(published[-1]), lo, "sigma_min")):
        if not math.isclose(value, exact, rel_tol=_AYS_END_RTOL, abs_tol=_AYS_END_ATOL):
            raise ValueError(
                f"the AYS {model} list has {label} = {value:g}, but this schedule's {label} is {exact:.6g}: "
                f"the list was optimised for another model; use it only with {model}"
            )
    log_published = published.log()
    position = torch.linspace(0, log_published.numel() - 1, n_steps + 1, dtype=torch.float64)
    left = position.floor().long().clamp(max=log_published.numel() - 2)
    frac = position - left
    log_sigmas = log_published[left] + frac * (log_published[left + 1] - log_published[left])
    return _pin_endpoints(log_sigmas.exp(), hi, lo)


# ---------------------------------------------------------------------------------------------
# DMN: optimised half log-SNR steps (data-free)
# ---------------------------------------------------------------------------------------------
_DMN_TRUNCATION_MAX_STEPS = 7  # the paper's code: "for NFEs <= 7, truncNum = 3; for NFEs > 7, truncNum = 0"


def _phi_integrals(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``H0 = e^h - 1``, ``H1 = h e^h - H0``, ``H2 = h^2 e^h - 2 H1`` (integrals of the exponential integrator)."""
    h0 = torch.expm1(h)
    h1 = h * torch.exp(h) - h0
    h2 = h * h * torch.exp(h) - 2 * h1
    return h0, h1, h2


def dmn_objective(lambdas: Tensor, data_error_power: float = 2.0, truncation: int | None = None) -> Tensor:
    """DMN's error bound of the grid ``lambdas`` (half log-SNR, increasing, N + 1 values incl. both ends).

    Step s (lambda_s -> lambda_{s+1}) interpolates the data predictions with a Lagrange polynomial through
    the last k points (k = 1 at the first and last step, 2 next to them, 3 elsewhere); ``J`` are the
    integrals of e^lambda times the Lagrange basis, weighted by the data-prediction error scale
    ``e_n = sigma_n^p / alpha_n`` (VP sigma and alpha). Steps ``s < truncation`` add the Euclidean norm of
    their own terms; later steps add their terms per data point, and the sum of absolute values of those
    per-point totals is added at the end. ``truncation`` defaults to 3 for N <= 7 steps and 0 above.
    """
    n = lambdas.numel() - 1
    trunc = (3 if n <= _DMN_TRUNCATION_MAX_STEPS else 0) if truncation is None else truncation
    h = lambdas.diff()
    e_lam = lambdas.exp()
    alpha = torch.rsqrt(1 + torch.exp(-2 * lambdas))
    sigma = torch.rsqrt(1 + torch.exp(2 * lambdas))
    err = sigma**data_error_power / alpha
    h0, h1, h2 = _phi_integrals(h)
    total = lambdas.new_zeros(())
    per_point = [lambdas.new_zeros(()) for _ in range(n + 1)]
    for s in range(n):
        if s in (0, n - 1):
            total = total + ((e_lam[s + 1] - e_lam[s]) * err[s]).abs()
            continue
        if s in (1, n - 2):
            m = s - 1
            j = (-e_lam[m + 1] * h1[m + 1] / h[m],
                 e_lam[m + 1] * (h1[m + 1] + h[m] * h0[m + 1]) / h[m])
        else:
            m = s - 2
            a, b, c = h[m], h[m + 1], m + 2
            j = (e_lam[c] * (h2[c] + b * h1[c]) / (a * (a + b)),
                 -e_lam[c] * (h2[c] + (a + b) * h1[c]) / (a * b),
                 e_lam[c] * (h2[c] + (2 * b + a) * h1[c] + b * (a + b) * h0[c]) / (b * (a + b)))
        terms = [err[m + k] * j[k] for k in range(len(j))]
        if s >= trunc:
            for k, term in enumerate(terms):
                per_point[m + k] = per_point[m + k] + term
        else:
            total = total + torch.sqrt(sum(t * t for t in terms))
    return total + sum(p.abs() for p in per_point)


def _lambdas_from_logits(logits: Tensor, start: float, end: float) -> Tensor:
    """Increasing lambdas from ``start`` to ``end`` whose steps are proportional to ``softmax(logits)``."""
    fractions = torch.cumsum(torch.softmax(logits, dim=0), dim=0)
    return torch.cat([logits.new_tensor([start]), start + (end - start) * fractions[:-1], logits.new_tensor([end])])


def dmn(n_steps: int, schedule: NoiseSchedule, *, latent: bool = False, max_iter: int = 500) -> Tensor:
    """DMN's optimised grid (Xue et al. 2024) for ``n_steps`` steps of ``schedule``'s full range.

    The authors' recipe: pixel models start from logSNR-uniform steps with error scale sigma/alpha; latent
    models (``latent=True``) from time-uniform steps with sigma^2/alpha. The bound is minimised over the
    interior lambdas with L-BFGS on softmax step logits (which keeps them ordered inside the range; the
    reference uses scipy's trust-constr with linear constraints: the same problem).
    """
    n_steps = _check_n_steps(n_steps)
    lo, hi = sigma_range(schedule)
    init = (time_uniform if latent else logsnr_uniform)(n_steps, schedule)
    if n_steps == 1:
        return init
    start, end = -math.log(hi), -math.log(lo)
    power = 2.0 if latent else 1.0
    logits = torch.log(torch.diff(-init.log())).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = dmn_objective(_lambdas_from_logits(logits, start, end), power)
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        lambdas = _lambdas_from_logits(logits, start, end)
        if not bool(dmn_objective(lambdas, power) <= dmn_objective(-init.log(), power)):
            return init  # the optimiser never makes the bound worse than its start
    return _pin_endpoints(torch.exp(-lambdas.detach()), hi, lo)


# ---------------------------------------------------------------------------------------------
# GITS: dynamic programming on a teacher trajectory
# ---------------------------------------------------------------------------------------------
GitsMetric = Literal["l2", "dev"]


@dataclass(frozen=True)
class GITSConfig:
    """GITS settings; defaults are the reference's (``--num_steps_tea=61 --coeff=1.15``, iPNDM-4 teacher).

    The reference's default metric is "dev" (deviation from the trajectory's start-end line); "l2" is the
    Euclidean distance to the teacher's state, the paper's plain cost.
    """

    fine_steps: int = 60  # steps of the teacher's fine grid (61 time points)
    fine_grid: str = "edm_rho"  # ld3.discretizations baseline the fine grid follows (the reference: EDM rho=7)
    teacher_order: int = 4  # iPNDM order of the teacher solve on the fine grid
    coeff: float = 1.15  # DP weight: V_k(j) = min_i C(j, i) + coeff * V_{k-1}(i)
    metric: GitsMetric = "dev"
    num_samples: int = 16  # trajectories averaged in the cost (the reference: 256)

    def __post_init__(self) -> None:
        if self.fine_grid not in BASELINES:
            raise ValueError(f"GITSConfig.fine_grid must be one of {sorted(BASELINES)}, got {self.fine_grid!r}")
        if self.metric not in ("l2", "dev"):
            raise ValueError(f"GITSConfig.metric must be 'l2' or 'dev', got {self.metric!r}")
        if not (isinstance(self.fine_steps, int) and self.fine_steps >= 1):
            raise ValueError(f"GITSConfig.fine_steps must be an integer >= 1, got {self.fine_steps!r}")
        if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
            raise ValueError(f"GITSConfig.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if not (math.isfinite(self.coeff) and self.coeff > 0):
            raise ValueError(f"GITSConfig.coeff must be a finite number > 0, got {self.coeff!r}")


class _TrajectoryRecorder:
    """Wraps a denoiser; keeps every input state and the denoiser's output (a solve's trajectory)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.states: list[Tensor] = []
        self.denoised: list[Tensor] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        out = self.denoiser(x, sigma, cond)
        self.states.append(x.detach())
        self.denoised.append(out.detach())
        return out


@torch.no_grad()
def teacher_trajectory(denoiser: Denoiser, sigmas: Tensor, z: Tensor, cond: Any = None,
                       order: int = 4) -> tuple[Tensor, Tensor]:
    """States ``x_i`` at every point of ``sigmas`` ([M+1, B, ...]) and the Euler directions
    ``d_i = (x_i - D(x_i)) / sigma_i`` at the first M ([M, B, ...]) of an iPNDM solve from ``sigmas[0] z``."""
    recorder = _TrajectoryRecorder(denoiser)
    grid = sigmas.to(device=z.device, dtype=z.dtype)
    final = ipndm(recorder, grid[0] * z, grid, order=order, cond=cond)
    states = torch.stack([*recorder.states, final])
    directions = (states[:-1] - torch.stack(recorder.denoised)) / grid[:-1].reshape(-1, *[1] * z.ndim)
    return states, directions


def _deviation(points: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Per-sample distance of ``points`` [..., B, D] from the line through ``start`` and ``end`` [B, D]."""
    unit = (end - start) / torch.linalg.vector_norm(end - start, dim=-1, keepdim=True)
    to_end = end - points
    return torch.linalg.vector_norm(to_end - (to_end * unit).sum(-1, keepdim=True) * unit, dim=-1)


def gits_cost_matrix(states: Tensor, directions: Tensor, sigmas: Tensor, metric: GitsMetric = "l2") -> Tensor:
    """C[i, j] (i < j): batch mean of the error of one Euler step from teacher state i to sigma_j.

    "l2": ``||x_i + (sigma_j - sigma_i) d_i - x_j||``; "dev": the step's distance from the line through the
    trajectory's start and end minus the teacher's at j (the reference's default). Entries with i >= j are inf.
    """
    m = states.shape[0] - 1
    x = states.flatten(2).to(torch.float64)  # [M+1, B, D]
    d = directions.flatten(2).to(torch.float64)
    s = sigmas.to(torch.float64).to(x.device)
    cost = torch.full((m + 1, m + 1), math.inf, dtype=torch.float64)
    teacher_dev = _deviation(x, x[0], x[-1]).mean(-1)  # [M+1]
    for i in range(m):
        steps = x[i] + (s[i + 1:] - s[i]).reshape(-1, 1, 1) * d[i]  # [M-i, B, D]: to every later point
        if metric == "l2":
            cost[i, i + 1:] = torch.linalg.vector_norm(steps - x[i + 1:], dim=-1).mean(-1).cpu()
        else:
            cost[i, i + 1:] = (_deviation(steps, x[0], x[-1]).mean(-1) - teacher_dev[i + 1:]).cpu()
    return cost


def gits_dynamic_programming(cost: Tensor, n_steps: int, coeff: float = 1.15) -> list[int]:
    """Indices ``0 = k_0 < ... < k_N = M`` of the fine grid minimising
    ``V_N(0)`` with ``V_1(j) = C(j, M)`` and ``V_k(j) = min_{j<i<M} C(j, i) + coeff V_{k-1}(i)`` (GITS' DP)."""
    m = cost.shape[0] - 1
    if n_steps > m:
        raise ValueError(f"GITS needs at least n_steps = {n_steps} fine steps, the fine grid has {m}")
    value = cost[:, m].clone()  # V_1
    choices: list[Tensor] = []
    for _ in range(2, n_steps + 1):
        candidates = cost[:, :m] + coeff * value[None, :m]  # [j, i], inf where i <= j
        value, best = candidates.min(dim=1)
        choices.append(best)
    path, j = [0], 0
    for best in reversed(choices):
        j = int(best[j])
        path.append(j)
    return [*path, m]


def gits(denoiser: Denoiser, n_steps: int, schedule: NoiseSchedule, z: Tensor, cond: Any = None,
         config: GITSConfig = GITSConfig()) -> Tensor:
    """GITS grid (Chen et al. 2024): the DP's sub-grid of the fine grid, from the teacher trajectories of the
    first ``config.num_samples`` latents ``z`` (with their conditions ``cond``)."""
    n_steps = _check_n_steps(n_steps)
    fine = BASELINES[config.fine_grid](config.fine_steps, schedule)
    rows = slice(0, min(config.num_samples, z.shape[0]))
    states, directions = teacher_trajectory(denoiser, fine, z[rows], None if cond is None else cond[rows],
                                            config.teacher_order)
    cost = gits_cost_matrix(states, directions, fine, config.metric)
    return fine[gits_dynamic_programming(cost, n_steps, config.coeff)]


# ---------------------------------------------------------------------------------------------
# Every baseline by name; the set of a study cell
# ---------------------------------------------------------------------------------------------
def named_grid(name: str, n_steps: int, schedule: NoiseSchedule, *, denoiser: Denoiser | None = None,
               z: Tensor | None = None, cond: Any = None, latent: bool = False,
               gits_config: GITSConfig = GITSConfig()) -> Tensor:
    """The baseline grid called ``name``: a fixed grid, ``"dmn"``, ``"ays_<model>"`` or ``"gits"`` (which needs
    the ``denoiser`` and latents ``z``; ``latent`` picks DMN's latent-model recipe)."""
    check_baseline_name(name)
    if name in BASELINES:
        return BASELINES[name](n_steps, schedule)
    if name == DMN:
        return dmn(n_steps, schedule, latent=latent)
    if name.startswith(AYS_PREFIX):
        return ays(n_steps, schedule, name[len(AYS_PREFIX):])
    if denoiser is None or z is None:
        raise ValueError("the GITS baseline needs the model: pass denoiser= and latents z= (a few teacher solves)")
    return gits(denoiser, n_steps, schedule, z, cond, gits_config)


def study_baseline_names(ays_model: str | None = None) -> list[str]:
    """The baseline set of a study cell (what :func:`cell_baselines` builds and the evaluation stage scores): the
    fixed grids, DMN, GITS and the AYS list of ``ays_model`` (None: no published list, so no AYS baseline)."""
    return [*BASELINES, DMN, GITS] + ([] if ays_model is None else [AYS_PREFIX + ays_model])


@dataclass(frozen=True)
class TimedGrid:
    """A baseline grid and the wall time its construction took (the schedule's compute cost)."""

    sigmas: Tensor
    cost_s: float


def cell_baselines(n_steps: int, schedule: NoiseSchedule, denoiser: Denoiser, z: Tensor, cond: Any = None, *,
                   latent: bool = False, ays_model: str | None = None,
                   gits_config: GITSConfig = GITSConfig()) -> dict[str, TimedGrid]:
    """Every baseline available for one study cell, timed: the fixed grids, DMN, GITS (from ``z``) and the AYS
    list of ``ays_model`` (None: the model has no published AYS schedule, so there is none)."""
    grids = {}
    for name in study_baseline_names(ays_model):
        started = time.perf_counter()
        sigmas = named_grid(name, n_steps, schedule, denoiser=denoiser, z=z, cond=cond, latent=latent,
                            gits_config=gits_config)
        grids[name] = TimedGrid(sigmas, time.perf_counter() - started)
    return grids
