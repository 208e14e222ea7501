"""A compact conditional U-Net for small images (28x28 MNIST and the like).

Why this shape: on a CPU the cost of a convolution grows with the number of pixels, so the
network never works at full resolution. A 2x2 pixel-unshuffle stem folds 28x28x1 into
14x14x4, the U-Net works at 14x14 and 7x7, and a pixel-shuffle head unfolds the output.
Every block is modulated (scale and shift of its normalisation) by one embedding of the
signed time ``t``, the signed target time ``r`` and the class label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from twinflow.models.embeddings import ConditionEmbedding


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; stored in checkpoints so a model can be rebuilt."""

    image_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    patch_size: int = 2  # pixel-unshuffle factor of the stem
    channels: tuple[int, ...] = (64, 128)  # one entry per resolution level
    blocks_per_level: int = 2
    embedding_dim: int = 256
    attention_heads: int = 4  # self-attention at the lowest resolution; 0 disables it
    groups: int = 16  # GroupNorm groups

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        working_size = self.image_size // self.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if working_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(
                f"image_size / patch_size = {working_size} must be divisible by "
                f"2 ** (len(channels) - 1) = {2 ** (len(self.channels) - 1)}"
            )
        for width in self.channels:
            if width % self.groups:
                raise ValueError(f"every entry of channels {self.channels} must divide by groups={self.groups}")

    def to_dict(self) -> dict:
        config = asdict(self)
        config["channels"] = list(self.channels)
        return config


def unet_data_arguments(image_shape: tuple[int, int, int], num_classes: int) -> dict:
    """The :class:`UNetConfig` fields a data set decides: its image geometry and class count."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"the backbone needs square images, the data set has {height}x{width}")
    return {"image_channels": channels, "image_size": height, "num_classes": num_classes}


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second normalisation modulated by the embedding."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.modulation = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm_out = nn.GroupNorm(groups, out_channels, affine=False)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        hidden = self.conv_in(functional.silu(self.norm_in(x)))
        scale, shift = self.modulation(embedding)[:, :, None, None].chunk(2, dim=1)
        hidden = self.norm_out(hidden) * (1 + scale) + shift
        hidden = self.conv_out(functional.silu(hidden))
        return self.skip(x) + hidden


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a (low-resolution) feature map."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        query, key, value = (part.transpose(-1, -2) for part in qkv.unbind(1))
        attended = functional.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.out(attended)


class UNet(nn.Module):
    """TwinFlow backbone ``F(x_t, t, r, labels)`` for small images.

    Args of ``forward``: ``x`` (B, C, H, W); ``time`` (B,) signed current time ``t``;
    ``target_time`` (B,) signed target time ``r``; ``labels`` (B,) int64 with
    ``num_classes`` as the null class (or None for all-null).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths, groups, dim = config.channels, config.groups, config.embedding_dim
        patch_channels = config.image_channels * config.patch_size**2
        self.condition = ConditionEmbedding(dim, config.num_classes)
        self.stem = nn.Conv2d(patch_channels, widths[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_widths = []
        width = widths[0]
        for level, level_width in enumerate(widths):
            for _ in range(config.blocks_per_level):
                self.down_blocks.append(ResidualBlock(width, level_width, dim, groups))
                width = level_width
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.downsamplers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.middle_in = ResidualBlock(width, width, dim, groups)
        self.attention = (
            SelfAttention(width, config.attention_heads, groups) if config.attention_heads else None
        )
        self.middle_out = ResidualBlock(width, width, dim, groups)

        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, level_width in reversed(list(enumerate(widths))):
            for _ in range(config.blocks_per_level):
                self.up_blocks.append(ResidualBlock(width + skip_widths.pop(), level_width, dim, groups))
                width = level_width
            if level > 0:
                self.upsamplers.append(nn.Conv2d(width, widths[level - 1], 3, padding=1))
                width = widths[level - 1]

        self.head_norm = nn.GroupNorm(groups, width)
        self.head = nn.Conv2d(width, patch_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, time: Tensor, target_time: Tensor, labels: Tensor | None = None) -> Tensor:
        expected = (self.config.image_channels, self.config.image_size, self.config.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        embedding = functional.silu(self.condition(time, target_time, labels))
        hidden = self.stem(functional.pixel_unshuffle(x, self.config.patch_size))

        skips = []
        blocks = iter(self.down_blocks)
        for level in range(len(self.config.channels)):
            for _ in range(self.config.blocks_per_level):
                hidden = next(blocks)(hidden, embedding)
                skips.append(hidden)
            if level < len(self.downsamplers):
                hidden = self.downsamplers[level](hidden)

        hidden = self.middle_in(hidden, embedding)
        if self.attention is not None:
            hidden = self.attention(hidden)
        hidden = self.middle_out(hidden, embedding)

        blocks = iter(self.up_blocks)
        for level in range(len(self.config.channels)):
            for _ in range(self.config.blocks_per_level):
                hidden = next(blocks)(torch.cat([hidden, skips.pop()], dim=1), embedding)
            if level < len(self.upsamplers):
                hidden = functional.interpolate(hidden, scale_factor=2.0, mode="nearest")
                hidden = self.upsamplers[level](hidden)

        output = self.head(functional.silu(self.head_norm(hidden)))
        return functional.pixel_shuffle(output, self.config.patch_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)

