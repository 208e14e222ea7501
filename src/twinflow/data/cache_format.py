"""The on-disk format of a latent cache: file names, tensor keys, and the row padding rule.

:mod:`twinflow.data.cache_writer` writes this format and :mod:`twinflow.data.cache_reader`
reads it; both take every name from here, so the two cannot drift apart.

Layout of a cache folder::

    index.json                 counts, shapes, dtypes, source, encoder, captions
    null_condition.safetensors optional: the encoded empty prompt, one row per key
                               (``cache_dataset(..., null_prompt="")`` or ``cache_null_condition``);
                               edits store a null condition per item instead (``null.*`` keys)
    shard_00000.safetensors    "latents" (n, ...) and one tensor per condition key (n, ...);
    shard_00001.safetensors    metadata "twinflow": JSON of the shard's captions and source indices
    ...

Shards hold items of one latent shape only (a new shard starts at every aspect-ratio bucket
change). Condition tensors whose lengths differ (dimension 1, e.g. prompt tokens) are
right-padded with zeros to the longest, within a shard when it is written and across shards
when it is read (:func:`concatenate_rows`). Zeros are also what a ``*_mask`` tensor uses for
padding, so masked encoders stay exact.

While a cache is written it lives in ``<folder>.partial/`` beside a ``plan.json``
(:func:`partial_folder`); the finished folder never holds the plan.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from twinflow.families.prompts import pad_tokens

CACHE_FORMAT = "twinflow-latent-cache"
"""The ``format`` entry of every cache index."""

CACHE_VERSION = 1
"""The layout version; :class:`~twinflow.data.CachedLatents` refuses other versions."""

INDEX_FILE = "index.json"
NULL_CONDITION_FILE = "null_condition.safetensors"
"""The empty-prompt condition (one row per key), the null condition of training-time guidance."""
PLAN_FILE = "plan.json"
PARTIAL_SUFFIX = ".partial"
LATENTS_KEY = "latents"
"""The tensor name of the latents in every shard; condition keys may not use it."""

ITEM_NULL_PREFIX = "null."
"""Condition keys under this prefix are each item's own null condition (edits: the null prompt
encoded with the item's source images); keys without a null twin (the source latents) are
shared by the condition and the null condition (:func:`split_item_null`)."""

SHARD_METADATA_KEY = "twinflow"
"""The shard metadata entry: JSON ``{"captions": [...], "source_indices": [...]}`` of its items."""


def shard_name(number: int) -> str:
    """The file name of shard ``number``: ``shard_00000.safetensors``, ..."""
    return f"shard_{number:05d}.safetensors"


def partial_folder(root: Path) -> Path:
    """Where the cache ``root`` is written until it is complete: ``<root>.partial``."""
    return root.with_name(root.name + PARTIAL_SUFFIX)


def split_item_null(condition: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """``(condition, null condition)`` of cached rows that carry their own null condition
    (:data:`ITEM_NULL_PREFIX`), else ``(condition, None)``."""
    null = {key.removeprefix(ITEM_NULL_PREFIX): value for key, value in condition.items() if key.startswith(ITEM_NULL_PREFIX)}
    if not null:
        return condition, None
    condition = {key: value for key, value in condition.items() if not key.startswith(ITEM_NULL_PREFIX)}
    return condition, {key: null.get(key, value) for key, value in condition.items()}


def concatenate_rows(parts: list[Tensor], key: str) -> Tensor:
    """Concatenate along dimension 0, right-padding dimension 1 with zeros where lengths differ."""
    if len(parts) == 1:
        return parts[0]
    shapes = {tuple(part.shape[1:]) for part in parts}
    dtypes = {part.dtype for part in parts}
    if len(dtypes) > 1:
        raise ValueError(f"{key!r} has several dtypes {sorted(str(dtype) for dtype in dtypes)}")
    if len(shapes) > 1:
        if len({len(shape) for shape in shapes}) > 1 or len({shape[1:] for shape in shapes}) > 1:
            raise ValueError(f"{key!r} has per-item shapes {sorted(shapes)} that differ beyond dimension 1")
        length = max(shape[0] for shape in shapes)
        parts = [pad_tokens(part, length) for part in parts]
    return torch.cat(parts)
