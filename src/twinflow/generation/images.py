"""Saving generated images as PNG files with their settings in PNG text metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["image_metadata", "read_image_metadata", "save_images"]


def image_metadata(prompt: str | None, seed: int, settings: dict[str, Any]) -> dict[str, str]:
    """The text chunks of one image: prompt, seed, preset, sampler fields (JSON), model folder,
    twinflow version, and every other setting under its own name."""
    from twinflow import __version__

    chunks = {
        "prompt": "" if prompt is None else prompt,
        "seed": str(seed),
        "preset": str(settings.get("preset")),
        "sampler": json.dumps(settings.get("sampler", {})),
        "model": str(settings.get("model")),
        "twinflow_version": __version__,
    }
    for key, value in settings.items():
        chunks.setdefault(key, value if isinstance(value, str) else json.dumps(value))
    return chunks


def save_images(result: Any, folder: str | Path, start: int = 0) -> list[Path]:
    """Write a :class:`~twinflow.generation.GenerationResult`'s images to ``folder`` as
    ``<index>_<seed>.png`` (index counted from ``start``); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
        info = PngInfo()
        for key, value in image_metadata(prompt, seed, result.settings).items():
            info.add_itxt(key, value)  # international text: prompts may be any language
        path = folder / f"{start + offset}_{seed}.png"
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths


def read_image_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by :func:`save_images`."""
    with Image.open(path) as image:
        image.load()
        return dict(image.text)
