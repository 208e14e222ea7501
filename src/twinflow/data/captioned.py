"""Captioned images for text-to-image training: the configuration and the lazily decoded dataset.

Two sources, chosen by :attr:`CaptionedDataConfig.source`:

* ``"folder"``: every image under ``root`` (recursively; suffixes in
  :data:`~twinflow.data.CAPTIONED_IMAGE_EXTENSIONS`) with its caption in the file of the same name
  and the suffix ``.txt`` beside it (``cat/01.png`` + ``cat/01.txt``);
* ``"parquet"``: one ``.parquet`` file, or every one under a folder, with a text column and an
  image column holding encoded image bytes, either raw binary or a Hugging Face ``datasets``
  ``Image`` struct ``{"bytes": ..., "path": ...}`` (column names configurable). Needs ``pyarrow``.

:func:`load_captioned` runs the pre-scan of :mod:`twinflow.data.captioned_scan` and returns a
:class:`CaptionedImages`. Images are decoded lazily (a text-to-image set does not fit in
memory), EXIF-rotated, put on white where transparent, then scaled to cover the target size and
centre-cropped in one bicubic resampling (:mod:`twinflow.data.image_decoding`). They come out as
float32 ``(C, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1``, as :class:`~twinflow.data.ImageDataset`).

Edit triplets (source image(s), instruction, target image), for training an edit model: the
folder source with ``source_roots``, one folder per source image in which the source of
``root/cat/01.png`` is ``cat/01.<any image suffix>``; the parquet source with ``source_columns``,
the columns of the sources' bytes. The captions are the instructions, the images under ``root``
(or in ``image_column``) the targets, and each source is scaled and cropped to its target's size.
A missing or unreadable source makes the item bad, as a missing caption does.

Aspect-ratio buckets (``buckets=True``): each image goes to the size of the nearest aspect
ratio (:mod:`twinflow.data.buckets`) and :class:`~twinflow.data.BucketBatches` draws batches
from one bucket at a time, seeded and resumable like :class:`~twinflow.data.ShuffledBatches`.

Bad items, and when they are found. The pre-scan reads every caption and image header, so
missing, empty or undecodable captions and images whose header cannot be read are found before
training: skipped (``on_error="skip"``: counted by reason in :attr:`CaptionedImages.report`, the
first ``report_limit`` names kept, one warning with the summary) or raising a ``ValueError``
naming the file (``on_error="error"``). An image whose header is fine but whose pixel data is
broken (a truncated file) is only found when it is decoded: with ``"skip"`` it is added to the
same report, warned about, and replaced by the next good item of the same bucket (its image
*and* its caption), so an epoch never stops half-way and batch shapes stay the same; with
``"error"`` it raises naming the file.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from twinflow.checks import is_finite_number, is_integer
from twinflow.data.buckets import (
    DEFAULT_BUCKET_MULTIPLE, DEFAULT_BUCKET_RATIOS, aspect_ratio_buckets, item_positions, nearest_bucket,
)
from twinflow.data.captioned_scan import (
    ScannedItem,
    SkipReport,
    find_parquet_files,
    image_bytes,
    parquet_module,
    scan_folder,
    scan_parquet,
)
from twinflow.data.datasets import _image_to_chw_array, _uint8_to_unit_range
from twinflow.data.image_decoding import IMAGE_ERRORS, decode_image, resize_center_crop

CAPTIONED_SOURCES: tuple[str, ...] = ("folder", "parquet")
"""The values :attr:`CaptionedDataConfig.source` accepts."""

ON_ERROR_MODES: tuple[str, ...] = ("skip", "error")
"""The values :attr:`CaptionedDataConfig.on_error` accepts."""

PARQUET_ROW_GROUP_CACHE = 2
"""Decoded parquet row groups kept in memory for random access (each holds its image bytes)."""


@dataclass
class CaptionedDataConfig:
    """Where captioned images come from and how to shape them.

    Attributes:
        source: one of :data:`CAPTIONED_SOURCES`.
        root: the image folder (``"folder"``), or a parquet file or a folder searched
            recursively for ``*.parquet`` (``"parquet"``).
        image_size: the side of the square output images; with ``buckets`` the target pixel
            count is ``image_size ** 2``.
        channels: 3 for RGB, 1 for grayscale.
        buckets: group images by aspect ratio (see :func:`~twinflow.data.aspect_ratio_buckets`) instead of
            centre-cropping every image to a square.
        bucket_ratios: the buckets' aspect ratios, width / height.
        bucket_multiple: bucket heights and widths are multiples of this.
        text_column: the parquet column holding the captions.
        image_column: the parquet column holding the encoded images.
        source_roots: edit triplets from folders: one folder per source image (Picture 1, 2,
            ...), each holding the source of ``root/<name>.<ext>`` as ``<name>.<any image suffix>``;
            the images under ``root`` are then the edits' targets and the captions their instructions.
        source_columns: edit triplets from parquet: the columns holding the source images' bytes.
        on_error: ``"skip"`` bad items (counted and reported) or raise on the first (``"error"``).
        verify_images: decode every image in the pre-scan (slow, but finds truncated files
            before training rather than during it).
        report_limit: how many bad items the report names (all are counted).
        limit: keep only the first ``limit`` good items (in sorted file / row order).
    """

    source: str = "folder"
    root: str | None = None
    image_size: int = 512
    channels: int = 3
    buckets: bool = False
    bucket_ratios: tuple[float, ...] = DEFAULT_BUCKET_RATIOS
    bucket_multiple: int = DEFAULT_BUCKET_MULTIPLE
    text_column: str = "text"
    image_column: str = "image"
    source_roots: tuple[str, ...] = ()
    source_columns: tuple[str, ...] = ()
    on_error: str = "skip"
    verify_images: bool = False
    report_limit: int = 20
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.source not in CAPTIONED_SOURCES:
            raise ValueError(f"CaptionedDataConfig.source must be one of {list(CAPTIONED_SOURCES)}, got {self.source!r}")
        if not self.root:
            raise ValueError("CaptionedDataConfig.root is required")
        if not is_integer(self.image_size) or self.image_size < 1:
            raise ValueError(f"CaptionedDataConfig.image_size must be a positive int, got {self.image_size!r}")
        if not is_integer(self.channels) or self.channels not in (1, 3):
            raise ValueError(f"CaptionedDataConfig.channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if not isinstance(self.buckets, bool):
            raise ValueError(f"CaptionedDataConfig.buckets must be a bool, got {self.buckets!r}")
        self.bucket_ratios = tuple(self.bucket_ratios)
        if not self.bucket_ratios or not all(
            is_finite_number(ratio) and ratio > 0
            for ratio in self.bucket_ratios
        ):
            raise ValueError(
                f"CaptionedDataConfig.bucket_ratios must be positive numbers (width / height), got {self.bucket_ratios!r}"
            )
        if not is_integer(self.bucket_multiple) or self.bucket_multiple < 1:
            raise ValueError(
                f"CaptionedDataConfig.bucket_multiple must be a positive int, got {self.bucket_multiple!r}"
            )
        if self.buckets and self.image_size < self.bucket_multiple:
            raise ValueError(
                f"CaptionedDataConfig.image_size {self.image_size} is smaller than bucket_multiple "
                f"{self.bucket_multiple}; no bucket would fit"
            )
        for name in ("text_column", "image_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"CaptionedDataConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("source_roots", "source_columns"):
            value = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            if not all(isinstance(entry, str) and entry for entry in value):
                raise ValueError(f"CaptionedDataConfig.{name} must be a list of non-empty strings, got {getattr(self, name)!r}")
            setattr(self, name, value)
        wrong = "source_columns" if self.source == "folder" else "source_roots"
        if getattr(self, wrong):
            right = "source_roots" if self.source == "folder" else "source_columns"
            raise ValueError(f"CaptionedDataConfig.{wrong} is for the other source; the {self.source} source takes {right}")
        if self.on_error not in ON_ERROR_MODES:
            raise ValueError(f"CaptionedDataConfig.on_error must be one of {list(ON_ERROR_MODES)}, got {self.on_error!r}")
        if not isinstance(self.verify_images, bool):
            raise ValueError(f"CaptionedDataConfig.verify_images must be a bool, got {self.verify_images!r}")
        if not is_integer(self.report_limit) or self.report_limit < 0:
            raise ValueError(f"CaptionedDataConfig.report_limit must be a non-negative int, got {self.report_limit!r}")
        if self.limit is not None and (not is_integer(self.limit) or self.limit < 1):
            raise ValueError(f"CaptionedDataConfig.limit must be None or a positive int, got {self.limit!r}")

    @property
    def source_count(self) -> int:
        """Source images per item: 0 for captioned images, 1 or more for edit triplets."""
        return len(self.source_roots) + len(self.source_columns)


class CaptionedImages:
    """Lazily decoded captioned images (build one with :func:`load_captioned`).

    ``dataset[i]`` is ``(image, caption)``: float32 ``(C, H, W)`` in ``[-1, 1]`` and a string.
    ``dataset[indices]`` (a LongTensor or a sequence of ints, all from one bucket) is
    ``(images, captions)``: float32 ``(B, C, H, W)`` and a list of ``B`` strings.
    Edit triplets (``source_roots`` / ``source_columns``) add a third entry, the sources, each
    scaled and cropped to its target's size: ``(N, C, H, W)`` for one item, ``(B, N, C, H, W)``
    for a batch.

    Attributes:
        config: the configuration it was loaded with.
        buckets: the output sizes ``(height, width)``; one ``(image_size, image_size)`` without buckets.
        bucket_ids: int64 ``(N,)``, the index into ``buckets`` of every item.
        captions: the ``N`` captions (stripped of surrounding white space).
        names: the ``N`` item names (paths relative to ``root``, or ``"file.parquet row k"``).
        report: the bad items, those of the pre-scan and those found while decoding.
    """

    def __init__(
        self,
        config: CaptionedDataConfig,
        items: Sequence[ScannedItem],
        report: SkipReport,
        parquet_files: Sequence[Path] = (),
    ) -> None:
        if not items:
            raise ValueError(
                f"no usable captioned images in {config.root} ({report.summary()})"
            )
        self.config = config
        self.report = report
        self._items = list(items)
        self._parquet_files = list(parquet_files)
        self._parquet_handles: dict[int, Any] = {}
        self._row_groups: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        self._failed: set[int] = set()
        if config.buckets:
            self.buckets = aspect_ratio_buckets(config.image_size, config.bucket_ratios, config.bucket_multiple)
            ids = [nearest_bucket(item.width, item.height, self.buckets) for item in self._items]
        else:
            self.buckets = [(config.image_size, config.image_size)]
            ids = [0] * len(self._items)
        self.bucket_ids = torch.tensor(ids, dtype=torch.int64)
        self.captions = [item.caption for item in self._items]
        self.names = [item.name for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def description(self) -> str:
        """What was loaded, for logs and cache indexes: source, root, item count and sizes."""
        sizes = ", ".join(f"{height}x{width}" for height, width in self.buckets)
        sources = f", {self.config.source_count} source image(s) each (edit triplets)" if self.config.source_count else ""
        return (
            f"captioned {self.config.source} {self.config.root}: {len(self)} items, "
            f"{self.config.channels} channels, sizes (HxW) {sizes}{sources}"
        )

    def image_size(self, index: int) -> tuple[int, int]:
        """The output ``(height, width)`` of item ``index`` (its bucket's size)."""
        return self.buckets[int(self.bucket_ids[index])]

    def __getitem__(self, index: int | Tensor | Sequence[int]) -> tuple[Tensor, Any]:
        positions = item_positions(index, len(self), "CaptionedImages")
        if isinstance(positions, int):
            return self._load(positions)
        buckets = {int(self.bucket_ids[position]) for position in positions}
        if len(buckets) > 1:
            sizes = sorted(self.buckets[bucket] for bucket in buckets)
            raise ValueError(
                f"indices span several aspect-ratio buckets (sizes {sizes}); draw batches with "
                f"BucketBatches(dataset.bucket_ids, batch_size, seed)"
            )
        loaded = [self._load(position) for position in positions]
        batch = torch.stack([entry[0] for entry in loaded]), [entry[1] for entry in loaded]
        return (*batch, torch.stack([entry[2] for entry in loaded])) if self.config.source_count else batch

    def _load(self, position: int) -> tuple[Any, ...]:
        """Decode item ``position`` (and its sources); in skip mode a broken one is reported and
        replaced (see module doc)."""
        if position in self._failed:
            position = self._substitute(position)
        while True:
            item = self._items[position]
            height, width = self.image_size(position)
            what = "image"
            try:
                image = self._pixels(self._encoded(item), height, width)
                what = "source image"
                sources = [self._pixels(self._encoded(item, number), height, width) for number in range(self.config.source_count)]
            except IMAGE_ERRORS as error:
                if self.config.on_error == "error":
                    raise ValueError(f"could not decode {what} of {self._full_name(item)}: {error}") from error
                self._failed.add(position)
                self.report.record(f"corrupt {what}", item.name, f"{type(error).__name__}: {error}")
                warnings.warn(
                    f"skipping corrupt {what} of {item.name} ({error}); using the next good item of its bucket",
                    stacklevel=3,
                )
                position = self._substitute(position)
                continue
            return (image, item.caption, torch.stack(sources)) if sources else (image, item.caption)

    def _pixels(self, encoded: Path | bytes, height: int, width: int) -> Tensor:
        """An encoded image decoded, scaled and centre-cropped to ``height`` x ``width``, in [-1, 1]."""
        image = decode_image(encoded, self.config.channels)
        array = _image_to_chw_array(resize_center_crop(image, height, width))
        return _uint8_to_unit_range(torch.from_numpy(np.array(array)))

    def _substitute(self, position: int) -> int:
        """The next item after ``position`` (cyclically) in the same bucket not known to be broken."""
        bucket = int(self.bucket_ids[position])
        count = len(self)
        for step in range(1, count):
            candidate = (position + step) % count
            if candidate not in self._failed and int(self.bucket_ids[candidate]) == bucket:
                return candidate
        raise ValueError(
            f"every image of bucket {self.buckets[bucket]} failed to decode ({self.report.summary()})"
        )

    def _full_name(self, item: ScannedItem) -> str:
        return str(item.path) if item.path is not None else f"{self.config.root}: {item.name}"

    def _encoded(self, item: ScannedItem, source: int | None = None) -> Path | bytes:
        """The file path, or the encoded bytes of a parquet row: the target, or source number ``source``."""
        if item.path is not None:
            return item.path if source is None else item.sources[source]
        columns = [self.config.image_column, *self.config.source_columns]
        file_index, group, row = item.row
        key = (file_index, group)
        values = self._row_groups.get(key)
        if values is None:
            handle = self._parquet_handles.get(file_index)
            if handle is None:
                handle = parquet_module().ParquetFile(self._parquet_files[file_index])
                self._parquet_handles[file_index] = handle
            table = handle.read_row_group(group, columns=columns)
            values = [table.column(column).to_pylist() for column in columns]
            self._row_groups[key] = values
            while len(self._row_groups) > PARQUET_ROW_GROUP_CACHE:
                self._row_groups.popitem(last=False)
        self._row_groups.move_to_end(key)
        encoded = image_bytes(values[0 if source is None else 1 + source][row])
        if encoded is None:  # the pre-scan saw bytes here; the file changed since
            raise ValueError(f"parquet row {item.name} has no image bytes any more")
        return encoded

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open parquet files or cached row groups (for DataLoader workers)."""
        state = self.__dict__.copy()
        state["_parquet_handles"] = {}
        state["_row_groups"] = OrderedDict()
        return state


def load_captioned(config: CaptionedDataConfig) -> CaptionedImages:
    """Pre-scan ``config.root`` (see the module doc) and return the lazily decoded dataset.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: naming the file, on the first bad item when ``on_error="error"``; when a
            parquet file lacks a configured column; when no usable item is left.
        ImportError: the parquet source without ``pyarrow``.
    """
    root = Path(str(config.root))
    if not root.exists():
        raise FileNotFoundError(f"captioned data root not found: {root}")
    report = SkipReport(limit=config.report_limit)
    if config.source == "folder":
        items, files = scan_folder(root, config, report), []
    else:
        files = find_parquet_files(root)
        items = scan_parquet(files, root, config, report)
    if report.total:
        warnings.warn(f"captioned data {root}: {report.summary()}", stacklevel=2)
    return CaptionedImages(config, items, report, files)
