"""Sana (``SanaPipeline``): Gemma-2 prompts padded to 300 tokens with a mask, a DC-AE VAE.

* Prompts: ``SanaPipeline.encode_prompt``, with the ``complex_human_instruction`` that its
  ``__call__`` passes by default (``encode_prompt``'s own default is None); the instruction is
  read from the installed pipeline's signature, so it follows diffusers. The null prompt is
  encoded as ``__call__`` encodes its negative prompt: ``""``, without the instruction.
* Latents: ``AutoencoderDC`` latents times ``scaling_factor`` (no shift), divided again before
  decoding; the VAE factor is ``2 ** (len(encoder_block_out_channels) - 1)`` (32 for DC-AE f32),
  one latent pixel per token. ``SanaPipeline`` bins the resolution to its aspect-ratio table;
  here the size asked for is the size made (a multiple of 32).
"""

from __future__ import annotations

import inspect

from twinflow.families.base import Family
from twinflow.families.prompts import EMBEDS, MASK

CHI_ARGUMENT = "complex_human_instruction"


class SanaFamily(Family):
    name = "sana"
    pipeline_class = "SanaPipeline"
    text_components = ("text_encoder", "tokenizer")
    required_text_components = ("text_encoder", "tokenizer")
    null_prompt = ""  # SanaPipeline's negative prompt
    native_latent_side = 32  # 1024 px through DC-AE's 32x down-sampling
    longest_prompt = 300  # encode_prompt pads to max_sequence_length

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        return self._encode(pipeline, prompts, device, max_sequence_length, default_instruction(pipeline))

    def encode_null(self, pipeline, device, max_sequence_length=None):
        return self._encode(pipeline, [self.null_prompt], device, max_sequence_length, None)

    def _encode(self, pipeline, prompts, device, max_sequence_length, instruction):
        embeds, mask, _, _ = pipeline.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False, device=device, clean_caption=False,
            complex_human_instruction=instruction, **self.token_limit(max_sequence_length),
        )
        return {EMBEDS: embeds, MASK: mask.long()}


def default_instruction(pipeline) -> list[str] | None:
    """The ``complex_human_instruction`` that the pipeline's ``__call__`` uses by default."""
    parameter = inspect.signature(type(pipeline).__call__).parameters.get(CHI_ARGUMENT)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return list(parameter.default) if parameter.default else None
