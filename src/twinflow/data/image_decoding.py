"""Decoding one captioned image: its displayed size, its pixels, and the crop to a target size.

Pictures are stored in many ways: rotated by an EXIF orientation tag, with transparency, as
palette images. :func:`probe_size` reads the displayed size from the header alone (what the
pre-scan of :mod:`twinflow.data.captioned_scan` needs), :func:`decode_image` decodes an image
upright, flattened onto white where transparent, as L or RGB, and :func:`resize_center_crop`
scales it to cover a target size and cuts out the centre in one bicubic resampling. A source is
a file path or the encoded bytes of a parquet cell.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What opening or decoding an unreadable image raises (missing, truncated, not an image, too large)."""

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
_EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 mean the image is stored rotated by 90 degrees


def open_image(source: Path | bytes) -> Image.Image:
    """Open a file path or encoded bytes (PIL reads the header now, the pixels when loaded)."""
    return Image.open(source if isinstance(source, Path) else io.BytesIO(source))


def probe_size(source: Path | bytes, verify: bool) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF rotation applied), from the header unless ``verify``."""
    with open_image(source) as opened:
        width, height = opened.size
        if verify:
            opened.load()
        if _orientation(opened) in (5, 6, 7, 8):
            width, height = height, width
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height}")
    return width, height


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation found while opening (``getexif()`` would decode a whole PNG to look)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(_EXIF_ORIENTATION, 1))


def decode_image(source: Path | bytes, channels: int) -> Image.Image:
    """Decode, apply the EXIF rotation, flatten transparency onto white, convert to L or RGB."""
    with open_image(source) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover ``height x width`` and cut out the centre, in one bicubic resampling.

    The largest centred region of the source with the target aspect ratio is resampled straight to
    the target size (PIL's ``resize(..., box=...)``), so no intermediate image is made.
    """
    if image.size == (width, height):
        return image
    source_width, source_height = image.size
    target_ratio = width / height
    if source_width / source_height > target_ratio:  # too wide: crop the sides
        crop_width = source_height * target_ratio
        left = (source_width - crop_width) / 2
        box = (left, 0.0, left + crop_width, float(source_height))
    else:  # too tall: crop top and bottom
        crop_height = source_width / target_ratio
        top = (source_height - crop_height) / 2
        box = (0.0, top, float(source_width), top + crop_height)
    return image.resize((width, height), resample=_BICUBIC, box=box)
