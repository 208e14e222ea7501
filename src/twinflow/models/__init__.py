"""Backbones with the TwinFlow call contract ``model(x_t, t, r, cond)`` and their registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from twinflow.models.diffusers import DiffusersConfig, build_diffusers
from twinflow.models.unet import UNet, UNetConfig, count_parameters

# name -> (config class, model class or builder); configs are plain dataclasses so checkpoints can store them.
MODELS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "diffusers": (DiffusersConfig, build_diffusers),  # a pretrained transformer behind its TwinFlow adapter
}


def build_model(name: str, **config) -> nn.Module:
    """Build a registered backbone from keyword arguments of its config dataclass."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    config_class, model_class = MODELS[name]
    known = set(config_class.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for {name!r}; known: {sorted(known)}")
    return model_class(config_class(**config))


__all__ = ["MODELS", "DiffusersConfig", "UNet", "UNetConfig", "build_diffusers", "build_model", "count_parameters"]
