"""Qwen-Image-Edit (``QwenImageEditPipeline``) and Edit-Plus (``QwenImageEditPlusPipeline``): edits
of one or more source images by an instruction, with Qwen-Image's transformer, VAE and text encoder.

What an edit adds to Qwen-Image (diffusers 0.42 ``__call__``; the lines restated here):

* **sizes.** Each source image is resized to about 1024^2 pixels at its own aspect ratio, sides
  rounded to multiples of 32 (``calculate_dimensions``: :func:`area_size`), VAE-encoded with the
  posterior mode and normalised like the target; the output size defaults to the same rule on
  the first (Edit) or last (Plus) source, floored to VAE factor x 2;
* **prompts.** ``encode_prompt(prompt, image=...)`` runs Qwen2.5-VL on the instruction *and*
  the image(s): Edit sees the resized source itself, Plus each source at about 384^2 pixels with
  one "Picture i:" per image. The null condition (the guidance target's and sampling guidance's
  unconditional input) is the null prompt with the *same* images, as the pipeline encodes its
  negative prompt and the reference code its "Edit this image.";
* **the sequence.** The source latents join the noise tokens (``adapters.qwen_image``).

The processor. The pipeline's ``processor`` is transformers' ``Qwen2VLProcessor``, which loads
only with its video processor, and that needs torchvision. :class:`VisionPromptProcessor` does
the image half of it (what ``encode_prompt`` calls) with the tokenizer and the images-only
``Qwen2VLImageProcessorPil``, read from the folder's ``processor/preprocessor_config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from twinflow.families.latents import LatentNormalisation
from twinflow.families.prompts import EMBEDS, MASK, pad_rows
from twinflow.families.qwen_image import QwenImageFamily

IMAGE_TOKEN = "<|image_pad|>"
SIZE_MULTIPLE = 32  # calculate_dimensions rounds both sides to multiples of 32
SOURCE_AREA = 1024 * 1024  # the pipelines' VAE image area (Plus: VAE_IMAGE_SIZE)
PROMPT_IMAGE_AREA = 384 * 384  # Plus: CONDITION_IMAGE_SIZE, the vision-language input


def area_size(area: int, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels at the aspect ratio ``width / height``, sides
    rounded to multiples of 32: the edit pipelines' ``calculate_dimensions``."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    size = round(new_width / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(new_height / SIZE_MULTIPLE) * SIZE_MULTIPLE
    if min(size) < SIZE_MULTIPLE:
        raise ValueError(
            f"a {width}x{height} image at {area} pixels rounds to {size[0]}x{size[1]}: sides are multiples of "
            f"{SIZE_MULTIPLE}; give a larger source area"
        )
    return size


class VisionPromptProcessor:
    """``Qwen2VLProcessor``'s text-and-image call without its video processor (see the module notes).

    ``processor(text=[...], images=[...], padding=True, return_tensors="pt")`` returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_grid_thw``: each
    ``<|image_pad|>`` of the texts, in order, stands for the next image and becomes
    ``t * h * w / merge_size^2`` copies of itself (one per merged vision token).
    """

    def __init__(self, tokenizer: Any, image_processor: Any):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_folder(cls, folder: str | Path) -> VisionPromptProcessor:
        """The processor of a pipeline folder: ``tokenizer/`` and ``processor/preprocessor_config.json``."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(folder)
        config = folder / "processor" / "preprocessor_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: an edit pipeline folder needs its processor/ (the image processor's config)")
        return cls(AutoTokenizer.from_pretrained(folder / "tokenizer"), Qwen2VLImageProcessorPil.from_pretrained(config.parent))

    def __call__(self, text: str | list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        vision: dict[str, Tensor] = {}
        if images is not None:
            images = images if isinstance(images, list) else [images]
            vision = dict(self.image_processor(images=images, return_tensors="pt"))
            merged = self.image_processor.merge_size ** 2
            counts = iter((vision["image_grid_thw"].prod(dim=-1) // merged).tolist())
            expanded = []
            for entry in texts:
                first, *rest = entry.split(IMAGE_TOKEN)
                pieces = [first]
                for piece in rest:
                    count = next(counts, None)
                    if count is None:
                        raise ValueError(f"the prompts hold more {IMAGE_TOKEN} than the {len(images)} images given")
                    pieces.append(IMAGE_TOKEN * count + piece)
                expanded.append("".join(pieces))
            if next(counts, None) is not None:
                raise ValueError(f"{len(images)} images for fewer {IMAGE_TOKEN} in the prompts")
            texts = expanded
        tokens = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**tokens, **vision})


class QwenImageEditFamily(QwenImageFamily):
    """``QwenImageEditPipeline``: one source image; its resized self is the vision-language input."""

    pipeline_class = "QwenImageEditPipeline"
    edits = True
    max_sources: ClassVar[int] = 1
    null_prompt = "Edit this image."  # the reference's unconditional edit prompt (its modeling_qwen_image.py)
    native_latent_side, native_size = 128, "1024x1024 px, the edit pipelines' size"
    size_from_source: ClassVar[int] = 0  # which source gives the default output size

    def encode(self, pipeline, prompts, device, max_sequence_length=None):
        raise ValueError(
            f"{self.pipeline_class} encodes an instruction together with its source images: edit with "
            f"twinflow generate --image (TextToImage.generate(images=...)); prompts alone cannot be encoded"
        )

    def encode_null(self, pipeline, device, max_sequence_length=None):
        return self.encode(pipeline, [self.null_prompt], device, max_sequence_length)

    def extra_parts(self, folder, can_encode):
        return {"processor": None}  # transformers' Qwen2VLProcessor needs torchvision to load

    def complete_pipeline(self, pipeline, folder, can_encode):
        if can_encode:
            pipeline.processor = VisionPromptProcessor.from_folder(folder)

    # -- sizes -------------------------------------------------------------------------------

    def source_size(self, width: int, height: int, area: int | None = None) -> tuple[int, int]:
        """The ``(width, height)`` a source of that size is encoded at (``area``: the pipeline's 1024^2)."""
        return area_size(SOURCE_AREA if area is None else area, width, height)

    def output_size(self, pipeline: Any, sources: list[Any], area: int | None = None) -> tuple[int, int]:
        """The pipeline's default output ``(width, height)`` for these source images (PIL)."""
        width, height = self.source_size(*sources[self.size_from_source].size, area)
        multiple = int(pipeline.vae_scale_factor) * 2
        return width // multiple * multiple, height // multiple * multiple

    def check_sources(self, count: int) -> None:
        """Refuse an edit with no source image, or with more than the pipeline takes."""
        if count < 1:
            raise ValueError(f"an edit with {self.pipeline_class} needs a source image (--image)")
        if count > self.max_sources:
            raise ValueError(f"{self.pipeline_class} takes at most {self.max_sources} source image(s), got {count}")

    def prepare_sources(self, pipeline: Any, sources: list[Any], area: int | None = None) -> tuple[list[Any], list[Tensor]]:
        """Source images (PIL) -> the vision-language inputs of :meth:`encode_edit` and the VAE
        inputs of :meth:`encode_sources` (each (1, 3, H, W) in [-1, 1]), resized by the pipeline's
        own image processor as its ``__call__`` does."""
        self.check_sources(len(sources))
        processor = pipeline.image_processor
        sizes = [self.source_size(*source.size, area) for source in sources]
        pixels = [processor.preprocess(source, height, width) for source, (width, height) in zip(sources, sizes)]
        return self.prompt_images(pipeline, sources, sizes), pixels

    def prompt_images(self, pipeline: Any, sources: list[Any], sizes: list[tuple[int, int]]) -> list[Any]:
        """What ``encode_prompt`` gets as ``image``: Edit the source resized to its VAE size."""
        width, height = sizes[0]
        return [pipeline.image_processor.resize(sources[0], height, width)]

    # -- conditions --------------------------------------------------------------------------

    def encode_edit(self, pipeline: Any, prompts: list[str], images: list[Any], device: torch.device) -> dict[str, Tensor]:
        """The condition of ``prompts``, each with the vision-language ``images`` of
        :meth:`prepare_sources`, from the pipeline's ``encode_prompt``: ``prompt_embeds`` and its mask."""
        rows = []
        for prompt in prompts:  # one at a time: the processor pairs each prompt with its images
            embeds, mask = pipeline.encode_prompt(prompt=[prompt], image=self._image_argument(images), device=device)
            rows.append(embeds[0] if mask is None else embeds[0, : int(mask[0].sum())])
        condition = pad_rows(rows)
        return {EMBEDS: condition[EMBEDS], MASK: condition[MASK]}

    def _image_argument(self, images: list[Any]) -> Any:
        return images[0]  # Edit: one image, not a list (its prompt template has one picture)

    def encode_null_edit(self, pipeline: Any, images: list[Any], device: torch.device) -> dict[str, Tensor]:
        """The null prompt with the same images: the unconditional edit (batch 1)."""
        return self.encode_edit(pipeline, [self.null_prompt], images, device)

    def encode_sources(self, pipeline: Any, pixels: list[Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """``image_latents`` ... of source images, each (B, 3, H, W) in [-1, 1] at its encoding size:
        the VAE's posterior mode, normalised as the pipeline's ``_encode_vae_image`` does (in
        ``dtype``, default the VAE's)."""
        from twinflow.adapters.qwen_image import SOURCE_KEYS

        vae = pipeline.vae
        normalisation = LatentNormalisation(vae.config)
        latents = {}
        for key, source in zip(SOURCE_KEYS, pixels, strict=False):
            # A video VAE: one frame in, its axis dropped again.
            mode = vae.encode(source.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode().squeeze(2)
            latents[key] = normalisation.normalize(mode.float()).to(vae.dtype if dtype is None else dtype)
        return latents


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """``QwenImageEditPlusPipeline`` (Edit-2509, Edit-2511): several sources, each seen at 384^2."""

    pipeline_class = "QwenImageEditPlusPipeline"
    max_sources = 4  # the adapter's SOURCE_KEYS; Qwen names 1 to 3 as the best range
    size_from_source = -1

    def prompt_images(self, pipeline, sources, sizes):
        # Each source at about 384^2 pixels (CONDITION_IMAGE_SIZE), from the original image.
        sizes = [area_size(PROMPT_IMAGE_AREA, *source.size) for source in sources]
        return [pipeline.image_processor.resize(source, height, width) for source, (width, height) in zip(sources, sizes)]

    def _image_argument(self, images):
        return list(images)  # Plus: a list, one "Picture i:" each
