"""Time discretisations: fixed baselines and LD3's learnable grid (docs/method.md#discretisations).

A discretisation is a descending sigma tensor ``sigma_0 = sigma_max > ... > sigma_N = sigma_min`` for N
solver steps. Grids are built in a *grid space*: ``"lambda"`` (half log-SNR, ``lambda = -log sigma``) or
``"time"`` (the schedule's native time t; for EDM ``t = sigma``). Endpoints are always set to the exact
``sigma_max`` / ``sigma_min`` values, never recomputed through a round trip.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ld3.catalog import DISCRETIZATION_NAMES, check_discretization_name, matching_registry
from ld3.schedules import NoiseSchedule

GridSpace = Literal["lambda", "time"]
GRID_SPACES: tuple[str, ...] = ("lambda", "time")
# Smallest step of the learnable grid, as a multiple of the dtype's machine epsilon times the grid's
# length: below anything a sensible schedule uses, large enough that neighbouring points stay distinct
# after conversion to sigma (so the grid is strictly decreasing for *any* parameter values).
_MIN_STEP_EPS_MULTIPLE = 64
_ENDPOINT_RTOL = 1e-6


def _check_n_steps(n_steps: int) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1 (the number of solver steps), got {n_steps!r}")
    return int(n_steps)


def _check_schedule(schedule: NoiseSchedule) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a NoiseSchedule (see ld3.schedules.get_schedule), got {type(schedule).__name__}"
        )


def sigma_range(
    schedule: NoiseSchedule, sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[float, float]:
    """Validated ``(sigma_min, sigma_max)``, each defaulting to the schedule's own end of the range."""
    _check_schedule(schedule)
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"need finite 0 < sigma_min < sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}")
    schedule.check_sigmas(torch.tensor([lo], dtype=torch.float64), "sigma_min")
    schedule.check_sigmas(torch.tensor([hi], dtype=torch.float64), "sigma_max")
    return lo, hi


