"""Batch-dimension helpers for conditions of any structure.

A condition is whatever a backbone takes as its last argument: ``None``; a tensor whose first
dimension is the batch (class labels, text embeddings); a mapping of conditions (embeddings
plus attention masks); a tuple or list of tensors/mappings (``(embeddings, mask)``); or a
plain list with one entry per sample (prompts). The objective and the sampler only ever check,
slice and concatenate conditions, always through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

Condition = Any  # None | Tensor | Mapping[str, Condition] | tuple/list of those | per-sample list


def _is_structure(value: object) -> bool:
    """A tuple/list holding tensors, mappings or ``None`` (e.g. ``(embeddings, mask)``)."""
    return isinstance(value, (tuple, list)) and all(
        item is None or isinstance(item, (Tensor, Mapping)) or _is_structure(item) for item in value
    )


def check_batch(condition: Condition, batch: int, name: str = "cond") -> None:
    """Raise a ValueError naming ``name`` unless every part of the condition has ``batch`` rows."""
    if condition is None:
        return
    if isinstance(condition, Tensor):
        if condition.ndim == 0 or condition.shape[0] != batch:
            raise ValueError(f"{name} must have batch size {batch}, got shape {tuple(condition.shape)}")
    elif isinstance(condition, Mapping):
        for key, value in condition.items():
            check_batch(value, batch, f"{name}[{key!r}]")
    elif _is_structure(condition):
        for index, value in enumerate(condition):
            check_batch(value, batch, f"{name}[{index}]")
    elif isinstance(condition, (tuple, list)):  # one entry per sample
        if len(condition) != batch:
            raise ValueError(f"{name} must have {batch} entries, got {len(condition)}")
    else:
        raise ValueError(f"{name} must be None, a tensor, a mapping or a sequence, got {type(condition).__name__}")


def select(condition: Condition, index: slice | Tensor) -> Condition:
    """The rows ``index`` (a slice or an index tensor) of a condition."""
    if condition is None:
        return None
    if isinstance(condition, Tensor):
        return condition[index]
    if isinstance(condition, Mapping):
        return {key: select(value, index) for key, value in condition.items()}
    if _is_structure(condition):
        return type(condition)(select(value, index) for value in condition)
    if isinstance(condition, (tuple, list)):
        rows = range(len(condition))[index] if isinstance(index, slice) else index.tolist()
        return [condition[row] for row in rows]
    raise TypeError(f"cannot select rows of a condition of type {type(condition).__name__}")


def concatenate(conditions: list[Condition]) -> Condition:
    """Stack conditions of the same structure along the batch dimension."""
    first = conditions[0]
    if all(condition is None for condition in conditions):
        return None
    if all(isinstance(condition, Tensor) for condition in conditions):
        return torch.cat([condition.to(first.device) for condition in conditions], dim=0)
    if all(isinstance(condition, Mapping) for condition in conditions):
        for other in conditions[1:]:
            if set(other) != set(first):
                raise ValueError(f"conditions must have the same keys, got {sorted(first)} and {sorted(other)}")
        return {key: concatenate([condition[key] for condition in conditions]) for key in first}
    if all(_is_structure(condition) for condition in conditions) and len({len(c) for c in conditions}) == 1:
        return type(first)(concatenate(list(parts)) for parts in zip(*conditions))
    if all(isinstance(condition, (tuple, list)) for condition in conditions):
        return [entry for condition in conditions for entry in condition]
    kinds = ", ".join(type(condition).__name__ for condition in conditions)
    raise ValueError(f"cannot concatenate conditions of types {kinds}; use tensors, mappings or lists of them")
