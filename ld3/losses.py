"""Per-sample distances between student and teacher outputs (docs/method.md#objective).

Every loss maps two batches ``[B, ...]`` to a vector ``[B]`` (one value per sample), because LD3's
accept-if-better slack step compares samples individually.

- ``l2``: mean squared error over all pixels of a sample (the reference's L2; its square root is the
  per-sample RMSE).
- ``l1``: mean absolute error over all pixels of a sample.
- ``lpips``: LPIPS (Zhang et al. 2018) through the ``lpips`` package, VGG backbone by default, images in
  [-1, 1]. Its backbone's ImageNet weights must already be in the torch hub cache; nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3.catalog import LOSS_NAMES, PIXEL_LOSS_NAMES, matching_registry
from ld3.checkpoint_sources import MissingWeightsError

LossFn = Callable[[Tensor, Tensor], Tensor]

# Backbones of the lpips package -> (torchvision weights enum, its member) giving the checkpoint URL.
_LPIPS_BACKBONES = {"vgg": ("VGG16_Weights", "IMAGENET1K_V1"),
                    "alex": ("AlexNet_Weights", "IMAGENET1K_V1"),
                    "squeeze": ("SqueezeNet1_1_Weights", "IMAGENET1K_V1")}
_LPIPS_MIN_SIZE = {"vgg": 16, "alex": 31, "squeeze": 17}  # smallest image side each trunk's pooling accepts


def _check_pair(prediction: Tensor, target: Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}; decode the student output the same way as the teacher's"
        )
    if prediction.ndim < 2:
        raise ValueError(f"expected batches [B, ...] with at least 2 dims, got shape {tuple(prediction.shape)}")


def l2_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error ``mean_pixels (ŷ - y)^2`` -> [B] (sqrt gives the sample's RMSE)."""
    _check_pair(prediction, target)
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def l1_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean absolute error ``mean_pixels |ŷ - y|`` -> [B]."""
    _check_pair(prediction, target)
    return (prediction - target).abs().flatten(1).mean(dim=1)


def lpips_backbone_weights_path(net: str = "vgg") -> Path:
    """Where torchvision (and hence lpips) looks for the backbone's ImageNet weights: ``<hub dir>/checkpoints``.

    The hub dir is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), see ``torch.hub.get_dir``.
    """
    import torchvision.models as tv_models

    enum_name, member = _lpips_backbone(net)
    url = getattr(getattr(tv_models, enum_name), member).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _lpips_backbone(net: str) -> tuple[str, str]:
    try:
        return _LPIPS_BACKBONES[net]
    except KeyError:
        raise ValueError(f"unknown LPIPS backbone net={net!r}; choose one of {sorted(_LPIPS_BACKBONES)}") from None


def _require_backbone_weights(net: str) -> None:
    path = lpips_backbone_weights_path(net)
    if path.is_file():
        return
    import torchvision.models as tv_models

    enum_name, member = _lpips_backbone(net)
    url = getattr(getattr(tv_models, enum_name), member).url
    raise MissingWeightsError(
        f"LPIPS ({net}) needs the ImageNet weights of its backbone: file {path.name!r} was not found in the "
        f"torch hub cache {path.parent} (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). "
        f"Download {url} on a machine with internet access and copy it to {path}, or set TORCH_HOME to a "
        f"folder holding hub/checkpoints/{path.name}."
    )


class LPIPSLoss(nn.Module):
    """Per-sample LPIPS distance (frozen, eval mode) for images in [-1, 1] with 3 channels -> [B].

    ``pretrained_backbone=False`` builds the same network with a randomly initialised trunk (for tests and
    offline plumbing; the package's calibrated linear heads are still loaded). ``resize_to`` bilinearly
    resizes both images to that side length first (needed below 16 pixels for VGG; 224 is common practice).
    """

    def __init__(self, net: str = "vgg", *, pretrained_backbone: bool = True, resize_to: int | None = None):
        super().__init__()
        _lpips_backbone(net)
        self.min_size = _LPIPS_MIN_SIZE[net]
        if resize_to is not None and resize_to < self.min_size:
            raise ValueError(f"resize_to must be at least {self.min_size} pixels for net={net!r}, or None; got {resize_to}")
        if pretrained_backbone:
            _require_backbone_weights(net)
        import lpips

        self.resize_to = resize_to
        with warnings.catch_warnings():  # lpips still calls torchvision's deprecated pretrained= argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.metric = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        self.metric.eval().requires_grad_(False)

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        _check_pair(prediction, target)
        if prediction.ndim != 4 or prediction.shape[1] != 3:
            raise ValueError(f"LPIPS needs RGB images [B, 3, H, W], got shape {tuple(prediction.shape)}; "
                             "decode latents to images first (train_ld3's decode=)")
        side = min(prediction.shape[-2:])
        if self.resize_to is None and side < self.min_size:
            raise ValueError(f"images of {side} pixels are too small for the LPIPS trunk; pass resize_to=32 (or 224)")
        dtype = next(self.metric.parameters()).dtype
        a, b = prediction.to(dtype), target.to(dtype)
        if self.resize_to is not None:
            size = (self.resize_to, self.resize_to)
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return self.metric(a, b).reshape(-1).to(prediction.dtype)


PIXEL_LOSSES: dict[str, LossFn] = matching_registry("pixel losses", PIXEL_LOSS_NAMES, {"l2": l2_loss, "l1": l1_loss})


def get_loss(name: str, **lpips_kwargs) -> LossFn:
    """Per-sample loss by name (``ld3.catalog.LOSS_NAMES``); keyword arguments are ``LPIPSLoss`` options."""
    if name == "lpips":
        return LPIPSLoss(**lpips_kwargs)
    if name not in PIXEL_LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")
    if lpips_kwargs:
        raise ValueError(f"loss {name!r} takes no options, got {sorted(lpips_kwargs)}")
    return PIXEL_LOSSES[name]
