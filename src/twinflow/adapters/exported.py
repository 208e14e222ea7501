"""The files a TwinFlow export adds to diffusers' own, and reading a LoRA export back.

An export (:func:`twinflow.train.export.export_diffusers`) is a diffusers folder; TwinFlow adds:

* ``twinflow.json`` (:data:`METADATA_FILE`) beside the transformer's ``config.json``: where the
  weights came from (checkpoint, step, model or EMA weights, LoRA merged or not) and how the
  model reads time, which diffusers' config cannot say (:func:`time_metadata`): whether it uses
  the single time embedding (spec section 4) and, for Z-Image, where the target time ``r = 0``
  lands on its reversed clock (``z_image_zero_time``, see :mod:`twinflow.adapters.z_image`).
  :func:`~twinflow.adapters.load_adapter` and :func:`load_lora_export` follow both, so an
  exported folder loads as it was trained without the caller knowing.
* For an unmerged LoRA export: ``pytorch_lora_weights.safetensors`` (:data:`LORA_WEIGHTS_FILE`,
  diffusers' pipeline LoRA format: keys ``transformer.*.lora_A.weight`` and the ``LoraConfig`` in
  the metadata, what ``pipe.load_lora_weights(folder)`` reads) and ``twinflow_extra_weights.safetensors``
  (:data:`EXTRA_WEIGHTS_FILE`, ``emb_2`` under its released names; absent for a single-embedding
  model). :func:`load_lora_export` puts both on the pretrained transformer again.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from twinflow.adapters.base import TransformerAdapter

__all__ = [
    "EXTRA_WEIGHTS_FILE", "LORA_WEIGHTS_FILE", "METADATA_FILE", "ZERO_TIME_KEY", "load_lora_export", "read_export_metadata",
    "recorded_zero_time", "time_metadata",
]

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA adapter
EXTRA_WEIGHTS_FILE = "twinflow_extra_weights.safetensors"
METADATA_FILE = "twinflow.json"
LORA_ADAPTER_NAME = "default"  # the PEFT adapter a loaded LoRA export becomes (active)
ZERO_TIME_KEY = "z_image_zero_time"  # in twinflow.json, as in a training config's model section


def read_export_metadata(folder: str | Path) -> dict[str, Any]:
    """``twinflow.json`` of a transformer folder or LoRA export; ``{}`` when there is none."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(metadata).__name__}")
    return metadata


def time_metadata(adapter: TransformerAdapter) -> dict[str, Any]:
    """What ``twinflow.json`` records about how ``adapter`` reads time: ``single_time_embedding``
    and, for Z-Image, :data:`ZERO_TIME_KEY` (its ``TimeConvention.zero_time``)."""
    record: dict[str, Any] = {"single_time_embedding": adapter.single_time_embedding}
    if adapter.family == "z_image":
        record[ZERO_TIME_KEY] = adapter.time_convention.zero_time
    return record


def recorded_zero_time(metadata: dict[str, Any], family: str | None) -> str:
    """The Z-Image ``zero_time`` an export's ``twinflow.json`` records; ``auto`` when there is no
    export (empty ``metadata``) or the family is not Z-Image. An export without the key predates
    the choice and was trained with the reference convention, the only one there was."""
    if family != "z_image" or not metadata:
        return "auto"
    return metadata.get(ZERO_TIME_KEY, "reference")


def check_lora_file(path: Path) -> None:
    """A LoRA weights file holds LoRA matrices (``...lora_A...`` / ``...lora_B...`` keys); other
    weights under its name would otherwise load as no adapter at all and leave the base model."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        keys = list(weights.keys())
    if not any(".lora_A." in key or ".lora_B." in key for key in keys):
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") if keys else "no tensors"
        raise ValueError(f"{path} holds no LoRA weights (keys like '<module>.lora_A.weight' expected; found {shown})")


def load_lora_export(
    base: str | Path, export: str | Path, *, z_image_zero_time: str = "auto", extra_weights: str | Path | None = None,
    **from_pretrained: Any,
) -> TransformerAdapter:
    """The adapter of the pretrained folder ``base`` (a transformer or pipeline folder) with a
    LoRA on it: the PEFT adapter ``default`` (active) and the trained ``emb_2``.

    ``export`` is a LoRA export of ``twinflow export`` (a folder: the LoRA file and ``emb_2``; one
    without ``emb_2`` comes from a single-time-embedding run and gives that adapter), or a LoRA
    file in diffusers' format (``transformer.<module>.lora_A.weight``, as ``--format comfyui``
    writes it). ``extra_weights``: a patch file of ``emb_2`` (any layout of
    :mod:`twinflow.adapters.weights`) used instead of the export's; with a bare LoRA file and no
    patch, ``base``'s own extra weights are used, as :func:`~twinflow.adapters.load_adapter` finds
    them. A Z-Image model reads ``r = 0`` as the export's ``twinflow.json`` (or the patch's
    metadata) records, unless ``z_image_zero_time`` (``reference`` / ``data``) says otherwise.
    ``from_pretrained`` goes to the transformer's ``from_pretrained`` (``dtype``, ...)."""
    from twinflow.adapters.registry import load_adapter
    from twinflow.adapters.weights import load_extra_weights

    export = Path(export)
    lora_file = export if export.is_file() else export / LORA_WEIGHTS_FILE
    if not lora_file.is_file():
        raise FileNotFoundError(f"{export} is not a LoRA export: it has no {LORA_WEIGHTS_FILE}")
    check_lora_file(lora_file)
    if export.is_file() or extra_weights is not None:
        # emb_2 from the patch file; a bare LoRA file without one: from the base folder
        adapter = load_adapter(base, extra_weights=extra_weights, z_image_zero_time=z_image_zero_time, **from_pretrained)
    else:
        extra = export / EXTRA_WEIGHTS_FILE
        if z_image_zero_time == "auto":
            metadata = read_export_metadata(export)
            z_image_zero_time = recorded_zero_time(metadata, metadata.get("family"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # emb_2 is copy-initialised, then overwritten just below
            adapter = load_adapter(
                base, single_time_embedding=not extra.is_file(), z_image_zero_time=z_image_zero_time, **from_pretrained
            )
        if extra.is_file():
            load_extra_weights(adapter, extra)
    adapter.transformer.load_lora_adapter(
        str(lora_file.parent), prefix="transformer", weight_name=lora_file.name, adapter_name=LORA_ADAPTER_NAME
    )
    return adapter
