"""Noise schedules, all mapped to the EDM form used by every solver (docs/method.md#edm-form).

A schedule relates a model's *native time* ``t`` to its signal level ``alpha(t)`` and noise level
``sigma_vp(t)`` (``x_t = alpha x_0 + sigma_vp eps``). The solvers only see the EDM noise level
``sigma(t) = sigma_vp / alpha`` and the half log-SNR ``lambda(t) = -log sigma(t)``.

Every method is vectorised, differentiable and works in the dtype of its input (float32/float64).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _as_tensor(value: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(value, dtype=dtype, device=device)


class NoiseSchedule(ABC):
    """A diffusion noise schedule on native time ``t`` in ``[t_min, t_max]``, with sigma increasing in t."""

    name: str = "schedule"
    t_min: float
    t_max: float

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """log of the signal coefficient alpha(t)."""

    @abstractmethod
    def t_from_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of ``lambda(t)``: native time at half log-SNR ``lam``."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def sigma_vp(self, t: Tensor) -> Tensor:
        """VP noise coefficient sqrt(1 - alpha^2) (for EDM/VE schedules: sigma itself, alpha = 1)."""
        t = _as_tensor(t)
        return self.alpha(t) * self.sigma(t)

    def sigma(self, t: Tensor) -> Tensor:
        """EDM-form noise level sigma_vp / alpha = sqrt(exp(-2 log alpha) - 1)."""
        return torch.sqrt(torch.expm1(-2.0 * self.log_alpha(_as_tensor(t))))

    def lambda_(self, t: Tensor) -> Tensor:
        """Half log-SNR lambda = log(alpha / sigma_vp) = -log sigma_edm."""
        return -torch.log(self.sigma(t))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Native time at EDM noise level ``sigma``."""
        return self.t_from_lambda(-torch.log(_as_tensor(sigma)))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def check_sigmas(self, sigmas: Tensor, name: str = "sigmas", rtol: float = 1e-4) -> None:
        """Raise ValueError if any sigma is NaN/inf or lies outside ``[sigma_min, sigma_max]`` (relative tolerance)."""
        lo, hi = self.sigma_min * (1 - rtol), self.sigma_max * (1 + rtol)
        s = torch.as_tensor(sigmas).detach()
        if not bool(torch.isfinite(s).all()):
            shown = s.tolist() if s.numel() <= 16 else f"tensor of shape {tuple(s.shape)}"
            raise ValueError(f"{name} contains NaN or inf values: {shown}")
        if bool(((s < lo) | (s > hi)).any()):
            raise ValueError(
                f"{name} has values outside the {self.name} schedule's range "
                f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}]: min {float(s.min()):.6g}, max {float(s.max()):.6g}; "
                "clip the grid to the schedule's sigma_min/sigma_max"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t in [{self.t_min:g}, {self.t_max:g}], sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"


class EDMSchedule(NoiseSchedule):
    """EDM / VE schedule: alpha = 1, native time is sigma itself (Karras et al. 2022)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t).clone()

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma_vp(self, t: Tensor) -> Tensor:
        return self.sigma(t)

    def lambda_(self, t: Tensor) -> Tensor:
        return -torch.log(_as_tensor(t))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-_as_tensor(lam))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return _as_tensor(sigma).clone()


class VPLinearSchedule(NoiseSchedule):
    """Continuous VP with linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [eps, 1] (Song et al. 2021)."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < t_min < t_max <= 1:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # Solve (b1-b0)/4 t^2 + b0/2 t = -log_alpha with log_alpha = -0.5 log(1 + exp(-2 lam)).
        lam = _as_tensor(lam)
        neg_log_alpha = 0.5 * torch.nn.functional.softplus(-2.0 * lam)
        a, b = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0
        # Stable root of a t^2 + b t - c = 0: t = 2c / (b + sqrt(b^2 + 4ac)).
        return 2.0 * neg_log_alpha / (b + torch.sqrt(b * b + 4.0 * a * neg_log_alpha))


