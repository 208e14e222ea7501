"""What a model family's pipeline does around the transformer, in one place per family.

The transformer side (time convention, packing, the second time embedding) lives in
:mod:`twinflow.adapters`. A :class:`Family` says how its diffusers pipeline turns prompts into the
adapter's condition (through the pipeline's own ``encode_prompt``), how large its latents are for
an image size, and how its VAE turns latents back into pixels (the latent normalisation of the
pipeline's ``__call__``, which diffusers keeps inline; only those lines are restated here).
Caching (:mod:`twinflow.data.encoders`) and generation (:mod:`twinflow.generation`) both use it, so
a cached prompt is the prompt generation encodes. The condition format: :mod:`twinflow.families.prompts`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from twinflow.checks import is_integer
from twinflow.families.latents import LatentNormalisation
from twinflow.families.prompts import trim_padding


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
    # What the dry run assumes without a latent cache: the latent side at the family's native
    # image size (described), and the prompt tokens the transformer sees at most (the pipeline's
    # limit: shorter prompts are padded only to the longest of a batch).
    native_latent_side: ClassVar[int] = 128
    native_size: ClassVar[str] = "1024x1024 px"
    longest_prompt: ClassVar[int] = 512
    # An edit family conditions on source images too (twinflow.families.qwen_image_edit).
    edits: ClassVar[bool] = False

    def extra_parts(self, folder: Any, can_encode: bool) -> dict[str, Any]:
        """Parts that ``from_pretrained`` must not load itself (given as ``None``), for
        :meth:`complete_pipeline` to fill in; ``can_encode``: the text encoder is being loaded."""
        return {}

    def complete_pipeline(self, pipeline: Any, folder: Any, can_encode: bool) -> None:
        """Fill in the parts of :meth:`extra_parts` (an edit pipeline's processor)."""

    # -- prompts ---------------------------------------------------------------------------

    def encode(
        self, pipeline: Any, prompts: list[str], device: torch.device, max_sequence_length: int | None = None
    ) -> dict[str, Tensor]:
        """The condition for ``prompts`` from the pipeline's own ``encode_prompt``; the token limit
        is ``max_sequence_length``, else the family's :attr:`max_sequence_length`, else the pipeline's."""
        raise NotImplementedError

    def encode_null(self, pipeline: Any, device: torch.device, max_sequence_length: int | None = None) -> dict[str, Tensor]:
        """The condition of :attr:`null_prompt` (batch 1), as the pipeline encodes its negative
        prompt; the same prompt through :meth:`encode` unless a family encodes it otherwise (Sana)."""
        return self.encode(pipeline, [self.null_prompt], device, max_sequence_length)

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
            if not is_integer(value) or value < multiple:
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
        latents = LatentNormalisation(vae.config).denormalize(latents.to(vae.dtype))
        return vae.decode(latents, return_dict=False)[0]
