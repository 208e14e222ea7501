"""What differs between model families around the transformer: prompts, latent geometry, decoding.

The transformer side (time convention, packing, the second time embedding) lives in
:mod:`twinflow.adapters`. Here each family says how its diffusers pipeline turns prompts into the
adapter's condition (through the pipeline's own ``encode_prompt``), how large its latents are for
an image size, and how its VAE turns latents back into pixels (the latent normalisation of the
pipeline's ``__call__``, which diffusers keeps inline; only those two lines are restated here).

Conditions are dicts of tensors with a batch dimension, the keys the adapter takes:
``prompt_embeds`` (B, L, D) with ``prompt_embeds_mask`` (B, L) for Qwen-Image and Z-Image, and
``prompt_embeds`` (B, L, D) with ``pooled_prompt_embeds`` (B, P) for SD3 and Flux. Masked
families are right-padded with zeros, so rows encoded in different batches can be stacked
(:func:`twinflow.generation.embeddings.concatenate_conditions`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from twinflow.generation.embeddings import EMBEDS, MASK, pad_rows, trim_padding

__all__ = ["FAMILIES", "PIPELINE_FAMILIES", "Family", "FluxFamily", "QwenImageFamily", "SD3Family", "ZImageFamily"]


class Family:
    """One model family's conventions; subclasses override a few small methods."""

    name: ClassVar[str]  # the adapter family (twinflow.adapters.ADAPTERS)
    pipeline_class: ClassVar[str]  # the diffusers pipeline class named in model_index.json
    text_components: ClassVar[tuple[str, ...]]  # folder parts that only prompt encoding needs
    required_text_components: ClassVar[tuple[str, ...]]  # those that must be there to encode
    # The "empty" prompt: the null condition of the guidance-enhanced target (spec 2.2, cached
    # by `twinflow cache`) and the unconditional input of sampling-time guidance.
    null_prompt: ClassVar[str] = ""
    # Token limit of the prompt encoding; None keeps the pipeline's default.
    max_sequence_length: ClassVar[int | None] = None

    # -- prompts ---------------------------------------------------------------------------

    def encode(
        self, pipeline: Any, prompts: list[str], device: torch.device, max_sequence_length: int | None = None
    ) -> dict[str, Tensor]:
        """The condition for ``prompts`` from the pipeline's own ``encode_prompt``; the token limit
        is ``max_sequence_length``, else the family's :attr:`max_sequence_length`, else the pipeline's."""
        raise NotImplementedError

    def token_limit(self, max_sequence_length: int | None) -> dict[str, int]:
        """``encode_prompt``'s ``max_sequence_length`` argument, when one is set."""
        length = max_sequence_length if max_sequence_length is not None else self.max_sequence_length
        return {} if length is None else {"max_sequence_length": int(length)}

    def for_transformer(self, condition: dict[str, Tensor], transformer: Any) -> dict[str, Tensor]:
        """The condition as this batch's transformer call takes it (padding beyond the batch's
        longest prompt removed, so a batch does not depend on the others)."""
        return trim_padding(condition)

    # -- latent geometry -------------------------------------------------------------------

    def patch_size(self, transformer: Any) -> int:
        """Latent pixels per token side."""
        return int(transformer.config.patch_size)

    def latent_channels(self, transformer: Any) -> int:
        return int(transformer.config.in_channels)

    def latent_shape(self, pipeline: Any, transformer: Any, width: int, height: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents of a ``width`` x ``height`` image; raises ``ValueError`` naming
        the numbers when the size is not a multiple of VAE factor x patch size."""
        factor, patch = int(pipeline.vae_scale_factor), self.patch_size(transformer)
        multiple = factor * patch
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value < multiple:
                raise ValueError(f"{name} must be an integer >= {multiple}, got {value!r}")
        if width % multiple or height % multiple:
            raise ValueError(
                f"image size {width}x{height} (width x height) is not divisible by {multiple} = VAE factor "
                f"{factor} x patch size {patch} of this {self.name} model; the nearest smaller size is "
                f"{width // multiple * multiple}x{height // multiple * multiple}"
            )
        return self.latent_channels(transformer), height // factor, width // factor

    # -- pixels ----------------------------------------------------------------------------

    def decode(self, pipeline: Any, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] from latents (B, C, h, w) in the transformer's space.

        ``AutoencoderKL`` families (Z-Image, SD3, Flux): ``latents / scaling_factor + shift_factor``.
        """
        vae = pipeline.vae
        shift = vae.config.shift_factor or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(latents, return_dict=False)[0]


class ZImageFamily(Family):
    name = "z_image"
    pipeline_class = "ZImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    required_text_components = ("text_encoder", "tokenizer")
    max_sequence_length = 1024  # the reference encodes up to 1024 tokens (diffusers' default: 512)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        # ZImagePipeline returns one unpadded (L_i, D) tensor per prompt; it rewrites the list it
        # is given in place (chat template), hence the copy.
        embeds, _ = pipeline.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False, **self.token_limit(max_sequence_length)
        )
        return pad_rows(embeds)

    def patch_size(self, transformer):
        return int(transformer.config.all_patch_size[0])


