"""The digits model as ``D(x, σ, cond)``: EDM preconditioning around :class:`~ld3.digits.networks.DigitsUNet`.

D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ), label) with c_skip = σ_d²/(σ² + σ_d²),
c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ (Karras et al. 2022, Table 1 and eq. 7).
Class ids condition it; with ``guidance_scale`` w ≠ 1 the output is D_∅ + w (D_c - D_∅), the null label
giving D_∅ (classifier-free guidance). The unconditional variant always uses the null label.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ld3.digits.checkpoint import build_network
from ld3.digits.data import SHAPE
from ld3.digits.networks import DigitsUNet
from ld3.digits.shipped import DENOISER_FILE, SHIPPED, shipped_path
from ld3.models.base import DenoiserAdapter, classifier_free_guidance, expand_condition
from ld3.schedules import EDMSchedule

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1), each shaped like ``sigma``."""
    total = sigma.square() + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


class DigitsDenoiser(DenoiserAdapter):
    """The shipped (or a retrained) digits UNet wrapped into ``D(x, σ, cond)`` (module docstring)."""

    def __init__(self, net: DigitsUNet, sigma_data: float, *, conditional: bool = True, guidance_scale: float = 1.0,
                 digest: str = "", **memory_options: bool):
        super().__init__(EDMSchedule(SIGMA_MIN, SIGMA_MAX), SHAPE, **memory_options)
        if guidance_scale != 1.0 and not conditional:
            raise ValueError("guidance_scale needs the class-conditional variant (conditional=True)")
        self.net, self.sigma_data = net, float(sigma_data)
        self.n_classes, self.guidance_scale, self.digest = net.n_classes, float(guidance_scale), digest
        self.condition_kind = "class" if conditional else None

    def _check_condition(self, cond: Tensor | None, x: Tensor) -> Tensor | None:
        if self.condition_kind is None or cond is None:
            return super()._check_condition(cond, x)
        cond = expand_condition(torch.as_tensor(cond, device=x.device).long().reshape(-1), x.shape[0])
        if bool(((cond < 0) | (cond >= self.n_classes)).any()):
            raise ValueError(f"class ids must lie in [0, {self.n_classes}), got {cond.tolist()}")
        return cond

    def _network_d(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = (c.to(torch.float32) for c in edm_preconditioning(sigma.double(), self.sigma_data))
        f = self.net(x.float() * c_in[:, None, None, None], c_noise, labels)
        return c_skip[:, None, None, None] * x.float() + c_out[:, None, None, None] * f

    def _denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        null = torch.full((x.shape[0],), self.n_classes, dtype=torch.long, device=x.device)
        if cond is None:
            return self._network_d(x, sigma, null)
        if self.guidance_scale == 1.0:
            return self._network_d(x, sigma, cond)
        both = self._network_d(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, cond]))
        d_uncond, d_cond = both.chunk(2)
        return classifier_free_guidance(d_uncond, d_cond, self.guidance_scale)


def load_digits_denoiser(path: str | Path | None = None, *, conditional: bool = True, guidance_scale: float = 1.0,
                         device: torch.device | str = "cpu", **memory_options: bool) -> DigitsDenoiser:
    """The shipped denoiser (``path=None``: digest-checked) or a retrained file of your own."""
    expected = SHIPPED[DENOISER_FILE] if path is None else None
    net, config, digest = build_network(path or shipped_path(DENOISER_FILE), expected, "denoiser")
    return DigitsDenoiser(net, config["sigma_data"], conditional=conditional, guidance_scale=guidance_scale,
                          digest=digest, **memory_options).to(device)
