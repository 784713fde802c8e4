"""The two networks of the digits model, pure torch: the denoiser's UNet and the evaluation classifier.

Both are small enough to train in minutes on one GPU and to run on a laptop CPU. Their sizes live in
plain dict configs (stored beside the weights, :mod:`ld3.digits.checkpoint`), so a checkpoint rebuilds its
own architecture without any code from the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNET_DEFAULTS = {"channels": [32, 64, 64], "blocks_per_level": 2, "attention_levels": [1, 2], "emb_dim": 128,
                 "n_classes": 10, "dropout": 0.1, "image_channels": 1}
CLASSIFIER_DEFAULTS = {"channels": [32, 64], "feature_dim": 64, "n_classes": 10, "dropout": 0.3, "image_channels": 1}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, channels)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the scalar noise input ``c_noise`` followed by a two-layer MLP (EDM's UNets)."""

    def __init__(self, dim: int, frequencies: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(frequencies) / frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.float()[:, None] * 100.0 * self.freqs[None]  # c_noise = log(σ)/4 spans ~[-1.6, 1.1]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv twice, the embedding added in between, a 1×1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale and shift of the second norm
        self.norm2, self.dropout = _group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return (x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))) / math.sqrt(2)


class Level(nn.Module):
    """The blocks of one resolution: ResBlocks, each followed by attention where asked."""

    def __init__(self, widths: Sequence[tuple[int, int]], emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(a, b, emb_dim, dropout) for a, b in widths)
        self.attn = nn.ModuleList(SelfAttention(b) if attention else nn.Identity() for _, b in widths)

    def forward(self, x: Tensor, emb: Tensor, skips: list[Tensor] | None = None, keep: list[Tensor] | None = None) -> Tensor:
        for block, attn in zip(self.blocks, self.attn):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)
            x = attn(block(x, emb))
            if keep is not None:
                keep.append(x)
        return x


class DigitsUNet(nn.Module):
    """UNet ``F(c_in·x, c_noise, label)`` of the EDM preconditioning (Karras et al. 2022, eq. 7).

    Resolutions 8 → 4 → 2 with skip connections; labels 0..n_classes-1, and ``n_classes`` as the null
    label of classifier-free guidance (trained by dropping labels).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), blocks_per_level: int = 2,
                 attention_levels: Sequence[int] = (1, 2), emb_dim: int = 128, n_classes: int = 10,
                 dropout: float = 0.1, image_channels: int = 1):
        super().__init__()
        self.n_classes = n_classes
        self.noise_emb = NoiseEmbedding(emb_dim)
        self.label_emb = nn.Embedding(n_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(image_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_widths, width = [channels[0]], channels[0]
        for level, c in enumerate(channels):
            widths = [(width if i == 0 else c, c) for i in range(blocks_per_level)]
            self.down.append(Level(widths, emb_dim, dropout, level in attention_levels))
            width = c
            skip_widths += [c] * blocks_per_level
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_widths.append(c)
        self.mid = Level([(width, width), (width, width)], emb_dim, dropout, True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channels))):
            c = channels[level]
            widths = []
            for _ in range(blocks_per_level + 1):
                widths.append((width + skip_widths.pop(), c))
                width = c
            self.up.append(Level(widths, emb_dim, dropout, level in attention_levels))
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        emb = F.silu(self.noise_emb(c_noise) + self.label_emb(labels))
        h = self.conv_in(x)
        skips = [h]
        for level, down in enumerate(self.down):
            h = down(h, emb, keep=skips)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid(h, emb)
        for level, up in enumerate(self.up):
            h = up(h, emb, skips=skips)
            if level < len(self.upsample):
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """A small CNN for the 10 digit classes; ``features`` is its penultimate layer (the metric's space)."""

    def __init__(self, channels: Sequence[int] = (32, 64), feature_dim: int = 64, n_classes: int = 10,
                 dropout: float = 0.3, image_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        width = image_channels
        for c in channels:  # each stage halves the resolution: 8 -> 4 -> 2
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            width = c
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        spatial = 8 // 2 ** len(channels)
        self.penultimate = nn.Sequential(nn.Linear(width * spatial * spatial, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, n_classes))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features [B, feature_dim] of images in [-1, 1]."""
        return self.penultimate(self.trunk(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits [B, n_classes]."""
        return self.head(self.features(images))
