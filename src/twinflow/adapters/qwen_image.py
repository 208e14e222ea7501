"""Qwen-Image (``QwenImageTransformer2DModel``) as a TwinFlow backbone (spec section 5).

diffusers 0.42 facts this relies on:

* ``forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
  img_shapes, ...)`` casts ``timestep`` to the hidden dtype and calls
  ``self.time_text_embed(timestep, hidden_states, additional_t_cond)``;
* ``time_text_embed`` (``QwenTimestepProjEmbeddings``) scales by 1000 itself
  (``Timesteps(..., scale=1000)``), so the pipeline passes ``sigma = t`` in [0, 1]; TwinFlow's
  signed ``t`` in [-1, 1] goes in unchanged, and ``emb_2`` gets ``r``;
* latents are packed 2 x 2: (B, C, H, W) -> (B, H/2 * W/2, 4C) with ``img_shapes`` =
  ``[[(1, H/2, W/2)]] * B``; the output comes back in the same packed layout;
* every block updates both streams, but ``forward`` returns only the image stream: the last
  block's text-only modules compute outputs nobody reads: ``attn.to_add_out`` and ``txt_mlp``
  get no gradient, the text queries (``attn.add_q_proj``, ``attn.norm_added_q``; the image
  tokens read the text keys and values, never its queries) exactly zero
  (:meth:`QwenImageAdapter.modules_without_gradient`).

The released TwinFlow-Qwen-Image weights add ``time_text_embed_2.*`` (a second
``QwenTimestepProjEmbeddings``): ``temb = emb(t) + emb_2(r) * (t - r)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from twinflow.adapters.base import TimeConvention, TransformerAdapter, pack_patches, unpack_patches

QWEN_IMAGE_TIME = TimeConvention(forward_scale=1.0, embedding_scale=1.0)
"""Qwen-Image takes ``t`` in [0, 1]; its embedding module multiplies by 1000 itself."""


class QwenImageAdapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for Qwen-Image.

    ``x``: latents (B, C, H, W), H and W even. ``condition``: ``{"prompt_embeds": (B, L, D),
    "prompt_embeds_mask": (B, L), optional}``, as ``QwenImagePipeline.encode_prompt`` returns them.
    """

    family = "qwen_image"
    class_names = ("QwenImageTransformer2DModel",)
    embedding_name = "time_text_embed"
    default_time_convention = QWEN_IMAGE_TIME
    condition_keys = ("prompt_embeds",)
    optional_condition_keys = ("prompt_embeds_mask",)

    def modules_without_gradient(self) -> list[str]:
        last = f"transformer.transformer_blocks.{len(self.transformer.transformer_blocks) - 1}"
        return self._holding_parameters(
            [f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q", f"{last}.attn.to_add_out", f"{last}.txt_mlp"]
        )

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        patch = self.transformer.config.patch_size
        height, width = x.shape[-2:]
        tokens = self.transformer(
            hidden_states=pack_patches(x, patch),
            encoder_hidden_states=parts["prompt_embeds"],
            encoder_hidden_states_mask=parts["prompt_embeds_mask"],
            timestep=timestep,
            img_shapes=[[(1, height // patch, width // patch)]] * x.shape[0],
            return_dict=False,
        )[0]
        return unpack_patches(tokens, height, width, patch)
