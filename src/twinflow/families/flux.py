"""Flux (``FluxPipeline``): CLIP pooled + T5 prompts, 2 x 2 packed latents, embedded guidance."""

from __future__ import annotations

import torch

from twinflow.families.base import Family
from twinflow.families.prompts import EMBEDS, POOLED

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
        return {EMBEDS: embeds, POOLED: pooled}

    def for_transformer(self, condition, transformer):
        if transformer.config.guidance_embeds:
            rows = condition[EMBEDS].shape[0]
            condition = {**condition, "guidance": torch.full((rows,), FLUX_EMBEDDED_GUIDANCE)}
        return condition

    def patch_size(self, transformer):
        return 2  # FluxPipeline packs 2 x 2 latent patches into one token

    def latent_channels(self, transformer):
        return int(transformer.config.in_channels) // 4
