"""The network a config trains: the registered backbone, fitted to the data, plus training options.

The backbone comes from the one registry, :data:`twinflow.models.MODELS`: the U-Net takes its
image geometry and class count from the data unless the config fixes them; a diffusers
transformer comes from its folder (:mod:`twinflow.models.diffusers`). ``training.gradient_checkpointing`` then switches on
diffusers' activation checkpointing and ``training.lora`` injects the LoRA adapters
(:mod:`twinflow.train.lora`). Returns the model and the ``architecture`` record that
every checkpoint stores (enough to rebuild the network for sampling or export).
"""

from __future__ import annotations

import warnings

from torch import nn

from twinflow.models import MODELS, build_model
from twinflow.train.config import model_arguments
from twinflow.train.data import TrainingData
from twinflow.train.lora import apply_lora


def build_network(name: str, arguments: dict, data: TrainingData) -> tuple[nn.Module, dict]:
    """The registered backbone ``name`` fitted to the data, and its ``architecture`` record."""
    kind = MODELS[name]
    if kind.data_arguments is not None:  # the data decides these unless the config fixes them
        arguments = {**kind.data_arguments(data.image_shape, data.num_classes), **arguments}
    model = build_model(name, **arguments)
    architecture = {"name": name, "config": model.config.to_dict()}
    if getattr(model, "family", None) is not None:
        architecture["family"] = model.family
    return model, architecture


def build_backbone(config: dict, data: TrainingData) -> tuple[nn.Module, dict]:
    """``(model, architecture)`` for ``config["model"]`` and the training data."""
    name, arguments = model_arguments(config)
    model, architecture = build_network(name, arguments, data)
    finish_backbone(model, config["training"], architecture)
    return model, architecture


def finish_backbone(model: nn.Module, training: dict, architecture: dict | None = None) -> None:
    """What training adds to a built backbone (a run, and a dry run on the meta device):
    gradient checkpointing, then the LoRA adapters or the frozen gradient-free modules."""
    if training["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    if training["lora"] is not None:
        # The EMA teacher of a LoRA run is a second adapter (see twinflow.train.lora).
        apply_lora(model, training["lora"], ema=float(training["ema_decay"]) > 0)
        if architecture is not None:
            architecture["lora"] = training["lora"]
            architecture["ema_adapter"] = float(training["ema_decay"]) > 0
    else:
        freeze_modules_without_gradient(model)


def freeze_modules_without_gradient(model: nn.Module) -> list[str]:
    """Freeze what a family declares never gets a gradient (its outputs are discarded, e.g.
    Qwen-Image's last text-stream modules), so that DDP's reducer does not wait for it and the
    optimizer holds no state for it; their values are unchanged, as training would leave them.
    Returns the frozen module names."""
    names = model.modules_without_gradient() if hasattr(model, "modules_without_gradient") else []
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    return names


def model_from_architecture(architecture: dict, **config_overrides) -> nn.Module:
    """The network a checkpoint's ``architecture`` record describes, before its weights are
    loaded: the backbone (``config_overrides`` replace fields of its config) and, for a LoRA
    run, its adapters. A diffusers ``emb_2`` starts as a copy, without the notice: the
    checkpoint's weights overwrite it. A Z-Image model reads ``r = 0`` as the recorded
    ``z_image_zero_time`` says (resolved when the run started); a record without it predates
    the choice and was trained with the reference convention."""
    config = {**architecture["config"], **config_overrides}
    if architecture["name"] == "diffusers" and architecture.get("family") == "z_image":
        config.setdefault("z_image_zero_time", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(architecture["name"], **config)
    if architecture.get("lora") is not None:
        apply_lora(model, architecture["lora"], ema=bool(architecture.get("ema_adapter")))
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """diffusers' ``enable_gradient_checkpointing`` on the adapted transformer."""
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "enable_gradient_checkpointing"):
        raise ValueError(
            f"training.gradient_checkpointing needs a diffusers transformer (model.name: diffusers), got {type(model).__name__}"
        )
    transformer.enable_gradient_checkpointing()
