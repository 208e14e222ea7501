"""A pretrained diffusers transformer as a registered backbone (``model.name: diffusers``).

The model is the family's TwinFlow adapter (:mod:`twinflow.adapters`) around the transformer
read from ``path`` with :func:`~twinflow.adapters.load_adapter`: a diffusers transformer folder
or a pipeline folder with ``transformer/``. A folder that already holds the TwinFlow extra
weights (a TwinFlow checkpoint, or one written by :func:`twinflow.train.export.export_diffusers`)
starts from them; otherwise the second time embedding is a copy of the first (spec section 4).

``dtype: bf16`` keeps the pretrained weights in bfloat16, which halves their memory (a 20B
Qwen-Image base: 40 GB instead of 80 GB). It is meant for a frozen base under LoRA: the
adapters, and a trained second embedding, stay float32 (:func:`twinflow.train.lora.apply_lora`),
and the configuration checks refuse it for full-parameter training, where the optimizer needs
float32 weights.

``z_image_zero_time`` (Z-Image only) is where the target time ``r = 0`` lands on Z-Image's
reversed clock (spec section 5, :mod:`twinflow.adapters.z_image`): ``reference`` as the released
TwinFlow-Z-Image checkpoints, ``data`` (continuous at ``r = 0``) for models trained here. A model
keeps the convention it was trained with, so ``auto`` follows the weights at ``path`` (a base
transformer: ``data``; a released checkpoint: ``reference``; an export: what its
``twinflow.json`` records) and the built model's config holds the resolved value: the
``architecture`` of every training checkpoint records it, and export, sampling and the
consolidation of sharded checkpoints rebuild the model with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DiffusersConfig:
    """Where the transformer comes from.

    Attributes:
        path: a diffusers transformer folder, or a pipeline folder with ``transformer/``.
        family: ``auto`` (from the transformer's class) or one of ``qwen_image``, ``z_image``,
            ``sd3``, ``flux``; a named family must match the folder's class.
        single_time_embedding: the reference's LoRA variant (spec section 4): no second time
            embedding, the model's own one receives ``t - r/2``.
        dtype: ``fp32`` or ``bf16``: the dtype of the pretrained weights in memory (see above).
        z_image_zero_time: ``auto``, ``reference`` or ``data`` (see above); a Z-Image model's
            config holds the resolved value. Other families have no reversed clock: only
            ``auto`` is accepted for them.
    """

    path: str | None = None
    family: str = "auto"
    single_time_embedding: bool = False
    dtype: str = "fp32"
    z_image_zero_time: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def build_diffusers(config: DiffusersConfig, weights: bool = True) -> nn.Module:
    """The adapter of the transformer at ``config.path``; ``weights=False`` builds it on the meta
    device from the folder's ``config.json`` alone (a dry run: nothing read or allocated)."""
    from twinflow.adapters import ADAPTERS, ZERO_TIMES, load_adapter, transformer_family

    if not config.path:
        raise ValueError("model.path is required for model.name=diffusers (a diffusers transformer folder)")
    if config.family != "auto" and config.family not in ADAPTERS:
        raise ValueError(f"model.family must be 'auto' or one of {sorted(ADAPTERS)}, got {config.family!r}")
    if not isinstance(config.single_time_embedding, bool):
        raise ValueError(f"model.single_time_embedding must be true or false, got {config.single_time_embedding!r}")
    if config.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(WEIGHT_DTYPES)}, got {config.dtype!r}")
    if config.z_image_zero_time not in ("auto", *ZERO_TIMES):
        raise ValueError(
            f"model.z_image_zero_time must be 'auto' or one of {list(ZERO_TIMES)}, got {config.z_image_zero_time!r}"
        )
    if config.z_image_zero_time != "auto" and (family := transformer_family(config.path)) != "z_image":
        raise ValueError(
            f"model.z_image_zero_time applies to Z-Image's reversed clock only; {config.path} holds a {family} "
            "transformer: leave it at auto"
        )
    adapter = load_adapter(
        config.path, single_time_embedding=config.single_time_embedding, z_image_zero_time=config.z_image_zero_time,
        weights=weights, dtype=WEIGHT_DTYPES[config.dtype],
    )
    if config.family != "auto" and adapter.family != config.family:
        raise ValueError(f"model.family is {config.family!r} but {config.path} holds a {adapter.family} transformer")
    if adapter.family == "z_image":  # recorded resolved: the architecture rebuilds this convention
        config = replace(config, z_image_zero_time=adapter.time_convention.zero_time)
    # diffusers' from_pretrained returns fp32 weights in eval mode; the loop switches to train().
    adapter.config = config
    return adapter
