"""Common base of the pretrained-network adapters: one call ``D(x, sigma, cond) -> x0_hat`` in EDM form.

Every family (EDM pickles, diffusers pixel/latent models, Stable Diffusion) subclasses
:class:`DenoiserAdapter` and implements ``_denoise``; the base validates the call, applies the memory
options and returns the result in ``x``'s dtype (docs/design.md#the-denoiser-convention).

Memory options (LD3 backpropagates through N network calls):
- ``gradient_checkpointing``: each denoiser call keeps only its inputs for the backward pass and
  recomputes its activations there (``torch.utils.checkpoint``, non-reentrant). Only active while
  autograd records.
- ``autocast_bf16``: the network runs under ``torch.autocast(dtype=bfloat16)`` on ``x``'s device; the
  output is cast back to ``x``'s dtype. Alone it does not save memory: each call keeps its own bf16 copy
  of the weights for the backward pass. Use it with checkpointing, or load bf16 weights instead
  (``torch_dtype=torch.bfloat16`` of the diffusers loaders; inputs and outputs stay float32).

Measured with bench/models_memory.py (random-weight SD v1.x UNet + VAE, CFG, batch 1, 512², Euler,
backward to the latent and the sigmas, H200): peak memory at 6 / 10 steps was fp32 26.8 / 38.3 GiB,
fp32 + checkpointing 9.4 / 9.4, bf16 autocast 29.8 / 43.9, autocast + checkpointing 8.6 / 8.6,
bf16 weights 13.5 / 19.3, bf16 weights + checkpointing 4.8 / 4.8 GiB; checkpointing costs ~1.5-2x time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ld3.schedules import NoiseSchedule


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: LD3 never trains the network, only the time steps."""
    return module.eval().requires_grad_(False)


def classifier_free_guidance(d_uncond: Tensor, d_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``D_u + w (D_c - D_u)`` (Ho & Salimans 2022).

    D is affine in the network's epsilon (or v) output at fixed x and sigma, so combining denoised
    outputs equals the usual combination of noise predictions.
    """
    return d_uncond + scale * (d_cond - d_uncond)


def expand_condition(cond: Tensor, batch: int, name: str = "cond") -> Tensor:
    """Broadcast a single condition (leading dimension 1) to ``batch`` samples; check the batch size."""
    if cond.shape[0] == 1 and batch != 1:
        return cond.expand(batch, *cond.shape[1:])
    if cond.shape[0] != batch:
        raise ValueError(f"{name} must hold one condition per sample ({batch}) or a single one, got {cond.shape[0]}")
    return cond


class DenoiserAdapter(nn.Module):
    """A frozen pretrained network wrapped into the EDM denoiser ``D(x, sigma, cond) -> x0_hat``.

    Attributes:
        schedule: the model's noise schedule (sigma range, native time).
        shape: (C, H, W) of one sample ``x`` the network denoises (the latent for latent models).
        gradient_checkpointing, autocast_bf16: memory options (module docstring).
    """

    #: None for unconditional models, "class" (integer ids [B]) or "text" (embeddings [B, L, D]).
    condition_kind: str | None = None

    def __init__(
        self,
        schedule: NoiseSchedule,
        shape: tuple[int, int, int],
        *,
        gradient_checkpointing: bool = False,
        autocast_bf16: bool = False,
    ):
        super().__init__()
        self.schedule = schedule
        self.shape = tuple(int(d) for d in shape)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.autocast_bf16 = bool(autocast_bf16)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model produces (``shape`` unless the model decodes latents)."""
        return self.shape

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """Denoised estimate E[x0 | x] at EDM noise level ``sigma`` ([B] or a scalar), in ``x``'s dtype."""
        sigma = self._check_call(x, sigma)
        cond = self._check_condition(cond, x)
        return self._with_memory_options(self._denoise, x, sigma, cond).to(x.dtype)

    def _denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        """The family's network call and output conversion (x [B, C, H, W], sigma [B], checked cond)."""
        raise NotImplementedError

    def _check_condition(self, cond: Tensor | None, x: Tensor) -> Tensor | None:
        """Validate ``cond`` for this family; the base accepts only ``None`` (unconditional models)."""
        if cond is not None:
            raise ValueError(
                f"cond was given, but this {type(self).__name__} is unconditional; call it without cond"
            )
        return None

    def _with_memory_options(self, fn, *args: Tensor | None) -> Tensor:
        """Run ``fn(*args)`` under the bf16 autocast and gradient checkpointing options."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._autocast, fn, *args, use_reentrant=False)
        return self._autocast(fn, *args)

    def _autocast(self, fn, *args: Tensor | None) -> Tensor:
        device_type = next(a for a in args if isinstance(a, Tensor)).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return fn(*args)

    def _check_call(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            c, h, w = self.shape
            raise ValueError(
                f"x must have shape [B, {c}, {h}, {w}] for this model, got {tuple(x.shape)}; "
                "draw latents with the adapter's .shape (channels and size are fixed by the network)"
            )
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}] (one per sample), got {tuple(sigma.shape)}")
        return sigma
