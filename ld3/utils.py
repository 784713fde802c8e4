"""Small shared helpers: per-sample seeded latents, atomic file writes, the user cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once at import (os.umask can only be read by setting it, which threads could see)


def latents_from_seeds(
    seeds: Sequence[int] | Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard-normal latents ``z`` of shape [len(seeds), *shape], one generator per seed.

    Sample i depends only on ``seeds[i]``, so results never depend on how samples are split into
    batches or workers (docs/design.md#randomness-per-sample). Drawn in float64 on the CPU, then cast,
    so the same seed gives the same latent on every device and dtype.
    """
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {min(seeds)}")
    shape = tuple(int(d) for d in shape)
    out = torch.empty((len(seeds), *shape), dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for i, seed in enumerate(seeds):
        gen.manual_seed(seed)
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.to(dtype=dtype, device=device)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then os.replace.

    Readers see the old file or the new one, never a partial write; the folder is created if needed. The file
    gets the permissions of a plain ``open()`` (0o666 less the umask, e.g. 0o644), not mkstemp's 0o600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/ld3/<parts>`` (default ``~/.cache/ld3/<parts>``): the one home of the project's caches
    (FID reference statistics, checkpoint digests, the tiny smoke-test checkpoints)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).joinpath("ld3", *parts)
