"""The files a TwinFlow export adds to diffusers' own, and reading a LoRA export back.

An export (:func:`twinflow.train.export.export_diffusers`) is a diffusers folder; TwinFlow adds:

* ``twinflow.json`` (:data:`METADATA_FILE`) beside the transformer's ``config.json``: where the
  weights came from (checkpoint, step, model or EMA weights, LoRA merged or not) and whether the
  model uses the single time embedding (spec section 4), which diffusers' config cannot say.
  :func:`~twinflow.adapters.load_adapter` reads the latter, so an exported folder loads as it
  was trained without the caller knowing.
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

__all__ = ["EXTRA_WEIGHTS_FILE", "LORA_WEIGHTS_FILE", "METADATA_FILE", "load_lora_export", "read_metadata"]

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA adapter
EXTRA_WEIGHTS_FILE = "twinflow_extra_weights.safetensors"
METADATA_FILE = "twinflow.json"
LORA_ADAPTER_NAME = "default"  # the PEFT adapter a loaded LoRA export becomes (active)


def read_metadata(folder: str | Path) -> dict[str, Any]:
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


def load_lora_export(base: str | Path, export: str | Path, **from_pretrained: Any) -> TransformerAdapter:
    """The adapter of the pretrained folder ``base`` (a transformer or pipeline folder) with a
    LoRA export on it: the PEFT adapter ``default`` (active) and the exported ``emb_2``. An export
    without ``emb_2`` comes from a single-time-embedding run and gives that adapter.
    ``from_pretrained`` goes to the transformer's ``from_pretrained`` (``dtype``, ...)."""
    from twinflow.adapters.registry import load_adapter
    from twinflow.adapters.weights import load_extra_weights

    export = Path(export)
    if not (export / LORA_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{export} is not a LoRA export: it has no {LORA_WEIGHTS_FILE}")
    extra = export / EXTRA_WEIGHTS_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 is copy-initialised, then overwritten just below
        adapter = load_adapter(base, single_time_embedding=not extra.is_file(), **from_pretrained)
    if extra.is_file():
        load_extra_weights(adapter, extra)
    adapter.transformer.load_lora_adapter(
        str(export), prefix="transformer", weight_name=LORA_WEIGHTS_FILE, adapter_name=LORA_ADAPTER_NAME
    )
    return adapter
