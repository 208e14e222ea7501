"""Captioned images for text-to-image training: image folders with ``.txt`` captions, or parquet.

Two sources, chosen by :attr:`CaptionedDataConfig.source`:

* ``"folder"``: every image under ``root`` (recursively; suffixes in
  :data:`CAPTIONED_IMAGE_EXTENSIONS`) with its caption in the file of the same name and the
  suffix ``.txt`` beside it (``cat/01.png`` + ``cat/01.txt``);
* ``"parquet"``: one ``.parquet`` file, or every one under a folder, with a text column and an
  image column holding encoded image bytes, either raw binary or a Hugging Face ``datasets``
  ``Image`` struct ``{"bytes": ..., "path": ...}`` (column names configurable). Needs ``pyarrow``.

Images are decoded lazily (a text-to-image set does not fit in memory), EXIF-rotated, put on
white where transparent, then scaled to cover the target size and centre-cropped in one
bicubic resampling (:func:`resize_center_crop`). They come out as float32 ``(C, H, W)`` in
``[-1, 1]`` (``x / 127.5 - 1``, as :class:`~twinflow.data.ImageDataset`).

Aspect-ratio buckets (``buckets=True``): a small fixed list of sizes with about
``image_size ** 2`` pixels and the aspect ratios :data:`DEFAULT_BUCKET_RATIOS`
(:func:`aspect_ratio_buckets`); each image goes to the bucket of the nearest aspect ratio and
:class:`BucketBatches` draws batches from one bucket at a time, seeded and resumable like
:class:`~twinflow.data.ShuffledBatches`.

Bad items, and when they are found. Loading runs a *pre-scan*: it reads every caption and the
header of every image (format and size, a few hundred bytes; ``verify_images=True`` decodes
the whole image too). The scan is needed anyway, since buckets need each image's size before
the first batch, and it means that the index space, ``len(dataset)`` and therefore the batch
order are fixed before training starts. Missing, empty or undecodable captions and images
whose header cannot be read are either skipped (``on_error="skip"``: counted by reason in
:attr:`CaptionedImages.report`, the first ``report_limit`` names kept, one warning with the
summary) or raise a ``ValueError`` naming the file (``on_error="error"``). An image whose header
is fine but whose pixel data is broken (a truncated file) is only found when it is decoded:
with ``"skip"`` it is added to the same report, warned about, and replaced by the next good
item of the same bucket (its image *and* its caption), so an epoch never stops half-way and
batch shapes stay the same; with ``"error"`` it raises naming the file.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from twinflow.data.batches import read_order_state
from twinflow.data.datasets import _image_to_chw_array, _is_int, _uint8_to_unit_range

CAPTIONED_SOURCES: tuple[str, ...] = ("folder", "parquet")
"""The values :attr:`CaptionedDataConfig.source` accepts."""

ON_ERROR_MODES: tuple[str, ...] = ("skip", "error")
"""The values :attr:`CaptionedDataConfig.on_error` accepts."""

CAPTIONED_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""Image suffixes (compared case-insensitively) the folder source reads; other files are ignored."""

CAPTION_SUFFIX = ".txt"
"""A folder image's caption is the file with the image's name and this suffix."""

DEFAULT_BUCKET_RATIOS: tuple[float, ...] = (9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9)
"""Aspect ratios (width / height) of the default buckets: portrait 9:16 to landscape 16:9."""

DEFAULT_BUCKET_MULTIPLE = 16
"""Bucket sides are multiples of this: a VAE's 8x down-sampling times a transformer's 2x2 patches."""

