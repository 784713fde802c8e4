"""Checkpoints as model specs: :func:`checkpoint_spec` makes the :class:`~pipeline.models.spec.ModelSpec`
of a checkpoint of a family (pipeline.models.families): it checks that the path fits the family and records
:func:`checkpoint_digest` (sha256 of the file, or of a pipeline folder's component files), so the teacher
cache key changes whenever the weights do. Digests are computed once per file and cached in
``$XDG_CACHE_HOME/ld3/checkpoint-digests.json`` under path, size and mtime; with ``record_digest=False``
they are kept in memory until :func:`record_checkpoint_digest` (after the file loaded), so a file that fails
to load leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ld3.checkpoint_sources import EDM_RELEASE_URL, SD_EXAMPLE_REPO
from ld3.losses import MissingWeightsError
from ld3.models.diffusers_models import resolve_pretrained_folder
from ld3.utils import user_cache_dir
from pipeline.fileio import atomic_write_text
from pipeline.models.families import FAMILY_BUILDERS
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 24  # 16 MiB


def default_digest_cache() -> Path:
    """``$XDG_CACHE_HOME/ld3/checkpoint-digests.json`` (default ``~/.cache/ld3/...``)."""
    return user_cache_dir("checkpoint-digests.json")


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