class QwenImageFamily(Family):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    required_text_components = ("text_encoder", "tokenizer")
    null_prompt = "Generate an image."  # the reference's unconditional prompt (its modeling_qwen_image.py)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        embeds, mask = pipeline.encode_prompt(list(prompts), device=device, **self.token_limit(max_sequence_length))
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {EMBEDS: embeds, MASK: mask.long()}

    def for_transformer(self, condition, transformer):
        condition = trim_padding(condition)
        if MASK in condition and bool(condition[MASK].bool().all()):
            condition = {key: value for key, value in condition.items() if key != MASK}  # as the pipeline does
        return condition

    def latent_channels(self, transformer):
        return int(transformer.config.in_channels) // 4  # 2 x 2 latent patches per token

    def decode(self, pipeline, latents):
        # A video VAE: one frame, normalised per channel with latents_mean / latents_std.
        vae = pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        latents = latents.to(vae.dtype).unsqueeze(2) * std + mean
        return vae.decode(latents, return_dict=False)[0][:, :, 0]


class SD3Family(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    # T5 is optional: without it the pipeline uses zeros for its part of the prompt embedding.
    required_text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    null_prompt = "Generate an image."  # the reference's unconditional prompt (its modeling_sd_3.py)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        # max_sequence_length: T5's tokens (zeros without T5), after the CLIP tokens
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            **self.token_limit(max_sequence_length),
        )
        return {EMBEDS: embeds, "pooled_prompt_embeds": pooled}


FLUX_EMBEDDED_GUIDANCE = 3.5
"""The guidance value guidance-distilled Flux models (FLUX.1-dev) get, FluxPipeline's default."""


class FluxFamily(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    required_text_components = text_components

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        embeds, pooled, _ = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, **self.token_limit(max_sequence_length)
        )
        return {EMBEDS: embeds, "pooled_prompt_embeds": pooled}

    def for_transformer(self, condition, transformer):
        if transformer.config.guidance_embeds:
            rows = condition[EMBEDS].shape[0]
            condition = {**condition, "guidance": torch.full((rows,), FLUX_EMBEDDED_GUIDANCE)}
        return condition

    def patch_size(self, transformer):
        return 2  # FluxPipeline packs 2 x 2 latent patches into one token

    def latent_channels(self, transformer):
        return int(transformer.config.in_channels) // 4


FAMILIES: dict[str, Family] = {family.name: family for family in (QwenImageFamily(), ZImageFamily(), SD3Family(), FluxFamily())}
"""Families by adapter name."""

PIPELINE_FAMILIES: dict[str, Family] = {family.pipeline_class: family for family in FAMILIES.values()}
"""Families by the diffusers pipeline class of a folder's ``model_index.json``."""
