"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL prompts with a mask, a video VAE normalised per channel."""

from __future__ import annotations

import torch

from twinflow.families.base import Family
from twinflow.families.latents import LatentNormalisation
from twinflow.families.prompts import EMBEDS, MASK, trim_padding

class QwenImageFamily(Family):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    required_text_components = ("text_encoder", "tokenizer")
    native_latent_side, native_size = 166, "1328x1328 px, Qwen-Image's native size"
    null_prompt = "Generate an image."  # the reference's unconditional prompt (its modeling_qwen_image.py)

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        embeds, mask = pipeline.encode_prompt(prompt=list(prompts), device=device, **self.token_limit(max_sequence_length))
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
        latents = LatentNormalisation(vae.config).denormalize(latents.to(vae.dtype)).unsqueeze(2)
        return vae.decode(latents, return_dict=False)[0][:, :, 0]
