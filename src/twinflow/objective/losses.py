"""Per-sample loss shapes and the time weighting (spec 2.7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def time_weight(time: Tensor, target_time: Tensor) -> Tensor:
    """``tan((1 - (|t| - |r|)) * pi / 2.5) + 1``: small jumps weigh more (about 4.1 at r = t, 1 at t - r = 1)."""
    gap = time.abs() - target_time.abs()
    return torch.tan((1 - gap) * math.pi / 2.5) + 1


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, shape (B,)."""
    return (prediction - target).square().flatten(1).mean(dim=1)


def per_sample_loss(prediction: Tensor, target: Tensor, kind: str = "l2", barron_constant: float = 1e-3) -> Tensor:
    """L2 mean per sample, or the Barron-style robust form ``mse / sqrt(mse + c^2)``.

    The robust form divides by a *detached* ``sqrt(mse + c^2)`` (alpha = 1): its gradient is the
    L2 gradient rescaled per sample, so outliers cannot dominate a large-model batch.
    """
    mse = squared_error(prediction, target)
    if kind == "l2":
        return mse
    if kind == "barron":
        return mse / torch.sqrt(mse.detach() + barron_constant**2)
    raise ValueError(f"unknown loss {kind!r}; choose 'l2' or 'barron'")
