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

Editing (Qwen-Image-Edit and Edit-Plus use this same transformer): the source images' latents
come in the condition as ``image_latents`` (, ``image_latents_2``, ...), each (B, C, h_i, w_i),
normalised like ``x``. As ``QwenImageEditPipeline.__call__`` and ``QwenImageEditPlusPipeline.__call__``
do, each is packed 2 x 2 and appended after the noise tokens, ``img_shapes`` gets one
``(1, h_i/2, w_i/2)`` per source after the noise's, and the output is sliced back to the noise
tokens. The sources are clean data: with ``zero_cond_t`` (Edit-2511) the transformer gives their
tokens ``t = 0`` itself, and they get no second time term (``adapters.base._add_weighted``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from twinflow.adapters.base import TimeConvention, TransformerAdapter, pack_patches, unpack_patches

SOURCE_KEYS = ("image_latents", "image_latents_2", "image_latents_3", "image_latents_4")
"""The condition keys of an edit's source-image latents, in the order of the pipeline's images."""

QWEN_IMAGE_TIME = TimeConvention(forward_scale=1.0, embedding_scale=1.0)
"""Qwen-Image takes ``t`` in [0, 1]; its embedding module multiplies by 1000 itself."""


class QwenImageAdapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for Qwen-Image.

    ``x``: latents (B, C, H, W), H and W even. ``condition``: ``{"prompt_embeds": (B, L, D),
    "prompt_embeds_mask": (B, L), optional}``, as ``QwenImagePipeline.encode_prompt`` returns them;
    for edits also the source latents ``image_latents`` ... (:data:`SOURCE_KEYS`, see the module notes).
    """

    family = "qwen_image"
    class_names = ("QwenImageTransformer2DModel",)
    embedding_name = "time_text_embed"
    default_time_convention = QWEN_IMAGE_TIME
    condition_keys = ("prompt_embeds",)
    optional_condition_keys = ("prompt_embeds_mask", *SOURCE_KEYS)

    def modules_without_gradient(self) -> list[str]:
        last = f"transformer.transformer_blocks.{len(self.transformer.transformer_blocks) - 1}"
        return self._holding_parameters(
            [f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q", f"{last}.attn.to_add_out", f"{last}.txt_mlp"]
        )

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        patch = self.transformer.config.patch_size
        height, width = x.shape[-2:]
        sources = source_latents(parts, x)
        noise_tokens = pack_patches(x, patch)
        shapes = [(1, height // patch, width // patch)]
        shapes += [(1, source.shape[-2] // patch, source.shape[-1] // patch) for source in sources]
        tokens = self.transformer(
            hidden_states=torch.cat([noise_tokens, *(pack_patches(source, patch) for source in sources)], dim=1),
            encoder_hidden_states=parts["prompt_embeds"],
            encoder_hidden_states_mask=parts["prompt_embeds_mask"],
            timestep=timestep,
            img_shapes=[shapes] * x.shape[0],
            return_dict=False,
        )[0]
        return unpack_patches(tokens[:, : noise_tokens.shape[1]], height, width, patch)


def source_latents(parts: dict[str, Tensor | None], x: Tensor) -> list[Tensor]:
    """The edit's source latents in order; each must be (B, C, h, w) like ``x`` (its own h, w),
    and ``image_latents_<k>`` needs every key before it."""
    given = [parts.get(key) for key in SOURCE_KEYS]
    count = sum(source is not None for source in given)
    if any(source is None for source in given[:count]):
        present = [key for key, source in zip(SOURCE_KEYS, given) if source is not None]
        raise ValueError(f"qwen_image condition has source latents {present}; they must be the first of {list(SOURCE_KEYS)}")
    for key, source in zip(SOURCE_KEYS, given[:count]):
        if source.ndim != 4 or source.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"qwen_image condition[{key!r}] must have shape ({x.shape[0]}, {x.shape[1]}, h, w) like the "
                f"latents, got {tuple(source.shape)}"
            )
    return [source.to(x.dtype) for source in given[:count]]