class VPCosineSchedule(NoiseSchedule):
    """Improved-DDPM cosine schedule alpha(t) = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)) (Nichol & Dhariwal 2021).

    With ``a = pi/2 (t+s)/(1+s)`` and ``a0 = a(0)``, ``sigma^2 = sin(a-a0) sin(a+a0) / cos(a)^2``: written
    with these products (no ``1 - cos`` cancellation) sigma and its inverse keep full float32 accuracy.
    """

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        if not s >= 0:
            raise ValueError(f"s must be >= 0 (the cosine offset), got s={s}")
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.s, self.t_min, self.t_max = float(s), float(t_min), float(t_max)
        self._scale = math.pi / 2 / (1 + self.s)  # a = scale (t + s)
        self._log_alpha_0 = math.log(math.cos(self._scale * self.s))

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return torch.log(torch.sin(self._scale * (1 - t))) - self._log_alpha_0  # cos(a) = sin(pi/2 - a)

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        k = self._scale
        return torch.sqrt(torch.sin(k * t) * torch.sin(k * (t + 2 * self.s))) / torch.sin(k * (1 - t))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # tan(a)^2 = sigma^2 / cos(a0)^2 + tan(a0)^2, and tan(a - a0) = (tan a - tan a0) / (1 + tan a tan a0)
        # with tan a - tan a0 = (sigma / cos a0)^2 / (tan a + tan a0): every term positive, no cancellation.
        lam = _as_tensor(lam)
        a0 = self._scale * self.s
        ratio_sq = torch.exp(-2.0 * lam) / math.cos(a0) ** 2
        tan_a0 = math.tan(a0)
        tan_a = torch.sqrt(ratio_sq + tan_a0**2)
        return torch.atan2(ratio_sq, (tan_a + tan_a0) * (1 + tan_a * tan_a0)) / self._scale


class VPDiscreteSchedule(NoiseSchedule):
    """Discrete-time VP (DDPM, LDM, Stable Diffusion) from ``betas`` or ``alphas_cumprod``.

    Native time is the (continuous) training-step index ``t in [0, T-1]`` used by diffusers; between
    integer steps lambda is interpolated linearly, so ``t_from_lambda`` is its exact inverse and
    ``sigma(k)`` equals ``sqrt((1 - alphas_cumprod[k]) / alphas_cumprod[k])`` at every integer k.
    """

    name = "vp_discrete"

    def __init__(self, *, betas: Tensor | None = None, alphas_cumprod: Tensor | None = None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64)
            if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        if not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1) and decrease strictly")
        self.alphas_cumprod = ac
        self.lambdas = 0.5 * (torch.log(ac) - torch.log1p(-ac))  # decreasing in t
        self.t_min, self.t_max = 0.0, float(ac.numel() - 1)
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # lambdas per (device, dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": {}}  # device copies are a cache: never pickled

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000) -> VPDiscreteSchedule:
        """DDPM's linear betas (Ho et al. 2020)."""
        return cls(betas=torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000) -> VPDiscreteSchedule:
        """Latent diffusion / Stable Diffusion's "scaled_linear" betas (linear in sqrt(beta))."""
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls(betas=b)

    def _table(self, like: Tensor) -> Tensor:
        """The lambda table on ``like``'s device and dtype, copied there once (no host transfer per call)."""
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = self.lambdas.to(dtype=like.dtype, device=like.device)
        return self._tables[key]

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        lam = self._table(t)
        tc = t.clamp(self.t_min, self.t_max)
        k = tc.detach().floor().long().clamp(max=lam.numel() - 2)
        frac = tc - k.to(tc.dtype)
        return lam[k] + frac * (lam[k + 1] - lam[k])

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * torch.nn.functional.softplus(-2.0 * self.lambda_(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.exp(-self.lambda_(t))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        table = self._table(lam)
        rev = table.flip(0)  # increasing
        lam_c = torch.clamp(lam, rev[0], rev[-1])  # tensor bounds: no host sync on accelerators
        j = torch.searchsorted(rev, lam_c.detach().contiguous(), right=True).clamp(1, rev.numel() - 1)
        lo, hi = rev[j - 1], rev[j]
        frac = (lam_c - lo) / (hi - lo)
        # rev index j-1 corresponds to t = T-1-(j-1); moving towards rev[j] decreases t by 1.
        return (rev.numel() - j).to(lam.dtype) - frac


SCHEDULES = {
    "edm": EDMSchedule,
    "vp_linear": VPLinearSchedule,
    "vp_cosine": VPCosineSchedule,
    "vp_discrete_linear": VPDiscreteSchedule.linear,
    "vp_discrete_scaled_linear": VPDiscreteSchedule.scaled_linear,
}


def get_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name (``SCHEDULES`` lists them)."""
    try:
        factory = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return factory(**kwargs)
