"""SD3 / SD3.5 (``StableDiffusion3Pipeline``): CLIP-L + CLIP-G (+ optional T5) prompts with a pooled vector."""

from __future__ import annotations

from twinflow.families.base import Family
from twinflow.families.prompts import EMBEDS, POOLED

class SD3Family(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    # T5 is optional: without it the pipeline uses zeros for its part of the prompt embedding.
    required_text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    longest_prompt = 333  # 77 CLIP + 256 T5 tokens
    null_prompt = "Generate an image."  # the reference's unconditional prompt (its modeling_sd_3.py)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        # max_sequence_length: T5's tokens (zeros without T5), after the CLIP tokens
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            **self.token_limit(max_sequence_length),
        )
        return {EMBEDS: embeds, POOLED: pooled}
