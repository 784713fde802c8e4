"""Stable Diffusion v1.x (text-conditional latent diffusion) as an LD3 denoiser, and prompt files.

The denoiser is :class:`~ld3.models.diffusers_models.DiffusersDenoiser` on the UNet2DConditionModel with
classifier-free guidance (scale 7.5 by default) whose unconditional branch is the negative prompt
(empty by default), exactly as ``StableDiffusionPipeline`` combines the two noise predictions. Prompts
are embedded once with the CLIP text encoder (:meth:`StableDiffusionDenoiser.encode_prompts`); the
resulting tensor [P, 77, 768] is the ``cond`` of the denoiser and is indexed/batched like any tensor.
Latents are 4×64×64 for 512² images; :meth:`decode` maps them to images in [-1, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ld3.checkpoint_sources import SD_EXAMPLE_REPO
from ld3.models.base import freeze
from ld3.models.diffusers_models import (
    DiffusersDenoiser,
    load_component,
    pipeline_components,
    prediction_type_of,
    read_scheduler_config,
    resolve_pretrained_folder,
    schedule_from_scheduler_config,
)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_SD_COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                  "text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}


def encode_text(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str]) -> Tensor:
    """CLIP embeddings [P, L, D] of prompts, padded/truncated to the tokenizer's length, as SD pipelines do."""
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if use_mask else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


class StableDiffusionDenoiser(DiffusersDenoiser):
    """Stable Diffusion v1.x: text-conditional ``D(x, sigma, cond)`` with classifier-free guidance.

    ``cond`` is a tensor of prompt embeddings [B, L, D] from :meth:`encode_prompts` (one per sample, or a
    single one for all). The unconditional branch uses ``negative_prompt`` ("" by default).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        *,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        **memory_options: bool,
    ):
        if type(unet).__name__ != "UNet2DConditionModel":
            raise ValueError(f"Stable Diffusion needs a UNet2DConditionModel, got {type(unet).__name__}")
        text_encoder = freeze(text_encoder)
        super().__init__(
            unet, schedule_from_scheduler_config(scheduler_config), prediction_type_of(scheduler_config),
            autoencoder=vae, guidance_scale=guidance_scale,
            unconditional=encode_text(tokenizer, text_encoder, [negative_prompt]), **memory_options,
        )
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.negative_prompt = negative_prompt

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompt embeddings [P, L, D] (no gradient), the ``cond`` of this denoiser; compute them once."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a sequence of strings (use [prompt] for a single prompt)")
        return encode_text(self.tokenizer, self.text_encoder, prompts)


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    single_file_config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    **memory_options: bool,
) -> StableDiffusionDenoiser:
    """Stable Diffusion v1.x from a diffusers pipeline folder (or cached repo id) or a single checkpoint file.

    A single ``.safetensors``/``.ckpt`` file (original CompVis layout) is converted by diffusers'
    ``from_single_file``; it needs the diffusers component configs, from ``single_file_config`` (a local
    SD v1.x pipeline folder or a cached repo id; default: ``SD_EXAMPLE_REPO`` from the local cache).
    Nothing is downloaded. Note: ``.ckpt`` files are pickles and run code when loaded; prefer safetensors.
    """
    options = dict(guidance_scale=guidance_scale, negative_prompt=negative_prompt, **memory_options)
    file = Path(path).expanduser()
    if file.is_file():
        return StableDiffusionDenoiser(**_single_file_components(file, single_file_config, torch_dtype), **options)
    folder = resolve_pretrained_folder(path, "Stable Diffusion pipeline folder", SD_EXAMPLE_REPO)
    components = pipeline_components(folder)
    for role, allowed in _SD_COMPONENTS.items():
        if components.get(role) not in allowed:
            found = ", ".join(f"{k}: {v}" for k, v in components.items()) or "no components"
            raise ValueError(f"{folder} is not a Stable Diffusion v1.x pipeline: {role!r} must be one of {allowed}; found {found}")
    models = {role: load_component(folder, role, components[role], torch_dtype) for role in ("unet", "vae", "text_encoder")}
    tokenizer = load_component(folder, "tokenizer", components["tokenizer"])
    return StableDiffusionDenoiser(**models, tokenizer=tokenizer, scheduler_config=read_scheduler_config(folder), **options)


def _single_file_components(file: Path, config: str | os.PathLike | None, torch_dtype: torch.dtype | None) -> dict[str, Any]:
    if file.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{file} is not a Stable Diffusion checkpoint file: expected one of {SINGLE_FILE_SUFFIXES} or a pipeline folder")
    from diffusers import StableDiffusionPipeline

    config = str(config) if config is not None else SD_EXAMPLE_REPO
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(file), config=config, local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, torch_dtype=torch_dtype,
        )
    except Exception as error:  # noqa: BLE001 - diffusers raises many types; all mean "cannot convert offline"
        raise ValueError(
            f"could not build Stable Diffusion v1.x from the single file {file} with configs from {config!r}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; pass single_file_config= a local "
            "SD v1.x pipeline folder (or a repo id in the Hugging Face cache), or convert the file to a pipeline folder"
        ) from error
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                scheduler_config=dict(pipe.scheduler.config))


# ---- prompts -------------------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike, *, one_per_image: bool = True) -> list[str]:
    """Prompts from an MS-COCO captions JSON (``captions_*.json``) or a text file (one prompt per line).

    COCO: captions in file order; with ``one_per_image`` only the first caption of each image (the usual
    COCO-30k protocol draws one caption per image). Text: non-empty lines, stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path.name!r} not found at {path.resolve()}; give an MS-COCO captions JSON "
            "(e.g. annotations/captions_val2014.json from https://cocodataset.org) or a text file with one prompt per line"
        )
    if path.suffix == ".json":
        prompts = _coco_captions(path, one_per_image)
    elif path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"prompt file {path} must be an MS-COCO captions .json or a .txt file with one prompt per line")
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _coco_captions(path: Path, one_per_image: bool) -> list[str]:
    expected = 'an MS-COCO captions JSON: {"annotations": [{"image_id": ..., "caption": "..."}, ...]}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"prompt file {path} is not valid JSON ({error}); expected {expected}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(
        isinstance(a, dict) and isinstance(a.get("caption"), str) for a in annotations
    ):
        raise ValueError(f"prompt file {path} is not {expected}")
    seen: set[Any] = set()
    captions = []
    for annotation in annotations:
        image = annotation.get("image_id")
        if one_per_image and image in seen:
            continue
        seen.add(image)
        captions.append(annotation["caption"].strip())
    return captions
