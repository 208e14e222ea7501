"""Sample grids as PNG files (PIL only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, rows: int, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into a uint8 (H', W', C) array, row-major."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(f"grids need 1 or 3 channels, got {channels}")
    columns = -(-count // rows)
    canvas = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[:, top : top + height, left : left + width] = image
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(images: Tensor, path: str | Path, rows: int, scale: int = 2) -> Path:
    """Write a grid PNG (nearest-neighbour upscaled by ``scale`` so small digits stay crisp)."""
    array = image_grid(images, rows)
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
