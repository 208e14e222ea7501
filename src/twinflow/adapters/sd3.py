"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) as a TwinFlow backbone (spec section 5).

diffusers 0.42 facts this relies on:

* ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)`` takes
  latents (B, C, H, W) directly (it patchifies and unpatchifies itself) and calls
  ``self.time_text_embed(timestep, pooled_projections)``;
* ``time_text_embed`` (``CombinedTimestepTextProjEmbeddings``) does not scale: the pipeline
  passes the scheduler's ``timestep = 1000 * sigma``, so the adapter passes ``1000 t`` and
  ``emb_2`` gets ``1000 r``.

* the last block is ``context_pre_only``: it computes no text output, so its text queries
  (``attn.add_q_proj``, ``attn.norm_added_q``) reach nothing and get exactly zero gradient
  (:meth:`SD3Adapter.modules_without_gradient`).

The reference TwinFlow-SD3.5 adds ``time_text_embed_2.*`` (a second
``CombinedTimestepTextProjEmbeddings``, pooled text included):
``temb = emb(1000 t, pooled) + emb_2(1000 r, pooled) * (t - r)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from twinflow.adapters.base import TimeConvention, TransformerAdapter

SD3_TIME = TimeConvention(forward_scale=1000.0, embedding_scale=1000.0)
"""SD3 takes ``1000 t`` and its embedding module does not scale again."""


class SD3Adapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for SD3 / SD3.5.

    ``x``: latents (B, C, H, W). ``condition``: ``{"prompt_embeds": (B, L, D),
    "pooled_prompt_embeds": (B, P)}``, as ``StableDiffusion3Pipeline.encode_prompt`` returns them.
    """

    family = "sd3"
    class_names = ("SD3Transformer2DModel",)
    embedding_name = "time_text_embed"
    default_time_convention = SD3_TIME
    condition_keys = ("prompt_embeds", "pooled_prompt_embeds")

    def modules_without_gradient(self) -> list[str]:
        blocks = self.transformer.transformer_blocks
        if not getattr(blocks[-1], "context_pre_only", False):
            return []
        last = f"transformer.transformer_blocks.{len(blocks) - 1}"
        return self._holding_parameters([f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q"])

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=parts["prompt_embeds"],
            pooled_projections=parts["pooled_prompt_embeds"],
            timestep=timestep,
            return_dict=False,
        )[0]
