"""Tiny randomly initialised checkpoints of every model family, for ``--smoke-test`` runs of the studies.

Each function writes a checkpoint in the family's real on-disk format (an EDM-style network pickle, a
diffusers pipeline folder) once into ``$XDG_CACHE_HOME/ld3/smoke-models/`` and returns its path, so a
smoke test loads it through the same loader, digest and teacher cache as a real checkpoint. The weights
come from a fixed seed: the same call always returns the same files. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ld3.models.edm import register_safe_class
from ld3.utils import user_cache_dir

FORMAT_VERSION = 2  # bump when a tiny model's architecture or module path (its pickles name the class) changes
SEED = 0
SMOKE_PROMPTS = ("a cat", "a dog", "a red car", "a small house", "a tree", "a bird on a wire", "a cup", "a boat at sea")
_AE_BLOCKS = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}
_UNET_BLOCKS = {"layers_per_block": 1, "block_out_channels": (8, 16), "norm_num_groups": 4}


def smoke_models_dir() -> Path:
    """``$XDG_CACHE_HOME/ld3/smoke-models`` (default ``~/.cache/ld3/smoke-models``)."""
    return user_cache_dir("smoke-models")


def _cached(name: str, params: dict, write: Callable[[Path], None]) -> Path:
    """The folder ``<smoke_models_dir>/<name>-<hash of params>``, written by ``write`` on first use (atomically)."""
    key = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:12]
    root = smoke_models_dir()
    target = root / f"{name}-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            write(staging)
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---- EDM ------------------------------------------------------------------------------------------
@register_safe_class  # the EDM loader may rebuild it without an opt-in: its code is this module's, not the file's
class TinyConvNet(nn.Module):
    """Two 3×3 convolutions with noise (and class) embeddings added in between."""

    def __init__(self, channels: int, label_dim: int, hidden: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.noise_map = nn.Linear(1, hidden)
        self.label_map = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        h = self.conv_in(x) + self.noise_map(noise_labels.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        if self.label_map is not None:
            h = h + self.label_map(class_labels.to(x.dtype))[:, :, None, None]
        return self.conv_out(nn.functional.silu(h))


@register_safe_class
class TinyEDMNetwork(nn.Module):
    """A tiny network with the interface of EDM's preconditioners: ``net(x, sigma, class_labels)`` returns
    ``c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022, Table 1, EDM column)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_data: float = 0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), sigma_data
        self.model = TinyConvNet(img_channels, label_dim)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, force_fp32: bool = False) -> Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        total = (sigma**2 + self.sigma_data**2).sqrt()
        c_skip, c_out, c_in = self.sigma_data**2 / total**2, sigma * self.sigma_data / total, 1 / total
        out = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels)
        return c_skip * x + c_out * out.to(torch.float32)


def tiny_edm_pickle(image_shape: tuple[int, int, int] = (3, 32, 32), label_dim: int = 0) -> Path:
    """A pickled snapshot dict ``{"ema": TinyEDMNetwork}`` (the release files' layout; the class is pickled by
    reference to this module rather than with embedded source)."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"EDM networks make square images; got image_shape {image_shape}")

    def write(folder: Path) -> None:
        net = TinyEDMNetwork(height, channels, label_dim).eval().requires_grad_(False)
        with (folder / "network-snapshot-tiny.pkl").open("wb") as handle:
            pickle.dump({"ema": net}, handle)

    return _cached("edm", {"shape": list(image_shape), "label_dim": label_dim}, write) / "network-snapshot-tiny.pkl"


# ---- diffusers --------------------------------------------------------------------------------------
def _tiny_unet(channels: int, num_class_embeds: int | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       **_UNET_BLOCKS)


def _save(folder: Path, **components) -> None:
    for name, component in components.items():
        component.save_pretrained(folder / name)


def tiny_pixel_pipeline() -> Path:
    """``unet/`` UNet2DModel (3×8×8) + ``scheduler/`` DDPM linear betas: a pixel-space diffusers pipeline."""
    from diffusers import DDPMScheduler

    return _cached("pixel", {}, lambda folder: _save(folder, unet=_tiny_unet(3), scheduler=DDPMScheduler()))


def tiny_latent_pipeline(class_conditional: bool = False) -> Path:
    """A latent diffusers pipeline with 8×8 latents decoded to 16×16 images.

    Unconditional: UNet2DModel + VQModel (the LSUN-bedroom LDM layout). Class-conditional: a DiT with 10
    classes + AutoencoderKL (the facebook/DiT-XL-2-256 layout).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, VQModel

    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2, **_AE_BLOCKS}

    def write(folder: Path) -> None:
        if class_conditional:
            network = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
            _save(folder, transformer=network, vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **blocks),
                  scheduler=DDIMScheduler())
        else:
            vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, **blocks)
            scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
            _save(folder, unet=_tiny_unet(3), vqvae=vqvae, scheduler=scheduler)

    return _cached("latent", {"class_conditional": class_conditional}, write)


def _tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single lowercase letters (vocab and merges written from scratch)."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def tiny_stable_diffusion_pipeline() -> Path:
    """A Stable Diffusion v1.x pipeline folder (CLIP text encoder and tokenizer, UNet2DConditionModel,
    AutoencoderKL, scaled-linear scheduler) with 4×8×8 latents decoded to 16×16 images."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def write(folder: Path) -> None:
        tokenizer = _tiny_clip_tokenizer(folder / ".tokenizer-source")
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                    bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_UNET_BLOCKS)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, **_AE_BLOCKS)
        scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
        _save(folder, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler)
        shutil.rmtree(folder / ".tokenizer-source")

    return _cached("sd", {}, write)
