"""Batch-dimension helpers for conditions of any shape.

A condition is whatever the backbone takes as its last argument: ``None``, a tensor whose first
dimension is the batch (class labels, text embeddings), or a dict of such tensors (embeddings
plus attention masks). The objective only ever slices and concatenates conditions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Condition = Any  # None | Tensor | dict[str, Tensor]


def select(condition: Condition, index: slice | Tensor) -> Condition:
    """The rows ``index`` of a condition."""
    if condition is None:
        return None
    if isinstance(condition, dict):
        return {key: select(value, index) for key, value in condition.items()}
    if isinstance(condition, Tensor):
        return condition[index]
    raise TypeError(f"conditions must be None, a tensor or a dict of tensors, got {type(condition).__name__}")


def concatenate(conditions: list[Condition]) -> Condition:
    """Concatenate conditions along the batch dimension."""
    first = conditions[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {key: concatenate([c[key] for c in conditions]) for key in first}
    return torch.cat(conditions, dim=0)


def batch_size(condition: Condition) -> int | None:
    """Batch size of a condition, or None when it has none."""
    if condition is None:
        return None
    if isinstance(condition, dict):
        sizes = {batch_size(value) for value in condition.values()}
        sizes.discard(None)
        return sizes.pop() if len(sizes) == 1 else None
    return condition.shape[0]
