"""Embeddings of signed times and class labels for the small backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of a signed scalar per sample, shape (B,) -> (B, dim).

    ``sin`` is odd and ``cos`` even, so ``t`` and ``-t`` get different features: the sign
    (real versus fake trajectory, spec section 1) reaches the network.
    Values are scaled by 1000 first, so that [-1, 1] spans many periods.
    """
    if values.ndim != 1:
        raise ValueError(f"expected times of shape (B,), got {tuple(values.shape)}")
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half
    )
    angles = 1000.0 * values.float()[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
    return features


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 128):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, time: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(time, self.frequency_dim))


class ConditionEmbedding(nn.Module):
    """Embeds ``(t, r, label)`` into one vector.

    ``t`` (current time) and ``r`` (target time) get separate embeddings that are summed with a
    learned class embedding. Label ``num_classes`` is the null class used for guidance.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.time = TimeEmbedding(dim)
        self.target_time = TimeEmbedding(dim)
        self.label = nn.Embedding(num_classes + 1, dim)

    def forward(self, time: Tensor, target_time: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            labels = torch.full_like(time, self.num_classes, dtype=torch.long)
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return self.time(time) + self.target_time(target_time) + self.label(labels)
