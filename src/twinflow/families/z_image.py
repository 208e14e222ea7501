"""Z-Image (``ZImagePipeline``): Qwen3 prompts up to 1024 tokens, unpadded per prompt."""

from __future__ import annotations

from twinflow.families.base import Family
from twinflow.families.prompts import pad_rows

class ZImageFamily(Family):
    name = "z_image"
    pipeline_class = "ZImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    required_text_components = ("text_encoder", "tokenizer")
    longest_prompt = 1024
    max_sequence_length = 1024  # the reference encodes up to 1024 tokens (diffusers' default: 512)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        # ZImagePipeline returns one unpadded (L_i, D) tensor per prompt; it rewrites the list it
        # is given in place (chat template), hence the copy.
        embeds, _ = pipeline.encode_prompt(
            prompt=list(prompts), device=device, do_classifier_free_guidance=False, **self.token_limit(max_sequence_length)
        )
        return pad_rows(embeds)

    def patch_size(self, transformer):
        return int(transformer.config.all_patch_size[0])
