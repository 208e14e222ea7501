"""Explicit random streams: every draw in the package goes through a ``torch.Generator``.

A generator lives on one device. Drawing on the generator's device and moving the result keeps
runs reproducible across CPU and CUDA (the same seed gives the same noise on both), at the
price of a copy when the two differ; pass a CUDA generator to draw directly on the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


Generators = torch.Generator | list[torch.Generator] | None
"""One generator, one per sample (row ``i`` drawn from generator ``i``), or ``None`` (global RNG)."""


def randn_like(like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise with ``like``'s shape, dtype and device.

    With a list of generators, one per row of ``like``, each row comes from its own stream, so a
    sample's noise does not depend on the batch it is in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([randn_like(like[index : index + 1], item) for index, item in enumerate(generator)])
    device = generator.device if generator is not None else like.device
    # Half-precision tensors get float32 noise, rounded after: the stream stays the same.
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=dtype)
    return noise.to(device=like.device, dtype=like.dtype)


def rand(count: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``count`` uniform numbers in [0, 1) with ``like``'s dtype and device."""
    device = generator.device if generator is not None else like.device
    values = torch.rand(count, generator=generator, device=device, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)
