"""The two encoders of a cache pass, built from diffusers models: images -> latents, prompts -> embeddings.

:func:`twinflow.data.cache_dataset` knows nothing of a particular VAE or text encoder: it takes
two callables, ``encode_images(images) -> latents`` and ``encode_prompts(captions) -> {name:
tensor}``. This module builds them from diffusers objects: :func:`vae_encoder` from a VAE,
:func:`prompt_encoder` from a pipeline. Both delegate the family-specific parts to
:mod:`twinflow.families` (the latent normalisation and the prompt encoding that generation uses
too), so a cached latent or embedding is exactly what the pipeline itself would compute; each
has a ``description`` that the cache index records.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from twinflow.families.latents import LatentNormalisation, config_value


class VaeEncoder:
    """``encode_images`` for :func:`~twinflow.data.cache_dataset` from a diffusers VAE (built by :func:`vae_encoder`).

    Images ``(B, C, H, W)`` in ``[-1, 1]`` go in; latents ``(B, c, H / f, W / f)`` normalised the
    way the family's pipelines do before the transformer come out:

    * ``AutoencoderKL`` (SD3, Flux, Z-Image): ``(z - shift_factor) * scaling_factor``
      (``shift_factor`` 0 when the config has none);
    * VAEs with ``latents_mean`` / ``latents_std`` in the config (``AutoencoderKLQwenImage``):
      ``(z - latents_mean) / latents_std`` per channel (times ``scaling_factor`` if the config
      also has one, as SDXL's pipelines do). Qwen-Image's VAE works on video (B, C, T, H, W):
      images are given ``T = 1`` and the frame axis is dropped again;
    * ``AutoencoderDC`` (Sana): ``z * scaling_factor``; its encoder is deterministic (no
      posterior), so ``z`` is its output whether or not a ``generator`` is given.

    ``z`` is the *mean* of the VAE's posterior by default. That keeps a cache reproducible:
    a resumed pass gives exactly what an uninterrupted one does, and two caches of the same data
    agree. (The posteriors of these VAEs are narrow, so a sample differs little from the mean.)
    With a ``generator`` ``z`` is a sample drawn with it instead; the draws then depend on how far
    the generator has advanced, so a resumed pass draws different noise for the remaining shards.
    """

    def __init__(self, vae: Any, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        config = vae.config
        self.vae = vae
        self.generator = generator
        self.dtype = dtype
        self.video = type(vae).__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLWan") or (
            config_value(config, "temperal_downsample") is not None
        )
        self.normalisation = LatentNormalisation(config)  # the rule generation undoes (twinflow.families)

    @property
    def _latent_kind(self) -> str:
        if type(self.vae).__name__ == "AutoencoderDC":
            return "deterministic encoder output"
        return "posterior sample" if self.generator is not None else "posterior mean"

    @property
    def description(self) -> dict[str, Any]:
        """A JSON-ready account of the VAE and the normalisation, for the cache index."""
        normalisation = self.normalisation
        return {
            "vae": type(self.vae).__name__,
            "latent": self._latent_kind,
            "normalisation": normalisation.formula,
            "scaling_factor": normalisation.scaling_factor,
            "shift_factor": normalisation.shift_factor,
            "latents_mean": normalisation.latents_mean,
            "latents_std": normalisation.latents_std,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"vae_encoder expects images (B, C, H, W), got shape {tuple(images.shape)}")
        parameter = next(self.vae.parameters())
        pixels = images.to(parameter.device, parameter.dtype)
        if self.video:
            pixels = pixels.unsqueeze(2)
        output = self.vae.encode(pixels)
        if hasattr(output, "latent"):  # AutoencoderDC: a deterministic encoder
            latents = output.latent
        else:
            distribution = output.latent_dist if hasattr(output, "latent_dist") else output[0]
            latents = distribution.sample(generator=self.generator) if self.generator is not None else distribution.mode()
        if self.video:
            latents = latents.squeeze(2)
        return self.normalize(latents.float()).to(self.dtype)

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw VAE latents ``(B, c, h, w)`` -> the transformer's latents."""
        return self.normalisation.normalize(latents)

    def denormalize(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`: what the VAE's ``decode`` takes (add the frame axis for video VAEs)."""
        return self.normalisation.denormalize(latents)


def vae_encoder(vae: Any, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> VaeEncoder:
    """``encode_images`` for :func:`~twinflow.data.cache_dataset` from a diffusers VAE; see :class:`VaeEncoder`.

    Args:
        vae: an ``AutoencoderKL``, ``AutoencoderKLQwenImage`` or another diffusers VAE whose
            ``encode`` returns a ``latent_dist`` (used as it is: device, dtype, eval mode).
        generator: ``None`` takes the posterior mean (the default, reproducible); a generator
            (on the VAE's device) draws a posterior sample with it.
        dtype: the dtype of the returned latents (``torch.bfloat16`` halves the cache).
    """
    return VaeEncoder(vae, generator=generator, dtype=dtype)


class PromptEncoder:
    """``encode_prompts`` for :func:`~twinflow.data.cache_dataset` from a diffusers pipeline: the
    family's own prompt encoding (:meth:`twinflow.families.Family.encode`, what generation uses
    too), cast to ``dtype``. ``max_sequence_length`` None: the family's limit, else the pipeline's.

    Returns the condition mapping of the family's adapter (see :mod:`twinflow.adapters`):

    * Qwen-Image: ``{"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L)}``; the pipeline
      drops the mask when no token is padding, here it is then all ones, so every batch has
      the same keys;
    * Z-Image: the pipeline's unpadded per-caption embeddings right-padded with zeros into
      ``prompt_embeds`` (B, L, D), with ``prompt_embeds_mask`` (B, L) marking the real tokens;
    * SD3 and Flux: ``{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)}`` (no
      negative prompts: ``do_classifier_free_guidance=False`` for SD3).
    """

    def __init__(self, pipeline: Any, max_sequence_length: int | None = None, dtype: torch.dtype | None = None):
        from twinflow.families import PIPELINE_FAMILIES, pipeline_family

        family = pipeline_family(pipeline)
        if family is None:
            raise TypeError(
                f"prompt_encoder knows the pipelines {sorted(PIPELINE_FAMILIES)}, got {type(pipeline).__name__}; "
                f"write an encode_prompts callable for it"
            )
        self.pipeline = pipeline
        self.family = family.name
        self._family = family
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype

    @property
    def description(self) -> dict[str, Any]:
        """A JSON-ready account for the cache index."""
        return {
            "pipeline": type(self.pipeline).__name__,
            "family": self.family,
            "max_sequence_length": self.max_sequence_length,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        # The family's own encoding: the one generation uses (twinflow.families).
        condition = self._family.encode(
            self.pipeline, list(captions), _pipeline_device(self.pipeline), self.max_sequence_length
        )
        return self._cast(condition)

    @torch.no_grad()
    def encode_null(self, prompt: str) -> dict[str, Tensor]:
        """``prompt`` as the null condition: the family's null prompt as the family encodes it
        (:meth:`twinflow.families.Family.encode_null`, what generation uses), another prompt as a caption."""
        if prompt != self._family.null_prompt:
            return self([prompt])
        condition = self._family.encode_null(self.pipeline, _pipeline_device(self.pipeline), self.max_sequence_length)
        return self._cast(condition)

    def _cast(self, condition: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.dtype is None:
            return condition
        return {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in condition.items()}


def prompt_encoder(
    pipeline: Any, max_sequence_length: int | None = None, dtype: torch.dtype | None = None
) -> PromptEncoder:
    """``encode_prompts`` for :func:`~twinflow.data.cache_dataset` from a pipeline; see :class:`PromptEncoder`.

    Args:
        pipeline: a ``QwenImagePipeline``, ``ZImagePipeline``, ``StableDiffusion3Pipeline`` or
            ``FluxPipeline`` (only its text encoders and tokenizers are used; load it without
            the transformer and VAE to save memory).
        max_sequence_length: passed on to ``encode_prompt``; ``None`` keeps the pipeline's default.
        dtype: cast the floating-point outputs (``None`` keeps the text encoder's dtype).
    """
    return PromptEncoder(pipeline, max_sequence_length=max_sequence_length, dtype=dtype)


class EditEncoder:
    """``encode_prompts(captions, sources)`` for :func:`~twinflow.data.cache_dataset` over edit
    triplets, from an edit pipeline (``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``).

    ``sources`` is (B, N, 3, H, W) in [-1, 1], already at the targets' size. Each item's
    condition is what generation builds for an edit (:mod:`twinflow.families.qwen_image_edit`):
    the instruction encoded with the item's images (``prompt_embeds``, ``prompt_embeds_mask``),
    the source latents (``image_latents``, ...; the VAE's mode, normalised as the targets, in
    ``dtype``), and the item's own null condition, the null prompt with the same images, under
    ``null.prompt_embeds`` and ``null.prompt_embeds_mask`` (the cache's per-item null condition,
    :data:`~twinflow.data.cache_format.ITEM_NULL_PREFIX`).
    """

    def __init__(self, pipeline: Any, dtype: torch.dtype = torch.float32):
        from twinflow.families import pipeline_family

        family = pipeline_family(pipeline)
        if family is None or not family.edits:
            raise TypeError(f"edit triplets need an edit pipeline (QwenImageEditPipeline, ...), got {type(pipeline).__name__}")
        self.pipeline = pipeline
        self.family = family
        self.dtype = dtype

    @property
    def description(self) -> dict[str, Any]:
        return {"pipeline": type(self.pipeline).__name__, "family": self.family.name, "edits": True,
                "null_prompt": self.family.null_prompt, "dtype": str(self.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def __call__(self, captions: list[str], sources: Tensor) -> dict[str, Tensor]:
        from twinflow.data.cache_format import ITEM_NULL_PREFIX, concatenate_rows

        if sources.ndim != 5 or sources.shape[0] != len(captions):
            raise ValueError(f"edit sources must be (B, N, 3, H, W) with B = {len(captions)}, got {tuple(sources.shape)}")
        family, pipeline, device = self.family, self.pipeline, _pipeline_device(self.pipeline)
        family.check_sources(sources.shape[1])
        rows: dict[str, list[Tensor]] = {}
        for caption, item in zip(captions, sources):
            images = pipeline.image_processor.postprocess(item, output_type="pil")  # as generation gets them
            prompt_images = family.prompt_images(pipeline, images, [image.size for image in images])
            encoded = family.encode_edit(pipeline, [caption], prompt_images, device)
            null = family.encode_null_edit(pipeline, prompt_images, device)
            for key, value in (*encoded.items(), *((ITEM_NULL_PREFIX + key, value) for key, value in null.items())):
                rows.setdefault(key, []).append(value.to(self.dtype) if value.is_floating_point() else value)
        latents = family.encode_sources(pipeline, [sources[:, number] for number in range(sources.shape[1])], self.dtype)
        return {**{key: concatenate_rows(values, key) for key, values in rows.items()}, **latents}


def _pipeline_device(pipeline: Any) -> Any:
    """Where the pipeline runs its text encoders (diffusers' ``_execution_device``, else ``device``)."""
    device = getattr(pipeline, "_execution_device", None)
    return device if device is not None else getattr(pipeline, "device", None)