def validate_sigmas(sigmas: Tensor, name: str = "sigmas", *, length: int | None = None) -> Tensor:
    """Check that ``sigmas`` is a 1-D, finite, positive, strictly decreasing tensor (of ``length`` if given)."""
    if not isinstance(sigmas, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if length is not None and sigmas.numel() != length:
        raise ValueError(f"{name} must have length n_steps + 1 = {length}, got {sigmas.numel()}")
    s = sigmas.detach()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{name} must be finite and positive, got {s.tolist()}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing (sigma_max first, sigma_min last), got {s.tolist()}")
    return sigmas


def _check_space(space: str, name: str = "space") -> None:
    if space not in GRID_SPACES:
        raise ValueError(f"{name} must be one of {GRID_SPACES} (the space the grid lives in), got {space!r}")


def to_grid_space(sigmas: Tensor, schedule: NoiseSchedule, space: GridSpace) -> Tensor:
    """sigma -> grid coordinate: ``lambda = -log sigma`` or native time ``t(sigma)``."""
    _check_space(space)
    return -torch.log(sigmas) if space == "lambda" else schedule.t_from_sigma(sigmas)


def from_grid_space(grid: Tensor, schedule: NoiseSchedule, space: GridSpace) -> Tensor:
    """Grid coordinate -> sigma (inverse of :func:`to_grid_space`)."""
    _check_space(space)
    return torch.exp(-grid) if space == "lambda" else schedule.sigma(grid)


def _pin_endpoints(sigmas: Tensor, sigma_max: float, sigma_min: float) -> Tensor:
    """Replace the first/last entries by the exact range ends (no gradient flows to fixed endpoints).

    The ends are filled on the device (``new_full``), not copied from the host: a host-to-device copy would
    make every forward wait for the GPU's queue (see ``ld3.train``: one host sync per step)."""
    return torch.cat([sigmas.new_full((1,), sigma_max), sigmas[1:-1], sigmas.new_full((1,), sigma_min)])


def _grid_ends(schedule: NoiseSchedule, space: GridSpace, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Grid coordinates of ``(sigma_max, sigma_min)``, in float64."""
    ends = to_grid_space(torch.tensor([sigma_max, sigma_min], dtype=torch.float64), schedule, space)
    return float(ends[0]), float(ends[1])


def _sigmas_at_fractions(
    fractions: Tensor, schedule: NoiseSchedule, space: GridSpace, sigma_min: float, sigma_max: float
) -> Tensor:
    """sigma at ``fractions`` u (0 at sigma_max, 1 at sigma_min) of the way along the grid space."""
    start, end = _grid_ends(schedule, space, sigma_min, sigma_max)
    grid = start + fractions * (end - start)
    return _pin_endpoints(from_grid_space(grid, schedule, space), sigma_max, sigma_min)


def _step_fractions(n_steps: int) -> Tensor:
    return torch.arange(n_steps + 1, dtype=torch.float64) / n_steps


def time_uniform(
    n_steps: int, schedule: NoiseSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Uniform in the schedule's native time t (DDIM's "uniform"; for EDM uniform in sigma)."""
    n_steps = _check_n_steps(n_steps)
    lo, hi = sigma_range(schedule, sigma_min, sigma_max)
    return _sigmas_at_fractions(_step_fractions(n_steps), schedule, "time", lo, hi)


def time_quadratic(
    n_steps: int, schedule: NoiseSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """DDIM's quadratic steps ``t_i = t_min + (t_max - t_min) (i/N)^2``, dense at the small-noise end."""
    n_steps = _check_n_steps(n_steps)
    lo, hi = sigma_range(schedule, sigma_min, sigma_max)
    from_small_end = _step_fractions(n_steps).flip(0)  # i/N for the entry at sigma_i, sigma descending
    return _sigmas_at_fractions(1.0 - from_small_end**2, schedule, "time", lo, hi)


def logsnr_uniform(
    n_steps: int, schedule: NoiseSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Uniform in half log-SNR lambda = -log sigma (DPM-Solver's "logSNR" steps)."""
    n_steps = _check_n_steps(n_steps)
    lo, hi = sigma_range(schedule, sigma_min, sigma_max)
    return _sigmas_at_fractions(_step_fractions(n_steps), schedule, "lambda", lo, hi)


def edm_rho(
    n_steps: int,
    schedule: NoiseSchedule,
    rho: float = 7.0,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """EDM's polynomial steps (Karras et al. 2022, eq. 5).

    ``sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    n_steps = _check_n_steps(n_steps)
    lo, hi = sigma_range(schedule, sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0 (EDM uses 7), got {rho!r}")
    inv_rho = 1.0 / float(rho)
    sigmas = (hi**inv_rho + _step_fractions(n_steps) * (lo**inv_rho - hi**inv_rho)) ** float(rho)
    return _pin_endpoints(sigmas, hi, lo)


Baseline = Callable[..., Tensor]
BASELINES: dict[str, Baseline] = matching_registry("fixed discretisations", DISCRETIZATION_NAMES, {
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "logsnr_uniform": logsnr_uniform,
    "edm_rho": edm_rho,
})


def get_baseline(name: str) -> Baseline:
    """The fixed discretisation called ``name`` (``ld3.catalog.DISCRETIZATION_NAMES`` lists them)."""
    return BASELINES[check_discretization_name(name)]


def _min_step_fraction(dtype: torch.dtype) -> float:
    return _MIN_STEP_EPS_MULTIPLE * torch.finfo(dtype).eps


class LearnableDiscretization(nn.Module):
    """LD3's learnable time steps (docs/method.md#the-learnable-discretisation).

    Parameters ``xi`` (N+1, init ones) and ``xi_c`` (N+1, init zeros). The grid fractions are
    ``u = cumsum(softmax(xi))`` min-max normalised to [0, 1]; the grid is ``s = start + u (end - start)``
    in lambda or native time, ``sigma = exp(-lambda)`` or ``schedule.sigma(t)``. Decoupled evaluation
    points ``s'_i = s_i + clamp(xi_c_i, -w, w)``, ``w = win_rate * min_i |s_{i+1} - s_i|`` on the
    detached grid, endpoints fixed.

    Numerical details, none changing the method: (1) the normalised cumsum equals
    ``[0, cumsum(softmax(xi[1:]))] / sum`` (``xi_0`` cancels), computed that way to avoid cancellation;
    (2) each step weight is floored at ``64 * eps(dtype)`` (reached only when some xi_i lies ~10 below the rest), so the
    grid stays strictly decreasing in floating point for any parameter values; (3) see :meth:`grid`
    for accuracy at both ends.
    """

    def __init__(
        self,
        n_steps: int,
        schedule: NoiseSchedule,
        mode: GridSpace = "lambda",
        decoupled: bool = True,
        win_rate: float = 0.5,
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.n_steps = _check_n_steps(n_steps)
        self.sigma_min, self.sigma_max = sigma_range(schedule, sigma_min, sigma_max)
        _check_space(mode, "mode")
        if not isinstance(decoupled, bool):
            raise ValueError(f"decoupled must be True or False, got {decoupled!r}")
        if isinstance(win_rate, bool) or not isinstance(win_rate, numbers.Real) or not 0.0 <= win_rate <= 0.5:
            raise ValueError(
                f"win_rate must be a number in [0, 0.5], got {win_rate!r}: each evaluation point moves at most "
                "win_rate times the smallest grid step, so above 0.5 neighbouring evaluation points could cross "
                "and be evaluated out of order"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if self.n_steps * _min_step_fraction(dtype) >= 0.5:
            raise ValueError(f"n_steps={self.n_steps} is too many steps for a {dtype} grid; use torch.float64")
        self.schedule = schedule
        self.mode: GridSpace = mode
        self.decoupled = decoupled
        self.win_rate = float(win_rate)
        self._grid_start, self._grid_end = _grid_ends(schedule, mode, self.sigma_min, self.sigma_max)
        self.xi = nn.Parameter(torch.ones(self.n_steps + 1, dtype=dtype, device=device))
        self.xi_c = nn.Parameter(torch.zeros(self.n_steps + 1, dtype=dtype, device=device))

    @classmethod
    def from_prior(
        cls,
        sigmas_prior: Tensor,
        schedule: NoiseSchedule,
        mode: GridSpace = "lambda",
        decoupled: bool = True,
        win_rate: float = 0.5,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LearnableDiscretization:
        """A module over the prior's own sigma range, initialised to reproduce ``sigmas_prior``."""
        validate_sigmas(sigmas_prior, "sigmas_prior")
        module = cls(
            sigmas_prior.numel() - 1,
            schedule,
            mode,
            decoupled,
            win_rate,
            sigma_min=float(sigmas_prior[-1]),
            sigma_max=float(sigmas_prior[0]),
            dtype=dtype,
            device=device,
        )
        return module.fit_to(sigmas_prior)

    def grid(self) -> Tensor:
        """Time steps s_i in the grid space (lambda ascending, or native time descending).

        ``s_i = start + u_i (end - start)`` with u the normalised cumsum of the steps. Near the far end
        the same point is computed as ``end - (1 - u_i) (end - start)`` from a reverse cumsum, so both
        ends keep the dtype's relative precision (matters in float32 time mode, where t = sigma).
        """
        weights = torch.softmax(self.xi[1:], dim=0)
        steps = weights.clamp_min(_min_step_fraction(weights.dtype))
        total = steps.sum()
        zero = steps.new_zeros(1)
        done = torch.cat([zero, torch.cumsum(steps, dim=0)]) / total  # u_i
        left = torch.cat([torch.cumsum(steps.flip(0), dim=0).flip(0), zero]) / total  # 1 - u_i
        span = self._grid_end - self._grid_start
        return torch.where(done <= 0.5, self._grid_start + done * span, self._grid_end - left * span)

    def eval_window(self, grid: Tensor) -> Tensor:
        """The decoupling window ``w = win_rate * min_i |s_{i+1} - s_i|`` of the detached grid."""
        return self.win_rate * grid.detach().diff().abs().min()

    def eval_offsets(self, grid: Tensor) -> Tensor:
        """Decoupled shifts ``clamp(xi_c, -w, w)`` (``eval_window``), endpoints zero."""
        window = self.eval_window(grid)
        offsets = torch.clamp(self.xi_c, -window, window)
        return torch.cat([offsets.new_zeros(1), offsets[1:-1], offsets.new_zeros(1)])

    def _to_sigmas(self, grid: Tensor) -> Tensor:
        return _pin_endpoints(from_grid_space(grid, self.schedule, self.mode), self.sigma_max, self.sigma_min)

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(sigmas, sigmas_eval)``: step grid and denoiser evaluation points, descending, in xi's dtype."""
        grid = self.grid()
        sigmas = self._to_sigmas(grid)
        if not self.decoupled:
            return sigmas, sigmas
        return sigmas, self._to_sigmas(grid + self.eval_offsets(grid))

    @torch.no_grad()
    def fit_to(self, sigmas_prior: Tensor) -> LearnableDiscretization:
        """Set ``xi`` so the grid reproduces ``sigmas_prior`` (and ``xi_c = 0``, so sigmas_eval does too).

        Closed form: for i >= 1 the normalised step ``u_i - u_{i-1}`` is proportional to
        ``softmax(xi)_i`` (``xi_0`` cancels), so ``xi_i = log(step_i)`` up to a constant. The constant
        is chosen so that mean(xi) = 1, which makes a uniform prior give exactly the initial all-ones xi.
        """
        prior = self._check_prior(sigmas_prior)
        grid = to_grid_space(prior, self.schedule, self.mode)
        steps = ((grid - self._grid_start) / (self._grid_end - self._grid_start)).diff()
        steps = steps / steps.sum()
        floor = _min_step_fraction(self.xi.dtype)
        if bool((steps < floor).any()):
            i = int(steps.argmin())
            raise ValueError(
                f"sigmas_prior has a step ({i} -> {i + 1}) of {float(steps[i]):.3g} of the {self.mode} range, "
                f"below the smallest step a {self.xi.dtype} grid represents ({floor:.3g}); "
                "use dtype=torch.float64 or merge the steps"
            )
        logits = torch.log(steps)
        logits = logits - logits.mean() + 1.0
        self.xi.copy_(torch.cat([logits.new_ones(1), logits]))
        self.xi_c.zero_()
        return self

    def _check_prior(self, sigmas_prior: Tensor) -> Tensor:
        validate_sigmas(sigmas_prior, "sigmas_prior", length=self.n_steps + 1)
        prior = sigmas_prior.detach().to(device="cpu", dtype=torch.float64)
        for index, expected, label in ((0, self.sigma_max, "sigma_max"), (-1, self.sigma_min, "sigma_min")):
            if not math.isclose(float(prior[index]), expected, rel_tol=_ENDPOINT_RTOL):
                raise ValueError(
                    f"sigmas_prior[{index}] = {float(prior[index]):.8g} must equal this grid's "
                    f"{label} = {expected:.8g}; build the module with matching sigma_min/sigma_max or use LearnableDiscretization.from_prior"
                )
        return prior

    def extra_repr(self) -> str:
        return (
            f"n_steps={self.n_steps}, mode={self.mode!r}, decoupled={self.decoupled}, win_rate={self.win_rate:g}, "
            f"sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}], schedule={type(self.schedule).__name__}, "
            f"dtype={self.xi.dtype}"
        )

    def describe(self, digits: int = 4) -> str:
        """Multi-line summary for logs: the settings and the current sigmas (and sigmas_eval if decoupled)."""
        with torch.no_grad():
            sigmas, sigmas_eval = self()
        fmt = lambda values: "[" + ", ".join(f"{v:.{digits}g}" for v in values.tolist()) + "]"  # noqa: E731
        lines = [f"{type(self).__name__}({self.extra_repr()})", f"  sigmas      = {fmt(sigmas)}"]
        if self.decoupled:
            lines.append(f"  sigmas_eval = {fmt(sigmas_eval)}")
        return "\n".join(lines)
