"""The VAE latent normalisation both ways: what caching applies and generation undoes.

A family's pipeline normalises the VAE's latents before the transformer and undoes it before
decoding, inline in its ``__call__``. The rule comes from the VAE's config:

* ``AutoencoderKL`` (SD3, Flux, Z-Image): ``(z - shift_factor) * scaling_factor``
  (``shift_factor`` 0 when the config has none);
* VAEs with ``latents_mean`` / ``latents_std`` (``AutoencoderKLQwenImage``):
  ``(z - latents_mean) / latents_std`` per channel, times ``scaling_factor`` if the config also
  has one.

:class:`LatentNormalisation` is that rule, used by the latent cache
(:class:`twinflow.data.encoders.VaeEncoder`) and by every family's ``decode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def config_value(config: Any, key: str) -> Any:
    """``key`` of a diffusers config (a FrozenDict or an object), None when absent."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


class LatentNormalisation:
    """Raw VAE latents <-> the transformer's latents, from the VAE's config (module notes)."""

    def __init__(self, config: Any):
        mean, std = config_value(config, "latents_mean"), config_value(config, "latents_std")
        self.latents_mean = None if mean is None or std is None else [float(value) for value in mean]
        self.latents_std = None if mean is None or std is None else [float(value) for value in std]
        scaling, shift = config_value(config, "scaling_factor"), config_value(config, "shift_factor")
        self.scaling_factor = 1.0 if scaling is None else float(scaling)
        self.shift_factor = 0.0 if shift is None or self.latents_mean is not None else float(shift)

    @property
    def formula(self) -> str:
        if self.latents_mean is not None:
            return "(z - latents_mean) / latents_std * scaling_factor"
        return "(z - shift_factor) * scaling_factor"

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw VAE latents ``(B, c, ...)`` -> the transformer's latents."""
        if self.latents_mean is not None:
            mean, std = self._statistics(latents)
            return (latents - mean) / std * self.scaling_factor
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`: what the VAE's ``decode`` takes, in ``latents``' dtype."""
        if self.latents_mean is not None:
            mean, std = self._statistics(latents)
            return latents / self.scaling_factor * std + mean
        return latents / self.scaling_factor + self.shift_factor

    def _statistics(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        # Per channel (dimension 1), broadcast over the rest; made in float32 and then cast, so a
        # bfloat16 decode rounds the statistics once, as the pipelines do.
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(self.latents_std, dtype=torch.float32).view(shape).to(latents.device, latents.dtype)
        return mean, std


__all__ = ["LatentNormalisation", "config_value"]
