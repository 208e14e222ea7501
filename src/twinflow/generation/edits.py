"""An edit's source images, prepared once per request for :class:`~twinflow.generation.TextToImage`.

The edit pipelines' rules (sizes, prompts with images, the source latents) live in
:mod:`twinflow.families.qwen_image_edit`; this module holds what one ``generate`` call keeps of
them: the vision-language inputs, the source latents every row of the condition carries, and
the sizes for the images' metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from twinflow.generation.text_to_image import TextToImage

__all__ = ["EditSources", "open_source"]


@dataclass
class EditSources:
    """An edit's source images, prepared once per request: the vision-language inputs of the
    prompt encoding and the source latents every row of the condition carries."""

    prompt_images: list[Any]  # PIL images, as encode_prompt takes them
    latents: dict[str, Tensor]  # image_latents, ...: (1, C, h, w) each
    sizes: list[list[int]]  # each source's encoded (width, height)
    output_size: tuple[int, int]  # the pipeline's default (width, height)

    @classmethod
    @torch.no_grad()
    def prepare(cls, model: TextToImage, sources: list[Any], area: int | None) -> EditSources:
        family, pipeline = model.family, model.pipeline
        prompt_images, pixels = family.prepare_sources(pipeline, sources, area)
        latents = family.encode_sources(pipeline, [tensor.to(model.device) for tensor in pixels])
        sizes = [[int(tensor.shape[-1]), int(tensor.shape[-2])] for tensor in pixels]
        return cls(prompt_images, latents, sizes, family.output_size(pipeline, sources, area))

    def with_latents(self, condition: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = next(iter(condition.values())).shape[0]
        return {**condition, **{key: value.expand(rows, *value.shape[1:]) for key, value in self.latents.items()}}

    def condition(self, model: TextToImage, prompts: list[str]) -> dict[str, Tensor]:
        encoded = model.family.encode_edit(model.pipeline, prompts, self.prompt_images, model.device)
        return self.with_latents(encoded)

    def null_condition(self, model: TextToImage) -> dict[str, Tensor]:
        """The null prompt with the same images and source latents (batch 1)."""
        return self.with_latents(model.family.encode_null_edit(model.pipeline, self.prompt_images, model.device))


def open_source(source: Any) -> Any:
    """A source image as an RGB PIL image (a PIL image, or a path that names the file when it fails)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"source image {path} cannot be read: {error}") from None
