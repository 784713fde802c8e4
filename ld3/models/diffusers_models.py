"""diffusers models (discrete-time VP: DDPM, latent diffusion, DiT, Stable Diffusion) as LD3 denoisers.

A diffusers network predicts epsilon, v or x0 from the VP state ``x_vp = alpha x0 + sigma_vp eps`` at a
training timestep ``t``. In EDM form (docs/method.md#edm-form) with ``sigma = sigma_vp / alpha`` and
``alpha = 1 / sqrt(1 + sigma^2)``, the adapter computes

    x_vp = alpha * x,   t = schedule.t_from_sigma(sigma),   D(x, sigma) = x0 from the prediction:
    epsilon: D = x - sigma * eps;   v: D = alpha^2 x - sigma alpha v;   sample: D = prediction.

Timesteps are *continuous* (not rounded to integers): diffusers' sinusoidal timestep embeddings accept
real t, the denoiser is then exactly the model diffusers' own schedulers evaluate at integer t (and,
like EulerDiscreteScheduler with custom sigmas, at real t between them, lambda interpolated linearly),
and D stays differentiable in sigma, which LD3's decoupled evaluation points ``sigmas_eval`` need.

The noise schedule is built in float64 from the scheduler config (:func:`schedule_from_scheduler_config`);
diffusers computes the same table in float32 (relative differences up to ~1e-4 at the smallest sigmas).

Classifier-free guidance batches the conditional and the unconditional branch into one network call and
combines the predictions ``u + w (c - u)`` (identical to combining denoised outputs; see
:func:`ld3.models.base.classifier_free_guidance`).

Models load from a local pipeline folder as written by ``pipeline.save_pretrained(folder)`` (one
subfolder per component: ``unet``/``transformer``, ``scheduler``, ``vae``/``vqvae``, ...) or from a
Hugging Face repo id that is already in the local cache. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ld3.losses import MissingWeightsError
from ld3.models.base import DenoiserAdapter, classifier_free_guidance, expand_condition, freeze
from ld3.schedules import VPDiscreteSchedule

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NETWORK_COMPONENTS = ("unet", "transformer")
AUTOENCODER_COMPONENTS = ("vae", "vqvae")
_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---- schedule and output conversion -------------------------------------------------------------
def _squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine betas ``1 - abar(t+1/T) / abar(t)``, ``abar = cos^2(pi/2 (t + 0.008)/1.008)``."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> VPDiscreteSchedule:
    """The discrete VP schedule of a diffusers scheduler config (``scheduler_config.json``), in float64.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` and ``trained_betas``
    with diffusers' defaults. Sampling-only fields (``timestep_spacing``, ``clip_sample``, ...) do not
    change the ODE and are ignored.
    """
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler config has rescale_betas_zero_snr=True: its final alpha is 0, so sigma_max is infinite "
            "and the EDM-form solvers cannot start there; this model family is not supported"
        )
    num_steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return VPDiscreteSchedule(betas=torch.as_tensor(config["trained_betas"], dtype=torch.float64))
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start, beta_end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if beta_schedule == "linear":
        return VPDiscreteSchedule.linear(beta_start, beta_end, num_steps)
    if beta_schedule == "scaled_linear":
        return VPDiscreteSchedule.scaled_linear(beta_start, beta_end, num_steps)
    if beta_schedule == "squaredcos_cap_v2":
        return VPDiscreteSchedule(betas=_squaredcos_cap_v2_betas(num_steps))
    raise ValueError(f"scheduler config beta_schedule={beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")


def prediction_type_of(config: Mapping[str, Any]) -> str:
    """``prediction_type`` of a scheduler config (diffusers' default: epsilon), validated."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    return prediction_type


def x0_from_prediction(prediction: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """EDM-form denoised ``D(x, sigma)`` from a VP network's epsilon / v / x0 prediction (module docstring)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    if prediction_type == "epsilon":
        return x - s * prediction
    if prediction_type == "v_prediction":
        alpha = torch.rsqrt(1 + s * s)
        return alpha * alpha * x - s * alpha * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ---- the adapter --------------------------------------------------------------------------------
def _network_kind(net: nn.Module) -> str:
    """How the network is called: "unet" (UNet2DModel), "unet_text" (UNet2DConditionModel) or "dit"."""
    kinds = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet_text"} | {name: "dit" for name in _DIT_CLASSES}
    try:
        return kinds[type(net).__name__]
    except KeyError:
        raise ValueError(f"unsupported network class {type(net).__name__}; supported: {sorted(kinds)}") from None


def _sample_shape(net: nn.Module) -> tuple[int, int, int]:
    size = net.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(net.config.in_channels), int(height), int(width)


def _class_count(net: nn.Module, kind: str) -> int:
    """Number of class labels the network embeds (0: unconditional)."""
    if kind == "dit":
        return int(net.config.num_embeds_ada_norm or 0)
    if kind == "unet" and net.config.num_class_embeds is not None:
        if net.config.class_embed_type is not None:
            raise ValueError(f"UNet2DModel class_embed_type={net.config.class_embed_type!r} is not supported (only num_class_embeds)")
        return int(net.config.num_class_embeds)
    return 0


class DiffusersDenoiser(DenoiserAdapter):
    """A diffusers VP network (UNet2DModel, DiT, UNet2DConditionModel) as ``D(x, sigma, cond)`` in EDM form.

    Args:
        net: the noise-prediction network (frozen here).
        schedule, prediction_type: from the scheduler config (:func:`schedule_from_scheduler_config`).
        autoencoder: first-stage VQModel/AutoencoderKL of a latent model; enables :meth:`decode`.
        latent_scaling_factor: latents are ``scaling_factor * encoder output``; default: the autoencoder's
            ``config.scaling_factor`` (what the diffusers pipelines divide by before decoding).
        guidance_scale: classifier-free guidance weight w (1: no guidance, one network call).
        null_class: class id of the unconditional branch (DiT: ``num_embeds_ada_norm``; UNet2DModel: no
            convention, give it when guiding a class-conditional UNet).
        unconditional: text models: the negative-prompt embedding [1, L, D] of the unconditional branch.
        gradient_checkpointing, autocast_bf16: memory options (:class:`DenoiserAdapter`).

    ``cond``: class-conditional models take integer class ids [B]; text-conditional ones (UNet2DConditionModel)
    prompt embeddings [B, L, D] (see :class:`ld3.models.stable_diffusion.StableDiffusionDenoiser`, which also
    guides with a negative prompt). A single condition is broadcast to all samples.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: VPDiscreteSchedule,
        prediction_type: str = "epsilon",
        *,
        autoencoder: nn.Module | None = None,
        latent_scaling_factor: float | None = None,
        guidance_scale: float = 1.0,
        null_class: int | None = None,
        unconditional: Tensor | None = None,
        **memory_options: bool,
    ):
        super().__init__(schedule, _sample_shape(net), **memory_options)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.net = freeze(net)
        self.network_kind = _network_kind(net)
        self.prediction_type = prediction_type
        self.autoencoder = None if autoencoder is None else freeze(autoencoder)
        if autoencoder is not None and latent_scaling_factor is None:
            latent_scaling_factor = float(getattr(autoencoder.config, "scaling_factor", 1.0))
        self.latent_scaling_factor = latent_scaling_factor
        self.guidance_scale = float(guidance_scale)
        self.n_classes = _class_count(net, self.network_kind)
        self.condition_kind = "text" if self.network_kind == "unet_text" else "class" if self.n_classes else None
        # Condition of the unconditional branch ([1, ...]); None without guidance.
        self.register_buffer("unconditional", self._unconditional_condition(null_class, unconditional), persistent=False)

    def _unconditional_condition(self, null_class: int | None, unconditional: Tensor | None) -> Tensor | None:
        """Condition of the unconditional branch ([1] class id or [1, L, D] embedding); None without guidance."""
        if self.guidance_scale == 1.0:
            return None
        if self.condition_kind is None:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs a conditional model; this one is unconditional (use 1.0)")
        if self.condition_kind == "text":
            if unconditional is None or unconditional.ndim != 3 or unconditional.shape[0] != 1:
                raise ValueError("guidance on a text-conditional model needs unconditional= (negative prompt embedding [1, L, D])")
            return unconditional.detach()
        if null_class is None and self.network_kind == "dit":
            null_class = self.n_classes  # DiT's label table holds the null class after the real ones
        if null_class is None:
            raise ValueError(
                "guidance_scale != 1 on a class-conditional UNet2DModel needs null_class= (the label id the "
                "model was trained with for 'no class')"
            )
        return torch.tensor([int(null_class)])

    # ---- conditioning ----------------------------------------------------------------------------
    def _check_condition(self, cond: Tensor | None, x: Tensor) -> Tensor | None:
        if self.condition_kind is None:
            return super()._check_condition(cond, x)
        if cond is None:
            expected = "class ids [B]" if self.condition_kind == "class" else "prompt embeddings [B, L, D]"
            raise ValueError(f"this model is {self.condition_kind}-conditional: pass cond ({expected})")
        cond = torch.as_tensor(cond, device=x.device)
        if self.condition_kind == "text":
            return self._check_text_condition(cond, x.shape[0])
        if cond.is_floating_point():
            raise ValueError(f"cond must hold integer class ids, got dtype {cond.dtype}")
        cond = expand_condition(cond.long().reshape(-1), x.shape[0])
        if bool(((cond < 0) | (cond >= self.n_classes)).any()):
            raise ValueError(f"class ids in cond must lie in [0, {self.n_classes}), got {cond.tolist()}")
        return cond

    def _check_text_condition(self, cond: Tensor, batch: int) -> Tensor:
        width = self.net.config.cross_attention_dim  # an int for Stable Diffusion v1.x
        if not cond.is_floating_point() or cond.ndim != 3 or (isinstance(width, int) and cond.shape[2] != width):
            raise ValueError(
                f"cond must be prompt embeddings [B, L, {width}] (from encode_prompts), got {cond.dtype} {tuple(cond.shape)}"
            )
        if self.unconditional is not None and cond.shape[1] != self.unconditional.shape[1]:
            raise ValueError(f"prompt embeddings must have {self.unconditional.shape[1]} tokens like the negative prompt's, got {cond.shape[1]}")
        return expand_condition(cond, batch)

    # ---- the denoiser ----------------------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        x_vp = x * torch.rsqrt(1 + sigma * sigma).reshape(-1, 1, 1, 1)
        t = self.schedule.t_from_sigma(sigma.double())  # continuous training timestep (module docstring)
        uncond = self.unconditional
        if uncond is None:
            prediction = self._predict(x_vp, t, cond)
        else:
            both = self._predict(torch.cat([x_vp, x_vp]), torch.cat([t, t]),
                                 torch.cat([uncond.to(cond.dtype).expand(x.shape[0], *uncond.shape[1:]), cond]))
            pred_uncond, pred_cond = both.chunk(2)
            prediction = classifier_free_guidance(pred_uncond, pred_cond, self.guidance_scale)
        return x0_from_prediction(prediction.to(x.dtype), x, sigma, self.prediction_type)

    def _predict(self, x_vp: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The network's raw prediction (learned-variance channels dropped)."""
        sample, timestep = x_vp.to(self.net.dtype), t.to(torch.float32)
        if self.network_kind == "unet_text":
            out = self.net(sample, timestep, encoder_hidden_states=cond.to(self.net.dtype)).sample
        else:  # UNet2DModel and DiT take class_labels (None when unconditional)
            out = self.net(sample, timestep, class_labels=cond).sample
        channels = self.shape[0]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    # ---- latent models -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.autoencoder is None:
            return self.shape
        factor = 2 ** (len(self.autoencoder.config.block_out_channels) - 1)
        _, height, width = self.shape
        return int(self.autoencoder.config.out_channels), height * factor, width * factor

    def decode(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """Images in [-1, 1] from latents [B, *shape] (``clamp=False`` keeps the raw decoder output).

        Differentiable (VQ models pass gradients straight through their quantiser); the memory options
        apply to the decoder call too.
        """
        if self.autoencoder is None:
            raise ValueError("decode needs a latent model (loaded with an autoencoder); this one works in pixel space")
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"latents must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(latents.shape)}")
        images = self._with_memory_options(self._decode, latents).to(latents.dtype)
        return images.clamp(-1, 1) if clamp else images

    def _decode(self, latents: Tensor) -> Tensor:
        scaled = (latents / self.latent_scaling_factor).to(self.autoencoder.dtype)
        return self.autoencoder.decode(scaled).sample


# ---- loading ------------------------------------------------------------------------------------
def resolve_pretrained_folder(path: str | os.PathLike, what: str, example_repo: str) -> Path:
    """A local pipeline folder, or the cached snapshot of a Hugging Face repo id (never downloads)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{what} must be a diffusers pipeline folder, got the file {folder}")
    if _REPO_ID.match(str(path)):
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            looked = f"{folder.resolve()} and the Hugging Face cache {HF_HUB_CACHE}"
    else:
        looked = str(folder.resolve())
    raise MissingWeightsError(
        f"{what} {str(path)!r} not found (looked in {looked}); on a machine with internet access run "
        f"`huggingface-cli download {example_repo} --local-dir <folder>` (or pipeline.save_pretrained(<folder>)) "
        "and pass that folder"
    )


def _class_name(config: Mapping[str, Any]) -> str | None:
    """Class named by a diffusers (``_class_name``), transformers (``architectures``) or tokenizer config."""
    architectures = config.get("architectures") or [None]
    return config.get("_class_name") or architectures[0] or config.get("tokenizer_class")


def pipeline_components(folder: Path) -> dict[str, str]:
    """Component subfolder -> class name, read from the config file in each subfolder."""
    components = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for name in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
            if (sub / name).is_file():
                components[sub.name] = _class_name(json.loads((sub / name).read_text())) or "unknown"
                break
    return components


def _pick_component(components: Mapping[str, str], roles: tuple[str, ...]) -> str | None:
    return next((role for role in roles if role in components), None)


def load_component(folder: Path, subfolder: str, class_name: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """``<library class>.from_pretrained(folder, subfolder=...)`` offline, with a clear missing-weights error."""
    import diffusers
    import transformers

    library = diffusers if hasattr(diffusers, class_name) else transformers
    cls = getattr(library, class_name, None)
    if cls is None:
        raise ValueError(f"{folder / subfolder} holds a {class_name!r}, which neither diffusers nor transformers provides")
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)
    except OSError as error:
        raise MissingWeightsError(
            f"weights of {subfolder!r} ({class_name}) not found in {folder / subfolder}: {str(error).splitlines()[0]}; "
            "copy the complete pipeline folder (pipeline.save_pretrained or huggingface-cli download)"
        ) from error


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no scheduler/scheduler_config.json; the VP schedule of the model is read from it")
    return json.loads(path.read_text())


def _require(components: Mapping[str, str], folder: Path, role: str, allowed: tuple[str, ...], hint: str) -> None:
    if components.get(role) not in allowed:
        found = ", ".join(f"{k}: {v}" for k, v in components.items()) or "no components"
        raise ValueError(f"{folder} is not {hint}: its {role!r} must be one of {allowed}, found {found}")


def _reject(components: Mapping[str, str], folder: Path, roles: tuple[str, ...], use: str) -> None:
    present = [role for role in roles if role in components]
    if present:
        raise ValueError(f"{folder} holds {', '.join(present)} ({components[present[0]]}): it is not this model family; use {use}")


def load_pixel_diffusion(
    path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, guidance_scale: float = 1.0,
    null_class: int | None = None, **memory_options: bool,
) -> DiffusersDenoiser:
    """A pixel-space diffusers model (``unet/`` UNet2DModel + ``scheduler/``), e.g. google/ddpm-cifar10-32."""
    folder = resolve_pretrained_folder(path, "pixel diffusion pipeline folder", "google/ddpm-cifar10-32")
    components = pipeline_components(folder)
    _reject(components, folder, AUTOENCODER_COMPONENTS, "load_latent_diffusion (latent model)")
    _reject(components, folder, ("text_encoder",), "load_stable_diffusion (text-conditional model)")
    _require(components, folder, "unet", ("UNet2DModel",), "a pixel-space diffusion pipeline")
    config = read_scheduler_config(folder)
    return DiffusersDenoiser(
        load_component(folder, "unet", components["unet"], torch_dtype),
        schedule_from_scheduler_config(config), prediction_type_of(config),
        guidance_scale=guidance_scale, null_class=null_class, **memory_options,
    )


def load_latent_diffusion(
    path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, guidance_scale: float = 1.0,
    null_class: int | None = None, latent_scaling_factor: float | None = None, **memory_options: bool,
) -> DiffusersDenoiser:
    """A latent diffusion model: ``unet/`` UNet2DModel or ``transformer/`` DiT, ``vqvae/`` VQModel or
    ``vae/`` AutoencoderKL, ``scheduler/`` (e.g. CompVis/ldm-celebahq-256, facebook/DiT-XL-2-256).

    Class-conditional networks (DiT, UNet2DModel with num_class_embeds) take class ids as ``cond`` and use
    classifier-free guidance with ``guidance_scale`` (paper's ImageNet-256 setting: 2.0).
    """
    folder = resolve_pretrained_folder(path, "latent diffusion pipeline folder", "CompVis/ldm-celebahq-256")
    components = pipeline_components(folder)
    _reject(components, folder, ("text_encoder",), "load_stable_diffusion (text-conditional model)")
    network = _pick_component(components, NETWORK_COMPONENTS) or "unet"
    autoencoder = _pick_component(components, AUTOENCODER_COMPONENTS)
    if autoencoder is None:
        raise ValueError(f"{folder} has no autoencoder (vae/ or vqvae/): it is not a latent model; use load_pixel_diffusion")
    _require(components, folder, network, ("UNet2DModel", *_DIT_CLASSES), "a latent diffusion pipeline")
    _require(components, folder, autoencoder, ("VQModel", "AutoencoderKL"), "a latent diffusion pipeline")
    config = read_scheduler_config(folder)
    return DiffusersDenoiser(
        load_component(folder, network, components[network], torch_dtype),
        schedule_from_scheduler_config(config), prediction_type_of(config),
        autoencoder=load_component(folder, autoencoder, components[autoencoder], torch_dtype),
        latent_scaling_factor=latent_scaling_factor, guidance_scale=guidance_scale, null_class=null_class,
        **memory_options,
    )
