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

:func:`checkpoint_spec` makes the :class:`~pipeline.models.ModelSpec` of a checkpoint: it checks that the
path fits the family and records :func:`checkpoint_digest` (sha256 of the file, or of a pipeline folder's
component files), so the teacher cache key changes whenever the weights do. Digests are computed once per
file and cached in ``$XDG_CACHE_HOME/ld3/checkpoint-digests.json`` under path, size and mtime; with
``record_digest=False`` they are kept in memory until :func:`record_checkpoint_digest` (after the file
loaded), so a file that fails to load leaves no entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ld3.losses import MissingWeightsError
from ld3.models.base import DenoiserAdapter
from ld3.models.diffusers_models import (
    load_latent_diffusion,
    load_pixel_diffusion,
    resolve_pretrained_folder,
)
from ld3.models.edm import EDM_RELEASE_URL, load_edm_denoiser
from ld3.models.stable_diffusion import (
    SD_EXAMPLE_REPO,
    StableDiffusionDenoiser,
    load_stable_diffusion,
)
from pipeline.fileio import atomic_write_text
from pipeline.models import smoke  # noqa: F401 - registers the tiny EDM networks as safe to unpickle
from pipeline.models.registry import (
    ConditionValue,
    LoadedModel,
    ModelSpec,
    register_model_builder,
)

log = logging.getLogger(__name__)

WEIGHTS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHUNK = 1 << 24  # 16 MiB


# ---------------------------------------------------------------------------------------------
# Checkpoint digests
# ---------------------------------------------------------------------------------------------
def default_digest_cache() -> Path:
    """``$XDG_CACHE_HOME/ld3/checkpoint-digests.json`` (default ``~/.cache/ld3/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ld3" / "checkpoint-digests.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pipeline_files(folder: Path) -> list[Path]:
    """The files that make up a diffusers pipeline folder: everything in its component subfolders plus
    ``model_index.json`` (top-level single-file checkpoints and hidden folders such as ``.cache`` are not
    part of the model the folder loaders read)."""
    files = [folder / "model_index.json"] if (folder / "model_index.json").is_file() else []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += sorted(f for f in sub.rglob("*") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    return files


def _stamp(path: Path) -> str:
    stat = path.stat()  # follows symlinks (Hugging Face snapshots link to blobs)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_digest_cache(cache_file: Path) -> dict[str, str]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_digest_cache(cache_file: Path, new: dict[str, str]) -> None:
    """Merge ``new`` into the cache file (re-read first: other processes may have added entries)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        merged = _read_digest_cache(cache_file)
        stale_paths = {stamp.rsplit("|", 2)[0] for stamp in new}
        merged = {k: v for k, v in merged.items() if k.rsplit("|", 2)[0] not in stale_paths} | new
        atomic_write_text(cache_file, json.dumps(merged, indent=0, sort_keys=True))
    except OSError as err:  # the cache only saves time; a read-only home must not stop a study
        log.warning("could not update the checkpoint digest cache %s: %s", cache_file, err)


_unrecorded_digests: dict[str, str] = {}  # stamp -> sha256 of files hashed with record=False in this process


def checkpoint_digest(path: str | os.PathLike, cache_file: str | os.PathLike | None = None, *,
                      record: bool = True) -> str:
    """sha256 of a checkpoint file, or of a pipeline folder (sha256 of the JSON map relative path -> file
    sha256 over :func:`pipeline_files`). Each file is hashed once; later calls read the cache while the
    file's path, size and mtime are unchanged. ``record=False`` keeps new digests out of the cache file."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise MissingWeightsError(f"checkpoint {path.name!r} not found at {path}")
    files = [path] if path.is_file() else pipeline_files(path)
    if not files:
        raise ValueError(f"checkpoint folder {path} holds no component files; pass a diffusers pipeline folder")
    cache_path = Path(cache_file) if cache_file is not None else default_digest_cache()
    cache = _read_digest_cache(cache_path) | _unrecorded_digests
    stamps = {f: _stamp(f) for f in files}
    new = {stamps[f]: file_sha256(f) for f in files if stamps[f] not in cache}
    if record:
        new |= {stamp: _unrecorded_digests.pop(stamp) for stamp in stamps.values() if stamp in _unrecorded_digests}
        if new:
            _write_digest_cache(cache_path, new)
    else:
        _unrecorded_digests.update(new)
    digests = {f: cache.get(stamps[f]) or new[stamps[f]] for f in files}
    if path.is_file():
        return digests[path]
    listing = {f.relative_to(path).as_posix(): d for f, d in digests.items()}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def record_checkpoint_digest(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> None:
    """Write the digests of a checkpoint that loaded into the cache file (no rehash after ``record=False``)."""
    checkpoint_digest(path, cache_file, record=True)


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


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
_EXAMPLE_REPOS = {"diffusers_pixel": "google/ddpm-cifar10-32", "diffusers_latent": "CompVis/ldm-celebahq-256",
                  "stable_diffusion": SD_EXAMPLE_REPO}


def _local_checkpoint(family: str, checkpoint: str | os.PathLike) -> Path:
    """The checkpoint's local path, checked against the family's format (file vs pipeline folder)."""
    path = Path(checkpoint).expanduser()
    if family == "edm":
        if path.is_dir():
            raise ValueError(f"--checkpoint {path} is a folder, but the edm family needs an EDM network pickle file "
                             f"(e.g. edm-cifar10-32x32-uncond-vp.pkl from {EDM_RELEASE_URL})")
        if not path.is_file():
            raise MissingWeightsError(f"EDM network pickle {path.name!r} not found at {path.resolve()}; download it "
                                      f"from {EDM_RELEASE_URL} on a machine with internet access and pass its path")
        return path.resolve()
    if family == "stable_diffusion" and path.is_file():
        return path.resolve()
    what = f"{family} pipeline folder"
    return resolve_pretrained_folder(checkpoint, what, _EXAMPLE_REPOS[family]).resolve()


def checkpoint_spec(family: str, checkpoint: str | os.PathLike, *, model_id: str | None = None,
                    digest_cache: str | os.PathLike | None = None, record_digest: bool = True,
                    **options: Any) -> ModelSpec:
    """The spec of a local checkpoint of ``family`` (file or pipeline folder, or a cached Hugging Face repo
    id for the diffusers families), with its sha256 digest; ``options`` go to the family's builder.
    ``record_digest=False``: see :func:`record_checkpoint_digest` (module docstring)."""
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown checkpoint family {family!r}; choose one of {sorted(FAMILY_BUILDERS)}")
    path = _local_checkpoint(family, checkpoint)
    return ModelSpec(family=family, model_id=model_id or f"{family}-{path.stem}",
                     kwargs={"checkpoint": str(path), **options},
                     checkpoint_digest=checkpoint_digest(path, digest_cache, record=record_digest))
