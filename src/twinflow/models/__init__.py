"""Backbones with the TwinFlow call contract ``model(x_t, t, r, cond)`` and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from twinflow.models.diffusers import DiffusersConfig, build_diffusers
from twinflow.models.unet import UNet, UNetConfig, count_parameters, unet_data_arguments


@dataclass(frozen=True)
class ModelKind:
    """One registered backbone: its config dataclass (what checkpoints store), what builds it
    from that config, and the config fields the training data decides unless the config fixes
    them (image geometry, class count), or None when the model decides them itself."""

    config: type
    build: Callable[..., nn.Module]
    data_arguments: Callable[[tuple[int, int, int], int], dict] | None = None


MODELS: dict[str, ModelKind] = {
    "unet": ModelKind(UNetConfig, UNet, unet_data_arguments),
    "diffusers": ModelKind(DiffusersConfig, build_diffusers),  # a pretrained transformer behind its TwinFlow adapter
}


def build_model(name: str, **config) -> nn.Module:
    """Build a registered backbone from keyword arguments of its config dataclass."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kind = MODELS[name]
    known = set(kind.config.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for {name!r}; known: {sorted(known)}")
    return kind.build(kind.config(**config))


__all__ = [
    "MODELS", "DiffusersConfig", "ModelKind", "UNet", "UNetConfig", "build_diffusers", "build_model", "count_parameters",
]