PARQUET_ROW_GROUP_CACHE = 2
"""Decoded parquet row groups kept in memory for random access (each holds its image bytes)."""

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
_EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 mean the image is stored rotated by 90 degrees
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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
        buckets: group images by aspect ratio (see :func:`aspect_ratio_buckets`) instead of
            centre-cropping every image to a square.
        bucket_ratios: the buckets' aspect ratios, width / height.
        bucket_multiple: bucket heights and widths are multiples of this.
        text_column: the parquet column holding the captions.
        image_column: the parquet column holding the encoded images.
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
    on_error: str = "skip"
    verify_images: bool = False
    report_limit: int = 20
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.source not in CAPTIONED_SOURCES:
            raise ValueError(f"CaptionedDataConfig.source must be one of {list(CAPTIONED_SOURCES)}, got {self.source!r}")
        if not self.root:
            raise ValueError("CaptionedDataConfig.root is required")
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ValueError(f"CaptionedDataConfig.image_size must be a positive int, got {self.image_size!r}")
        if not _is_int(self.channels) or self.channels not in (1, 3):
            raise ValueError(f"CaptionedDataConfig.channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if not isinstance(self.buckets, bool):
            raise ValueError(f"CaptionedDataConfig.buckets must be a bool, got {self.buckets!r}")
        self.bucket_ratios = tuple(self.bucket_ratios)
        if not self.bucket_ratios or not all(
            isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0
            for ratio in self.bucket_ratios
        ):
            raise ValueError(
                f"CaptionedDataConfig.bucket_ratios must be positive numbers (width / height), got {self.bucket_ratios!r}"
            )
        if not _is_int(self.bucket_multiple) or self.bucket_multiple < 1:
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
        if self.on_error not in ON_ERROR_MODES:
            raise ValueError(f"CaptionedDataConfig.on_error must be one of {list(ON_ERROR_MODES)}, got {self.on_error!r}")
        if not isinstance(self.verify_images, bool):
            raise ValueError(f"CaptionedDataConfig.verify_images must be a bool, got {self.verify_images!r}")
        if not _is_int(self.report_limit) or self.report_limit < 0:
            raise ValueError(f"CaptionedDataConfig.report_limit must be a non-negative int, got {self.report_limit!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise ValueError(f"CaptionedDataConfig.limit must be None or a positive int, got {self.limit!r}")


@dataclass
class SkipReport:
    """Bad items left out of (or replaced in) a dataset: counts by reason and the first names.

    Attributes:
        counts: number of bad items per reason (``"missing caption"``, ``"corrupt image"``, ...).
        examples: ``"name: reason (detail)"`` for the first ``limit`` bad items.
        limit: how many examples are kept.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    limit: int = 20

    @property
    def total(self) -> int:
        """Number of bad items found so far."""
        return sum(self.counts.values())

    def record(self, reason: str, name: str, detail: str = "") -> None:
        """Count one bad item and keep its name while fewer than ``limit`` are kept."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.limit:
            self.examples.append(f"{name}: {reason}" + (f" ({detail})" if detail else ""))

    def summary(self) -> str:
        """One line: the counts by reason, then the kept names."""
        if not self.total:
            return "no bad items"
        counts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
        shown = f"first {len(self.examples)}" if len(self.examples) < self.total else "all"
        return f"{self.total} bad items skipped ({counts}); {shown}: " + "; ".join(self.examples)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy: ``{"total", "counts", "examples"}``."""
        return {"total": self.total, "counts": dict(self.counts), "examples": list(self.examples)}


@dataclass(frozen=True)
class _Item:
    """One good item found by the pre-scan."""

    name: str  # what reports and errors call it: a path, or "file.parquet row 12"
    caption: str
    width: int  # after EXIF rotation
    height: int
    path: Path | None = None  # folder source
    row: tuple[int, int, int] | None = None  # parquet source: (file index, row group, row in group)


class CaptionedImages:
    """Lazily decoded captioned images (build one with :func:`load_captioned`).

    ``dataset[i]`` is ``(image, caption)``: float32 ``(C, H, W)`` in ``[-1, 1]`` and a string.
    ``dataset[indices]`` (a LongTensor or a sequence of ints, all from one bucket) is
    ``(images, captions)``: float32 ``(B, C, H, W)`` and a list of ``B`` strings.

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
        items: Sequence[_Item],
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
        return (
            f"captioned {self.config.source} {self.config.root}: {len(self)} items, "
            f"{self.config.channels} channels, sizes (HxW) {sizes}"
        )

    def image_size(self, index: int) -> tuple[int, int]:
        """The output ``(height, width)`` of item ``index`` (its bucket's size)."""
        return self.buckets[int(self.bucket_ids[index])]

    def __getitem__(self, index: int | Tensor | Sequence[int]) -> tuple[Tensor, Any]:
        if isinstance(index, Tensor) and index.ndim == 0:
            index = int(index)
        if _is_int(index):
            position = int(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {len(self)} items")
            return self._load(position % len(self))
        positions = [int(position) for position in (index.tolist() if isinstance(index, Tensor) else index)]
        if not positions:
            raise ValueError("CaptionedImages needs at least one index")
        buckets = {int(self.bucket_ids[position]) for position in positions}
        if len(buckets) > 1:
            sizes = sorted(self.buckets[bucket] for bucket in buckets)
            raise ValueError(
                f"indices span several aspect-ratio buckets (sizes {sizes}); draw batches with "
                f"BucketBatches(dataset.bucket_ids, batch_size, seed)"
            )
        loaded = [self._load(position) for position in positions]
        return torch.stack([image for image, _ in loaded]), [caption for _, caption in loaded]

    def _load(self, position: int) -> tuple[Tensor, str]:
        """Decode item ``position``; in skip mode a broken one is reported and replaced (see module doc)."""
        if position in self._failed:
            position = self._substitute(position)
        while True:
            item = self._items[position]
            try:
                image = _decode(self._encoded(item), self.config.channels)
            except _IMAGE_ERRORS as error:
                if self.config.on_error == "error":
                    raise ValueError(f"could not decode image {self._full_name(item)}: {error}") from error
                self._failed.add(position)
                self.report.record("corrupt image", item.name, f"{type(error).__name__}: {error}")
                warnings.warn(
                    f"skipping corrupt image {item.name} ({error}); using the next good item of its bucket",
                    stacklevel=3,
                )
                position = self._substitute(position)
                continue
            height, width = self.image_size(position)
            array = _image_to_chw_array(resize_center_crop(image, height, width))
            return _uint8_to_unit_range(torch.from_numpy(np.array(array))), item.caption

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

    def _full_name(self, item: _Item) -> str:
        return str(item.path) if item.path is not None else f"{self.config.root}: {item.name}"

    def _encoded(self, item: _Item) -> Path | bytes:
        """The file path, or the encoded bytes of a parquet row."""
        if item.path is not None:
            return item.path
        file_index, group, row = item.row
        key = (file_index, group)
        values = self._row_groups.get(key)
        if values is None:
            handle = self._parquet_handles.get(file_index)
            if handle is None:
                handle = _parquet_module().ParquetFile(self._parquet_files[file_index])
                self._parquet_handles[file_index] = handle
            table = handle.read_row_group(group, columns=[self.config.image_column])
            values = table.column(self.config.image_column).to_pylist()
            self._row_groups[key] = values
            while len(self._row_groups) > PARQUET_ROW_GROUP_CACHE:
                self._row_groups.popitem(last=False)
        self._row_groups.move_to_end(key)
        encoded = _image_bytes(values[row])
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
        items, files = _scan_folder(root, config, report), []
    else:
        files = _parquet_files(root)
        items = _scan_parquet(files, root, config, report)
    if report.total:
        warnings.warn(f"captioned data {root}: {report.summary()}", stacklevel=2)
    return CaptionedImages(config, items, report, files)


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


def aspect_ratio_buckets(
    image_size: int,
    ratios: Sequence[float] = DEFAULT_BUCKET_RATIOS,
    multiple: int = DEFAULT_BUCKET_MULTIPLE,
) -> list[tuple[int, int]]:
    """Sizes ``(height, width)`` of about ``image_size ** 2`` pixels with aspect ratios ``ratios``.

    Each side is ``sqrt(image_size ** 2 * ratio)`` (width) or ``sqrt(image_size ** 2 / ratio)``
    (height) rounded to the nearest multiple of ``multiple`` (at least ``multiple``); sizes that
    coincide after rounding are listed once, in the order of ``ratios``.
    """
    area = image_size * image_size
    buckets: list[tuple[int, int]] = []
    for ratio in ratios:
        width = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
        height = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
        if (height, width) not in buckets:
            buckets.append((height, width))
    return buckets


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket ``(height, width)`` whose aspect ratio is nearest on a log scale (first on ties)."""
    log_ratio = math.log(width / height)
    distances = [abs(log_ratio - math.log(bucket_width / bucket_height)) for bucket_height, bucket_width in buckets]
    return int(np.argmin(distances))


class BucketBatches:
    """Endless, seeded, resumable batches that each hold items of one bucket only.

    Epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)`` to shuffle the members of each
    bucket (buckets in increasing id order), cuts each into full batches of ``batch_size`` (a
    bucket's incomplete tail is dropped for that epoch) and shuffles the order of all those
    batches with the same generator. The state is ``(epoch, position)``, ``position`` being the
    number of *batches* of the epoch handed out; :meth:`state_dict` / :meth:`load_state_dict`
    resume exactly, as with :class:`~twinflow.data.ShuffledBatches`.

    Args:
        bucket_ids: the bucket of every item, shape ``(N,)`` (e.g. ``CaptionedImages.bucket_ids``
            or ``CachedLatents.bucket_ids``).
        batch_size: indices per batch; some bucket must hold at least this many items.
        seed: base seed; epoch ``e`` is shuffled with seed ``seed + e``.
    """

    def __init__(self, bucket_ids: Tensor | Sequence[int], batch_size: int, seed: int = 0) -> None:
        ids = torch.as_tensor(bucket_ids)
        if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"BucketBatches bucket_ids must be a non-empty 1-D integer sequence, got {bucket_ids!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"BucketBatches batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(seed):
            raise ValueError(f"BucketBatches seed must be an int, got {seed!r}")
        ids = ids.to(torch.int64)
        self._members = [torch.nonzero(ids == bucket).flatten() for bucket in torch.unique(ids).tolist()]
        self.num_items = int(ids.numel())
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = sum(len(members) // self.batch_size for members in self._members)
        if self.batches_per_epoch == 0:
            sizes = sorted(len(members) for members in self._members)
            raise ValueError(
                f"BucketBatches batch_size {batch_size} is larger than every bucket (bucket sizes {sizes}); "
                f"not even one full batch fits in an epoch"
            )
        self._epoch = 0
        self._position = 0
        self._batches: list[Tensor] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch is read from, unless the current one is used up."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many batches of the current epoch have been handed out."""
        return self._position

    def batches(self, epoch: int) -> list[Tensor]:
        """The ``batches_per_epoch`` index batches of ``epoch`` in the order they are handed out."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        pieces: list[Tensor] = []
        for members in self._members:
            shuffled = members[torch.randperm(len(members), generator=generator)]
            usable = len(shuffled) // self.batch_size * self.batch_size
            pieces.extend(shuffled[:usable].split(self.batch_size))
        order = torch.randperm(len(pieces), generator=generator).tolist()
        return [pieces[index] for index in order]

    def next_indices(self) -> Tensor:
        """Return the next ``batch_size`` indices (int64, all from one bucket), advancing the state."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._batches = None
        if self._batches is None:
            self._batches = self.batches(self._epoch)
        batch = self._batches[self._position]
        self._position += 1
        return batch.clone()

    def state_dict(self) -> dict[str, int]:
        """The resumable state: ``{"epoch": int, "position": int}`` (position counts batches)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a state from :meth:`state_dict`; the following batches match an uninterrupted run."""
        epoch, position = read_order_state(state, "BucketBatches", self.batches_per_epoch)
        self._epoch = int(epoch)
        self._position = int(position)
        self._batches = None


# ---------------------------------------------------------------------------------------------
# Pre-scan
# ---------------------------------------------------------------------------------------------


def _scan_folder(root: Path, config: CaptionedDataConfig, report: SkipReport) -> list[_Item]:
    """The good ``(image, caption)`` pairs under ``root``, in sorted relative-path order."""
    if not root.is_dir():
        raise ValueError(f"captioned image folder root is not a directory: {root}")
    images = sorted(
        (
            path
            for path in root.rglob("*")
            if path.suffix.lower() in CAPTIONED_IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
            and path.is_file()
        ),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    if not images:
        raise ValueError(
            f"captioned image folder {root} has no image files (looked for suffixes {list(CAPTIONED_IMAGE_EXTENSIONS)})"
        )
    items: list[_Item] = []
    for path in images:
        name = path.relative_to(root).as_posix()
        caption_path = path.with_suffix(CAPTION_SUFFIX)
        try:
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
        except (OSError, UnicodeDecodeError) as error:
            _bad(config, report, "unreadable caption", name, str(path), f"{caption_path.name}: {error}")
            continue
        if caption is None:
            _bad(config, report, "missing caption", name, str(path), f"no {caption_path.name}")
            continue
        if not caption:
            _bad(config, report, "empty caption", name, str(path), f"{caption_path.name} is empty")
            continue
        try:
            width, height = _probe(path, config.verify_images)
        except _IMAGE_ERRORS as error:
            _bad(config, report, "corrupt image", name, str(path), f"{type(error).__name__}: {error}")
            continue
        items.append(_Item(name=name, caption=caption, width=width, height=height, path=path))
        if config.limit is not None and len(items) >= config.limit:
            break
    return items


def _parquet_files(root: Path) -> list[Path]:
    """``root`` itself, or every ``*.parquet`` under it in sorted relative-path order."""
    if root.is_file():
        return [root]
    files = sorted(
        (path for path in root.rglob("*.parquet") if path.is_file()),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(f"no .parquet files under {root}")
    return files


def _scan_parquet(files: Sequence[Path], root: Path, config: CaptionedDataConfig, report: SkipReport) -> list[_Item]:
    """The good rows of ``files``, read one row group at a time."""
    parquet = _parquet_module()
    columns = [config.text_column, config.image_column]
    items: list[_Item] = []
    for file_index, path in enumerate(files):
        label = path.name if path == root else path.relative_to(root).as_posix()
        handle = parquet.ParquetFile(path)
        missing = [column for column in columns if column not in handle.schema_arrow.names]
        if missing:
            raise ValueError(
                f"parquet file {path} has no column(s) {missing}; its columns are {handle.schema_arrow.names} "
                f"(set CaptionedDataConfig.text_column / image_column)"
            )
        first_row = 0
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group, columns=columns)
            texts = table.column(config.text_column).to_pylist()
            values = table.column(config.image_column).to_pylist()
            for row, (text, value) in enumerate(zip(texts, values)):
                name = f"{label} row {first_row + row}"
                full_name = f"{path} row {first_row + row}"
                if not isinstance(text, str):
                    detail = "null" if text is None else f"a {type(text).__name__}, not a string"
                    _bad(config, report, "missing caption", name, full_name, f"{config.text_column} is {detail}")
                    continue
                caption = text.strip()
                if not caption:
                    _bad(config, report, "empty caption", name, full_name, f"{config.text_column} is empty")
                    continue
                encoded = _image_bytes(value)
                if encoded is None:
                    _bad(config, report, "missing image", name, full_name, f"{config.image_column} holds no bytes")
                    continue
                try:
                    width, height = _probe(encoded, config.verify_images)
                except _IMAGE_ERRORS as error:
                    _bad(config, report, "corrupt image", name, full_name, f"{type(error).__name__}: {error}")
                    continue
                items.append(
                    _Item(name=name, caption=caption, width=width, height=height, row=(file_index, group, row))
                )
                if config.limit is not None and len(items) >= config.limit:
                    return items
            first_row += table.num_rows
    return items


def _bad(config: CaptionedDataConfig, report: SkipReport, reason: str, name: str, full_name: str, detail: str) -> None:
    """Record a bad item, or raise naming it when ``on_error="error"``."""
    if config.on_error == "error":
        raise ValueError(f"{reason}: {full_name} ({detail}); set on_error='skip' to leave such items out")
    report.record(reason, name, detail)


def _parquet_module() -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError("the 'parquet' captioned data source needs pyarrow: run `pip install pyarrow`") from error
    return parquet


def _image_bytes(value: Any) -> bytes | None:
    """Encoded bytes from a binary cell or a ``datasets`` Image struct ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


def _open(source: Path | bytes) -> Image.Image:
    return Image.open(source if isinstance(source, Path) else io.BytesIO(source))


def _probe(source: Path | bytes, verify: bool) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF rotation applied), from the header unless ``verify``."""
    with _open(source) as opened:
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


def _decode(source: Path | bytes, channels: int) -> Image.Image:
    """Decode, apply the EXIF rotation, flatten transparency onto white, convert to L or RGB."""
    with _open(source) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")
