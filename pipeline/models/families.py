"""The paper's model families as pipeline builders (docs/design.md, the denoiser convention).

Registered families (``ModelSpec.family``), each a builder ``builder(*, device, dtype, **kwargs)``:

- ``"edm"``: an EDM network pickle (``edm-*.pkl`` / ``network-snapshot-*.pkl``); class ids as conditions
  for class-conditional networks. WARNING: a pickle runs code when loaded; load only trusted files.
- ``"diffusers_pixel"``: a pixel-space diffusers pipeline folder (``unet/`` UNet2DModel + ``scheduler/``).
- ``"diffusers_latent"``: a latent diffusers pipeline folder (UNet2DModel or DiT + VQ/KL autoencoder);
  ``decode`` maps latents to images; class-conditional networks take class ids and ``guidance_scale``.
- ``"stable_diffusion"``: a Stable Diffusion v1.x pipeline folder or single checkpoint file; conditions
  are prompt texts (the teacher cache stores the text), embedded by the CLIP text encoder on use.

Builder options shared by all families: ``checkpoint`` (local path), the memory options
``gradient_checkpointing`` and ``autocast_bf16`` (ld3.models.base), and for the diffusers families
``weights_dtype`` ("bfloat16"/"float16" loads half-precision weights; None keeps float32). ``dtype`` is
the dtype of the solver state: the adapters return ``D`` in the input's dtype, weights keep theirs.

The embedded models (``"gmm"``, ``"digits"``) register in pipeline.models.registry; the specs of checkpoint
files, with their digests, are made by pipeline.models.checkpoints.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from ld3.checkpoint_sources import WEIGHTS_DTYPE_NAMES
from ld3.models.base import DenoiserAdapter
from ld3.models.diffusers_models import (
    load_latent_diffusion,
    load_pixel_diffusion,
)
from ld3.models.edm import load_edm_denoiser
from ld3.models.stable_diffusion import (
    StableDiffusionDenoiser,
    load_stable_diffusion,
)
from pipeline.models import smoke  # noqa: F401 - registers the tiny EDM networks as safe to unpickle
from pipeline.models.registry import (
    ConditionValue,
    LoadedModel,
    register_model_builder,
)

log = logging.getLogger(__name__)

WEIGHTS_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WEIGHTS_DTYPE_NAMES}


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _weights_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return WEIGHTS_DTYPES[name]
    except KeyError:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)} or None, got {name!r}") from None


def _loaded(denoiser: DenoiserAdapter, device: torch.device, *, latent: bool = False, encode_condition=None) -> LoadedModel:
    """The adapter moved to ``device`` (in place) as the pipeline's LoadedModel."""
    denoiser.to(device)
    extra = {} if encode_condition is None else {"encode_condition": encode_condition}
    return LoadedModel(denoiser=denoiser, schedule=denoiser.schedule, shape=denoiser.shape,
                       decode=denoiser.decode if latent else None, **extra)


def build_edm(
    *, device: torch.device, dtype: torch.dtype, checkpoint: str, key: str = "ema", sigma_min: float = 0.002,
    sigma_max: float = 80.0, gradient_checkpointing: bool = False, autocast_bf16: bool = False,
) -> LoadedModel:
    """An EDM network pickle (WARNING: runs code stored in the file; load only trusted files)."""
    denoiser = load_edm_denoiser(checkpoint, key=key, sigma_min=sigma_min, sigma_max=sigma_max,
                                 gradient_checkpointing=gradient_checkpointing, autocast_bf16=autocast_bf16)
    return _loaded(denoiser, device)


def build_diffusers_pixel(
    *, device: torch.device, dtype: torch.dtype, checkpoint: str, guidance_scale: float = 1.0,
    null_class: int | None = None, weights_dtype: str | None = None, gradient_checkpointing: bool = False,
    autocast_bf16: bool = False,
) -> LoadedModel:
    """A pixel-space diffusers pipeline folder (UNet2DModel + scheduler config)."""
    denoiser = load_pixel_diffusion(checkpoint, torch_dtype=_weights_dtype(weights_dtype), guidance_scale=guidance_scale,
                                    null_class=null_class, gradient_checkpointing=gradient_checkpointing,
                                    autocast_bf16=autocast_bf16)
    return _loaded(denoiser, device)


def build_diffusers_latent(
    *, device: torch.device, dtype: torch.dtype, checkpoint: str, guidance_scale: float = 1.0,
    null_class: int | None = None, latent_scaling_factor: float | None = None, weights_dtype: str | None = None,
    gradient_checkpointing: bool = False, autocast_bf16: bool = False,
) -> LoadedModel:
    """A latent diffusers pipeline folder (UNet2DModel/DiT + VQModel/AutoencoderKL); ``decode`` to images."""
    denoiser = load_latent_diffusion(checkpoint, torch_dtype=_weights_dtype(weights_dtype), guidance_scale=guidance_scale,
                                     null_class=null_class, latent_scaling_factor=latent_scaling_factor,
                                     gradient_checkpointing=gradient_checkpointing, autocast_bf16=autocast_bf16)
    return _loaded(denoiser, device, latent=True)


def _embed_prompts(denoiser: StableDiffusionDenoiser, prompts: Sequence[ConditionValue],
                   device: torch.device | str) -> torch.Tensor:
    """Condition encoder of Stable Diffusion: prompt texts -> CLIP embeddings [P, L, D] on ``device``."""
    return denoiser.encode_prompts(prompts).to(device)


def build_stable_diffusion(
    *, device: torch.device, dtype: torch.dtype, checkpoint: str, guidance_scale: float = 7.5, negative_prompt: str = "",
    single_file_config: str | None = None, weights_dtype: str | None = None, gradient_checkpointing: bool = False,
    autocast_bf16: bool = False,
) -> LoadedModel:
    """Stable Diffusion v1.x (pipeline folder or single file); conditions are prompt texts."""
    denoiser = load_stable_diffusion(checkpoint, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                     single_file_config=single_file_config, torch_dtype=_weights_dtype(weights_dtype),
                                     gradient_checkpointing=gradient_checkpointing, autocast_bf16=autocast_bf16)
    return _loaded(denoiser, device, latent=True, encode_condition=functools.partial(_embed_prompts, denoiser))


FAMILY_BUILDERS = {
    "edm": build_edm,
    "diffusers_pixel": build_diffusers_pixel,
    "diffusers_latent": build_diffusers_latent,
    "stable_diffusion": build_stable_diffusion,
}
for _family, _builder in FAMILY_BUILDERS.items():
    register_model_builder(_family, _builder)
