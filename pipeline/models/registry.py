"""The model builders: what a built model is (:class:`LoadedModel`) and the registry that turns a
``pipeline.models.spec.ModelSpec`` family into one (:data:`MODEL_BUILDERS`).

A builder is ``builder(*, device, dtype, **kwargs) -> LoadedModel``. Families register themselves
with :func:`register_model_builder`; the embedded Gaussian mixture is registered here as ``"gmm"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ld3.models.gmm import default_gmm
from ld3.schedules import EDMSchedule, NoiseSchedule

Denoiser = Callable[..., Tensor]
ConditionValue = int | str


def class_labels(values: Sequence[ConditionValue], device: torch.device | str) -> Tensor:
    """Default condition encoder: integer class ids -> LongTensor [B] on ``device``."""
    if any(isinstance(v, str) for v in values):
        raise ValueError(
            "conditions contain prompts (str), but this model encodes only integer class ids; "
            "give the model's builder an encode_condition that embeds text"
        )
    return torch.as_tensor([int(v) for v in values], dtype=torch.long, device=device)


@dataclass(frozen=True)
class LoadedModel:
    """A built model, everything the teacher solve needs (runtime object, never hashed or stored)."""

    denoiser: Denoiser  # D(x, sigma, cond) -> x0_hat, EDM form (docs/method.md, EDM form)
    schedule: NoiseSchedule  # gives sigma_min / sigma_max of the teacher grid
    shape: tuple[int, ...]  # shape of one latent x, e.g. (C, H, W)
    decode: Callable[[Tensor], Tensor] | None = None  # latent -> data for latent models, else None
    encode_condition: Callable[[Sequence[ConditionValue], torch.device | str], Any] = class_labels
    quality: SampleQuality | None = None  # the model's own sample-quality metrics (digits), else None


class SampleQuality(Protocol):
    """Sample-quality metrics a model brings along (the digits model's classifier FD and accuracy).

    Features and correct counts are sums over samples, so the evaluation stage merges them across workers;
    ``__call__`` is the one-shot form used for a study's per-run metrics.
    """

    def conditions(self, num_samples: int) -> list[ConditionValue] | None:
        """The conditions of ``num_samples`` evaluation samples (None: unconditional)."""

    def features(self, samples: Tensor) -> Tensor:
        """Features [N, D] (float64, CPU) of samples in data space."""

    def reference(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the real data's features (the target of the Fréchet distance)."""

    def correct(self, samples: Tensor, conditions: Sequence[ConditionValue]) -> int:
        """How many samples show the class they were drawn for."""

    def __call__(self, samples: Tensor, conditions: Sequence[ConditionValue] | None) -> dict[str, float]:
        """Metrics of ``samples`` (data space, on the CPU) drawn with ``conditions``."""


ModelBuilder = Callable[..., LoadedModel]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_builder(family: str, builder: ModelBuilder, *, replace: bool = False) -> None:
    """Make ``ModelSpec(family=...)`` buildable by ``builder(*, device, dtype, **kwargs)``."""
    if not family or not isinstance(family, str):
        raise ValueError(f"family must be a non-empty string, got {family!r}")
    if family in MODEL_BUILDERS and not replace and MODEL_BUILDERS[family] is not builder:
        raise ValueError(f"model family {family!r} is already registered; pass replace=True to override it")
    MODEL_BUILDERS[family] = builder


def get_model_builder(family: str) -> ModelBuilder:
    """The registered builder of ``family``."""
    try:
        return MODEL_BUILDERS[family]
    except KeyError:
        raise ValueError(
            f"unknown model family {family!r}; registered: {sorted(MODEL_BUILDERS)} "
            "(register one with pipeline.models.register_model_builder)"
        ) from None


def build_gmm(
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    shape: Sequence[int] = (3, 8, 8),
    n_components: int = 8,
    n_classes: int = 4,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
) -> LoadedModel:
    """The embedded exact Gaussian-mixture model on an EDM schedule (ld3.models.gmm.default_gmm)."""
    gmm = default_gmm(seed=seed, shape=shape, n_components=n_components, n_classes=n_classes, dtype=dtype, device=device)
    return LoadedModel(denoiser=gmm, schedule=EDMSchedule(sigma_min, sigma_max), shape=gmm.shape)


register_model_builder("gmm", build_gmm)


@dataclass(frozen=True)
class DigitsSampleQuality:
    """Classifier Fréchet distance (``fd_classifier``) and, with classes, accuracy (``class_accuracy``)."""

    metric: Any  # ld3.digits.quality.DigitsQuality
    conditional: bool

    def conditions(self, num_samples: int) -> list[ConditionValue] | None:
        """Every class equally often (sample i asks for class i mod 10), or None when unconditional."""
        return [i % self.metric.config["network"]["n_classes"] for i in range(num_samples)] if self.conditional else None

    def features(self, samples: Tensor) -> Tensor:
        return self.metric.features(samples)

    def reference(self) -> tuple[Tensor, Tensor]:
        return self.metric.reference

    def correct(self, samples: Tensor, conditions: Sequence[ConditionValue]) -> int:
        return self.metric.correct(samples, torch.as_tensor([int(c) for c in conditions]))

    def __call__(self, samples: Tensor, conditions: Sequence[ConditionValue] | None) -> dict[str, float]:
        metrics = {"fd_classifier": self.metric.frechet_distance(samples)}
        if conditions is not None:
            metrics["class_accuracy"] = self.correct(samples, conditions) / len(conditions)
        return metrics


def build_digits(*, device: torch.device, dtype: torch.dtype, conditional: bool = True, guidance_scale: float = 1.0,
                 denoiser_weights: str | None = None, classifier_weights: str | None = None) -> LoadedModel:
    """The project's trained digits model (ld3.digits; shipped weights unless files are given) with its metrics."""
    from ld3.digits.denoiser import load_digits_denoiser
    from ld3.digits.quality import DigitsQuality

    denoiser = load_digits_denoiser(denoiser_weights, conditional=conditional, guidance_scale=guidance_scale, device=device)
    quality = DigitsSampleQuality(DigitsQuality(classifier_weights, device=device), conditional)
    return LoadedModel(denoiser=denoiser, schedule=denoiser.schedule, shape=denoiser.shape, quality=quality)


register_model_builder("digits", build_digits)
