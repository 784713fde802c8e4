"""Model specs: a small, picklable description of a denoiser that any Ray worker can rebuild.

A :class:`ModelSpec` names a model *family* (a key of ``pipeline.models.registry.MODEL_BUILDERS``), a
human-readable id, the JSON-serialisable keyword arguments of the family's builder and the digest of its
weights. It is what the teacher cache hashes (the model never has to be built to look data up) and what Ray
actors receive: each actor calls the builder once in its constructor (docs/design.md). Plain data: making a
spec imports no torch; :meth:`ModelSpec.resolve` loads the builders.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ld3.digits.shipped import DENOISER_FILE, SHIPPED

if TYPE_CHECKING:
    import torch

    from pipeline.models.registry import LoadedModel


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, independent of where it runs; everything here enters the teacher cache key."""

    family: str  # key of MODEL_BUILDERS, e.g. "gmm"
    model_id: str  # human-readable id, e.g. "gmm-seed0" or "edm-cifar10-uncond-vp"
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable builder arguments
    checkpoint_digest: str | None = None  # sha256 of the weights file; None when there are no weights

    def __post_init__(self) -> None:
        if not self.family or not isinstance(self.family, str):
            raise ValueError(f"ModelSpec.family must be a non-empty string, got {self.family!r}")
        if not self.model_id or not isinstance(self.model_id, str):
            raise ValueError(f"ModelSpec.model_id must be a non-empty string, got {self.model_id!r}")
        try:
            json.dumps(dict(self.kwargs), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"ModelSpec.kwargs must be JSON-serialisable (they are hashed into the cache key): {err}; "
                "pass numbers, strings, lists or dicts and build tensors inside the builder"
            ) from None

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description (cache key material and dataset metadata)."""
        return {
            "family": self.family,
            "model_id": self.model_id,
            "kwargs": json.loads(json.dumps(dict(self.kwargs), sort_keys=True)),
            "checkpoint_digest": self.checkpoint_digest,
        }

    def resolve(self) -> Callable[..., LoadedModel]:
        """The builder bound to this spec's kwargs: ``resolve()(device=, dtype=)``.

        Resolved in the calling process, so families registered by a study script also reach Ray
        workers (the bound builder is pickled along with the actor). The builders (and torch) load only here.
        """
        from pipeline.models import families  # noqa: F401 - registers the builders of the paper's families
        from pipeline.models.registry import get_model_builder

        return functools.partial(get_model_builder(self.family), **self.kwargs)

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
        """Build the model in this process (``dtype`` None: float32)."""
        import torch

        return self.resolve()(device=torch.device(device), dtype=torch.float32 if dtype is None else dtype)


def gmm_spec(seed: int = 0, **kwargs: Any) -> ModelSpec:
    """Spec of the embedded default model; ``kwargs`` go to ``pipeline.models.registry.build_gmm``."""
    return ModelSpec(family="gmm", model_id=f"gmm-seed{seed}", kwargs={"seed": seed, **kwargs})


def digits_spec(*, conditional: bool = True, guidance_scale: float = 1.0) -> ModelSpec:
    """Spec of the shipped digits model; its weights' digest enters the teacher cache key."""
    variant = "cond" if conditional else "uncond"
    variant += "" if guidance_scale == 1.0 else f"-cfg{guidance_scale:g}"
    return ModelSpec(family="digits", model_id=f"digits-{variant}",
                     kwargs={"conditional": conditional, "guidance_scale": guidance_scale},
                     checkpoint_digest=SHIPPED[DENOISER_FILE])
