"""Denoiser adapters: every model family as ``D(x, sigma, cond=None) -> x0_hat`` in EDM form.

Importing this package loads neither diffusers nor transformers (the loaders import them on use).
WARNING: EDM pickles (and .ckpt files) run code when loaded; load only trusted files.
"""

from ld3.models.base import DenoiserAdapter, classifier_free_guidance
from ld3.models.diffusers_models import (
    DiffusersDenoiser,
    load_latent_diffusion,
    load_pixel_diffusion,
    schedule_from_scheduler_config,
    x0_from_prediction,
)
from ld3.models.edm import EDMDenoiser, EmbeddedCodeError, load_edm_denoiser, load_edm_network
from ld3.models.gmm import GaussianMixture, default_gmm
from ld3.models.stable_diffusion import StableDiffusionDenoiser, load_prompts, load_stable_diffusion

__all__ = [
    "DenoiserAdapter",
    "DiffusersDenoiser",
    "EDMDenoiser",
    "EmbeddedCodeError",
    "GaussianMixture",
    "StableDiffusionDenoiser",
    "classifier_free_guidance",
    "default_gmm",
    "load_edm_denoiser",
    "load_edm_network",
    "load_latent_diffusion",
    "load_pixel_diffusion",
    "load_prompts",
    "load_stable_diffusion",
    "schedule_from_scheduler_config",
    "x0_from_prediction",
]
