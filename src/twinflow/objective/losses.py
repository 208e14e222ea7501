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
    """Mean squared error per sample, shape (B,), computed in float32 (bf16 inputs included)."""
    return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)


def per_sample_loss(prediction: Tensor, target: Tensor, kind: str = "l2", barron_constant: float = 1e-3) -> Tensor:
    """L2 mean per sample, or the reference's Barron-style robust reweighting (spec 2.7).

    The robust form (alpha = 1) is ``mse / (c * sqrt(mse / (c^2 + 1e-8) + 1))`` with the
    square root *detached*: its gradient is the L2 gradient rescaled per sample (about
    ``1 / sqrt(mse)`` once ``mse >> c^2``), so outliers cannot dominate a large-model batch.
    The ``1e-8`` is the reference's (``barron_reweighting_loss`` in its ``twinflow.py``).
    """
    mse = squared_error(prediction, target)
    if kind == "l2":
        return mse
    if kind == "barron":
        weight = torch.rsqrt(mse.detach() / (barron_constant**2 + 1e-8) + 1)
        return mse * weight / barron_constant
    raise ValueError(f"unknown loss {kind!r}; choose 'l2' or 'barron'")
