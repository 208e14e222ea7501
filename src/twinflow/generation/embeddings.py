"""Precomputed prompt conditions: stacking and selecting rows, and a safetensors file format.

Encoding prompts needs the text encoder (7B parameters for Qwen-Image); generating from stored
conditions does not, so a small GPU can generate from a file encoded elsewhere. A file holds
the condition tensors under their own names (``prompt_embeds``, ...), optionally the empty
prompt's condition under ``null.<name>`` (the null condition of classifier-free guidance), and
in its metadata the prompts (JSON) and the model family.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from twinflow.families.prompts import EMBEDS, pad_to_length

__all__ = ["PromptEmbeddings", "concatenate_conditions", "load_embeddings", "save_embeddings", "select_rows"]

NULL_PREFIX = "null."
SUFFIX = ".safetensors"


@dataclass
class PromptEmbeddings:
    """Encoded prompts, as :func:`load_embeddings` returns them.

    Attributes:
        conditions: the condition tensors, batch dimension N first (one row per prompt).
        prompts: the N prompts they were encoded from, when known.
        null_condition: the empty prompt's condition (batch 1), for classifier-free guidance.
        family: the model family they were encoded for (``z_image``, ``sd3``, ...), when known.
    """

    conditions: dict[str, Tensor]
    prompts: list[str] | None = None
    null_condition: dict[str, Tensor] | None = None
    family: str | None = None

    def __len__(self) -> int:
        return _rows(self.conditions)


def _rows(condition: Mapping[str, Tensor]) -> int:
    counts = {key: value.shape[0] for key, value in condition.items()}
    if not counts or len(set(counts.values())) != 1:
        raise ValueError(f"a condition needs tensors with one common batch size, got {counts}")
    return next(iter(counts.values()))


def concatenate_conditions(conditions: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack conditions along the batch, padding masked ones to the longest."""
    keys = set(conditions[0])
    if any(set(condition) != keys for condition in conditions):
        raise ValueError(f"conditions must have the same keys, got {[sorted(c) for c in conditions]}")
    length = max(condition[EMBEDS].shape[1] for condition in conditions)
    padded = [pad_to_length(condition, length) for condition in conditions]
    return {key: torch.cat([condition[key] for condition in padded]) for key in conditions[0]}


def select_rows(condition: Mapping[str, Tensor], rows: slice | Sequence[int]) -> dict[str, Tensor]:
    """The rows ``rows`` of every tensor of a condition."""
    index = rows if isinstance(rows, slice) else torch.as_tensor(list(rows), dtype=torch.long)
    return {key: value[index] for key, value in condition.items()}


def save_embeddings(
    path: str | Path,
    conditions: Mapping[str, Tensor],
    prompts: Sequence[str] | None = None,
    *,
    null_condition: Mapping[str, Tensor] | None = None,
    family: str | None = None,
) -> Path:
    """Write conditions (and the prompts, in the metadata) to a safetensors file; returns the path.

    ``null_condition``, the empty prompt's condition, makes the file usable with guidance
    without a text encoder.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"embeddings are saved as safetensors; the file name must end in {SUFFIX}, got {path}")
    rows = _rows(conditions)
    if prompts is not None and len(prompts) != rows:
        raise ValueError(f"{len(prompts)} prompts for {rows} rows of embeddings")
    if any(key.startswith(NULL_PREFIX) for key in conditions):
        raise ValueError(f"condition names may not start with {NULL_PREFIX!r}")
    tensors = {key: value for key, value in conditions.items()}
    if null_condition is not None:
        if set(null_condition) != set(conditions):
            raise ValueError(f"null_condition keys {sorted(null_condition)} differ from {sorted(conditions)}")
        tensors.update({NULL_PREFIX + key: value for key, value in null_condition.items()})
    from twinflow import __version__

    metadata = {"format": "pt", "twinflow_version": __version__}
    if prompts is not None:
        metadata["twinflow_prompts"] = json.dumps(list(prompts))
    if family is not None:
        metadata["twinflow_family"] = family
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def load_embeddings(path: str | Path) -> PromptEmbeddings:
    """Read a file written by :func:`save_embeddings`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embeddings file at {path}")
    if path.suffix != SUFFIX:
        raise ValueError(f"embeddings are read from safetensors files only, got {path}")
    conditions, null = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            if key.startswith(NULL_PREFIX):
                null[key[len(NULL_PREFIX):]] = handle.get_tensor(key)
            else:
                conditions[key] = handle.get_tensor(key)
    if not conditions:
        raise ValueError(f"{path} holds no prompt embeddings")
    prompts = json.loads(metadata["twinflow_prompts"]) if "twinflow_prompts" in metadata else None
    return PromptEmbeddings(conditions, prompts, null or None, metadata.get("twinflow_family"))
