"""The text condition's format, shared by every family, the latent cache and embeddings files.

A prompt condition is a dict of tensors with a batch dimension, the keys the adapter takes:
``prompt_embeds`` (B, L, D) with ``prompt_embeds_mask`` (B, L) for the masked families
(Qwen-Image, Z-Image), and ``prompt_embeds`` (B, L, D) with ``pooled_prompt_embeds`` (B, P) for
SD3 and Flux. Masked conditions are right-padded with zeros, so rows encoded in different
batches can be stacked (:func:`pad_to_length`) and a batch's own padding dropped again
(:func:`trim_padding`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

EMBEDS = "prompt_embeds"
MASK = "prompt_embeds_mask"
POOLED = "pooled_prompt_embeds"


def pad_tokens(tensor: Tensor, length: int) -> Tensor:
    """Right-pad the token dimension (dimension 1) of ``tensor`` with zeros to ``length``; the
    one padding rule of embeddings and masks alike (a bool mask pads with False)."""
    missing = length - tensor.shape[1]
    if missing < 0:
        raise ValueError(f"cannot pad {tensor.shape[1]} tokens to {length}")
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])], dim=1)


def pad_rows(rows: Sequence[Tensor]) -> dict[str, Tensor]:
    """Variable-length (L_i, D) embeddings -> right-padded ``prompt_embeds`` (N, L, D) and mask (N, L)."""
    length = max(row.shape[0] for row in rows)
    embeds = torch.cat([pad_tokens(row.unsqueeze(0), length) for row in rows])
    mask = torch.cat([pad_tokens(row.new_ones(1, row.shape[0], dtype=torch.long), length) for row in rows])
    return {EMBEDS: embeds, MASK: mask}


def pad_to_length(condition: Mapping[str, Tensor], length: int) -> dict[str, Tensor]:
    """Right-pad a masked condition's embeddings and mask with zeros to ``length`` tokens."""
    condition = dict(condition)
    if MASK not in condition:
        if condition[EMBEDS].shape[1] != length:
            raise ValueError(
                f"prompt embeddings of {condition[EMBEDS].shape[1]} and {length} tokens cannot be "
                "stacked without a prompt_embeds_mask"
            )
        return condition
    for key in (EMBEDS, MASK):
        condition[key] = pad_tokens(condition[key], length)
    return condition


def trim_padding(condition: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop trailing token positions that every row masks out (right padding)."""
    condition = dict(condition)
    if MASK not in condition:
        return condition
    mask = condition[MASK].bool()
    valid = mask.any(dim=0).nonzero()
    length = int(valid.max()) + 1 if valid.numel() else 1
    if length < mask.shape[1]:
        condition[EMBEDS], condition[MASK] = condition[EMBEDS][:, :length], condition[MASK][:, :length]
    return condition


__all__ = ["EMBEDS", "MASK", "POOLED", "pad_rows", "pad_to_length", "pad_tokens", "trim_padding"]
