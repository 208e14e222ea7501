"""Flux (``FluxTransformer2DModel``) as a TwinFlow backbone (spec section 5: "same pattern").

diffusers 0.42 facts this relies on:

* ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
  txt_ids, guidance, ...)`` multiplies ``timestep`` (and ``guidance``) by 1000 itself, then calls
  ``self.time_text_embed(timestep, pooled_projections)``, or
  ``self.time_text_embed(timestep, guidance, pooled_projections)`` for guidance-distilled
  models (``guidance_embeds=True``, e.g. FLUX.1-dev);
* latents are packed 2 x 2 like Qwen-Image; ``img_ids`` are (H/2 * W/2, 3) rows
  ``(0, row, column)`` and ``txt_ids`` are zeros (L, 3).

There is no released TwinFlow-Flux; the extra weights use the pattern of the other families,
``time_text_embed_2.*``: ``temb = emb(1000 t, ...) + emb_2(1000 r, ...) * (t - r)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from twinflow.adapters.base import TimeConvention, TransformerAdapter, pack_patches, unpack_patches

FLUX_TIME = TimeConvention(forward_scale=1.0, embedding_scale=1000.0)
"""Flux takes ``t`` in [0, 1]; its ``forward`` multiplies by 1000 before the embedding."""

PATCH = 2  # Flux pipelines pack 2 x 2 latent patches into one token


class FluxAdapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for Flux.

    ``x``: latents (B, C, H, W), H and W even. ``condition``: ``{"prompt_embeds": (B, L, D),
    "pooled_prompt_embeds": (B, P), "guidance": (B,)}``; ``guidance`` (the guidance scale, e.g.
    3.5) only for guidance-distilled models, which require it.
    """

    family = "flux"
    class_names = ("FluxTransformer2DModel",)
    embedding_name = "time_text_embed"
    default_time_convention = FLUX_TIME
    condition_keys = ("prompt_embeds", "pooled_prompt_embeds")
    optional_condition_keys = ("guidance",)

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        guided = bool(self.transformer.config.guidance_embeds)
        if guided != (parts["guidance"] is not None):
            need = "needs" if guided else "takes no"
            raise ValueError(f"this Flux transformer {need} a 'guidance' entry in the condition")
        height, width = x.shape[-2:]
        embeds = parts["prompt_embeds"]
        return unpack_patches(
            self.transformer(
                hidden_states=pack_patches(x, PATCH),
                encoder_hidden_states=embeds,
                pooled_projections=parts["pooled_prompt_embeds"],
                timestep=timestep,
                img_ids=image_ids(height // PATCH, width // PATCH, x.device, x.dtype),
                txt_ids=embeds.new_zeros(embeds.shape[1], 3),
                guidance=parts["guidance"],
                return_dict=False,
            )[0],
            height,
            width,
            PATCH,
        )


def image_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Flux's positions of the packed image tokens: (rows * columns, 3) of ``(0, row, column)``."""
    grid = torch.zeros(rows, columns, 3, device=device, dtype=dtype)
    grid[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    grid[..., 2] = torch.arange(columns, device=device, dtype=dtype)[None, :]
    return grid.reshape(rows * columns, 3)
