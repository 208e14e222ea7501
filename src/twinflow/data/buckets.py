"""Aspect-ratio buckets: a few output sizes of about the same pixel count, and which one an image takes.

Centre-cropping every image to a square throws away much of a portrait or landscape picture.
With buckets (``CaptionedDataConfig(buckets=True)``) :func:`aspect_ratio_buckets` makes a small
fixed list of sizes with about ``image_size ** 2`` pixels and the aspect ratios
:data:`DEFAULT_BUCKET_RATIOS`, and :func:`nearest_bucket` sends each image to the size of the
nearest aspect ratio. Batches then come from one bucket at a time
(:class:`~twinflow.data.BucketBatches`), so every batch has one shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from twinflow.checks import is_integer

DEFAULT_BUCKET_RATIOS: tuple[float, ...] = (9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9)
"""Aspect ratios (width / height) of the default buckets: portrait 9:16 to landscape 16:9."""

DEFAULT_BUCKET_MULTIPLE = 16
"""Bucket sides are multiples of this: a VAE's 8x down-sampling times a transformer's 2x2 patches."""


def aspect_ratio_buckets(
    image_size: int,
    ratios: Sequence[float] = DEFAULT_BUCKET_RATIOS,
    multiple: int = DEFAULT_BUCKET_MULTIPLE,
) -> list[tuple[int, int]]:
    """Sizes ``(height, width)`` of about ``image_size ** 2`` pixels with aspect ratios ``ratios``.

    Each side is ``sqrt(image_size ** 2 * ratio)`` (width) or ``sqrt(image_size ** 2 / ratio)``
    (height) rounded to the nearest multiple of ``multiple`` (at least ``multiple``); sizes that
    coincide after rounding are listed once, in the order of ``ratios``.
    """
    area = image_size * image_size
    buckets: list[tuple[int, int]] = []
    for ratio in ratios:
        width = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
        height = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
        if (height, width) not in buckets:
            buckets.append((height, width))
    return buckets


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket ``(height, width)`` whose aspect ratio is nearest on a log scale (first on ties)."""
    log_ratio = math.log(width / height)
    distances = [abs(log_ratio - math.log(bucket_width / bucket_height)) for bucket_height, bucket_width in buckets]
    return int(np.argmin(distances))


def item_positions(index: int | Tensor | Sequence[int], length: int, owner: str, items: str = "items") -> int | list[int]:
    """What ``dataset[index]`` reads: one item's position (an ``int``; negative counts from the
    end) or a batch's positions (a ``list``), each checked against the ``length`` items."""
    if isinstance(index, Tensor) and index.ndim == 0:
        index = int(index)
    if is_integer(index):
        position = int(index)
        if not -length <= position < length:
            raise IndexError(f"index {position} is out of range for {length} {items}")
        return position % length
    positions = torch.as_tensor(index, dtype=torch.int64).flatten().tolist()
    if not positions:
        raise ValueError(f"{owner} needs at least one index")
    for position in positions:
        if not 0 <= position < length:
            raise IndexError(f"index {position} is out of range for {length} {items}")
    return positions

