"""The pre-scan of captioned data: which folder images and parquet rows are usable, before training.

Loading (:func:`twinflow.data.load_captioned`) reads every caption and the header of every image
(format and size, a few hundred bytes; ``verify_images=True`` decodes the whole image too). The
scan is needed anyway, since buckets need each image's size before the first batch, and it fixes
the index space, ``len(dataset)`` and therefore the batch order before training starts. Missing,
empty or undecodable captions and images whose header cannot be read are either counted in the
:class:`SkipReport` (``on_error="skip"``) or raise a ``ValueError`` naming the file
(``on_error="error"``). The scan returns a :class:`ScannedItem` for every good item, in sorted
file / row order.

The two sources:

* folder (:func:`scan_folder`): every image under ``root`` (recursively; suffixes in
  :data:`CAPTIONED_IMAGE_EXTENSIONS`; hidden files and folders left out) with its caption in
  the file of the same name and the suffix :data:`CAPTION_SUFFIX` beside it;
* parquet (:func:`scan_parquet`): one ``.parquet`` file, or every one under a folder
  (:func:`find_parquet_files`), read one row group at a time; an image cell holds encoded
  bytes, raw or in a Hugging Face ``datasets`` ``Image`` struct (:func:`image_bytes`). Needs
  ``pyarrow``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinflow.data.image_decoding import IMAGE_ERRORS, probe_size

if TYPE_CHECKING:
    from twinflow.data.captioned import CaptionedDataConfig

CAPTIONED_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""Image suffixes (compared case-insensitively) the folder source reads; other files are ignored."""

CAPTION_SUFFIX = ".txt"
"""A folder image's caption is the file with the image's name and this suffix."""


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
class ScannedItem:
    """One good item found by the pre-scan."""

    name: str  # what reports and errors call it: a path, or "file.parquet row 12"
    caption: str
    width: int  # after EXIF rotation
    height: int
    path: Path | None = None  # folder source
    row: tuple[int, int, int] | None = None  # parquet source: (file index, row group, row in group)
    sources: tuple[Path, ...] = ()  # folder edit triplets: the source images' files


def scan_folder(root: Path, config: CaptionedDataConfig, report: SkipReport) -> list[ScannedItem]:
    """The good ``(image, caption)`` pairs under ``root``, in sorted relative-path order."""
    if not root.is_dir():
        raise ValueError(f"captioned image folder root is not a directory: {root}")
    source_roots = [Path(source) for source in config.source_roots]
    for source in source_roots:
        if not source.is_dir():
            raise ValueError(f"edit source folder (source_roots) is not a directory: {source}")
    images = sorted(
        (
            path
            for path in root.rglob("*")
            if path.suffix.lower() in CAPTIONED_IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
            and not any(path.is_relative_to(source) for source in source_roots)  # sources are no targets
            and path.is_file()
        ),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    if not images:
        raise ValueError(
            f"captioned image folder {root} has no image files (looked for suffixes {list(CAPTIONED_IMAGE_EXTENSIONS)})"
        )
    items: list[ScannedItem] = []
    for path in images:
        item = _folder_item(path, root, config, report)
        if item is not None:
            items.append(item)
            if config.limit is not None and len(items) >= config.limit:
                break
    return items


def _folder_item(path: Path, root: Path, config: CaptionedDataConfig, report: SkipReport) -> ScannedItem | None:
    """The item of image ``path`` and its caption file, or ``None`` (recorded) when either is bad."""
    name = path.relative_to(root).as_posix()
    caption_path = path.with_suffix(CAPTION_SUFFIX)
    try:
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
    except (OSError, UnicodeDecodeError) as error:
        _record_bad(config, report, "unreadable caption", name, str(path), f"{caption_path.name}: {error}")
        return None
    if caption is None:
        _record_bad(config, report, "missing caption", name, str(path), f"no {caption_path.name}")
        return None
    if not caption:
        _record_bad(config, report, "empty caption", name, str(path), f"{caption_path.name} is empty")
        return None
    try:
        width, height = probe_size(path, config.verify_images)
    except IMAGE_ERRORS as error:
        _record_bad(config, report, "corrupt image", name, str(path), f"{type(error).__name__}: {error}")
        return None
    sources = []
    for source_root in config.source_roots:
        source = _source_file(Path(source_root), path.relative_to(root))
        if source is None:
            _record_bad(config, report, "missing source image", name, str(path), f"no {Path(source_root) / path.relative_to(root).stem}.*")
            return None
        try:
            probe_size(source, config.verify_images)
        except IMAGE_ERRORS as error:
            _record_bad(config, report, "corrupt source image", name, str(source), f"{type(error).__name__}: {error}")
            return None
        sources.append(source)
    return ScannedItem(name=name, caption=caption, width=width, height=height, path=path, sources=tuple(sources))


def _source_file(source_root: Path, relative: Path) -> Path | None:
    """The source image of the target ``relative``: same relative name, any image suffix."""
    folder = source_root / relative.parent
    if not folder.is_dir():
        return None
    matches = sorted(
        path for path in folder.iterdir()
        if path.stem == relative.stem and path.suffix.lower() in CAPTIONED_IMAGE_EXTENSIONS and path.is_file()
    )
    return matches[0] if matches else None


def find_parquet_files(root: Path) -> list[Path]:
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


def scan_parquet(
    files: Sequence[Path], root: Path, config: CaptionedDataConfig, report: SkipReport
) -> list[ScannedItem]:
    """The good rows of ``files``, read one row group at a time."""
    parquet = parquet_module()
    columns = [config.text_column, config.image_column, *config.source_columns]
    items: list[ScannedItem] = []
    for file_index, path in enumerate(files):
        label = path.name if path == root else path.relative_to(root).as_posix()
        handle = parquet.ParquetFile(path)
        missing = [column for column in columns if column not in handle.schema_arrow.names]
        if missing:
            raise ValueError(
                f"parquet file {path} has no column(s) {missing}; its columns are {handle.schema_arrow.names} "
                f"(set CaptionedDataConfig.text_column / image_column / source_columns)"
            )
        first_row = 0
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group, columns=columns)
            texts = table.column(config.text_column).to_pylist()
            values = table.column(config.image_column).to_pylist()
            sources = [table.column(column).to_pylist() for column in config.source_columns]
            for row, (text, value) in enumerate(zip(texts, values)):
                names = (f"{label} row {first_row + row}", f"{path} row {first_row + row}")
                item = _parquet_item(text, value, names, (file_index, group, row), config, report)
                if item is not None and not _parquet_sources_good([column[row] for column in sources], names, config, report):
                    item = None
                if item is not None:
                    items.append(item)
                    if config.limit is not None and len(items) >= config.limit:
                        return items
            first_row += table.num_rows
    return items


def _parquet_item(
    text: Any,
    value: Any,
    names: tuple[str, str],
    row: tuple[int, int, int],
    config: CaptionedDataConfig,
    report: SkipReport,
) -> ScannedItem | None:
    """The item of one parquet row (``names``: short and full), or ``None`` (recorded) when it is bad."""
    name, full_name = names
    if not isinstance(text, str):
        detail = "null" if text is None else f"a {type(text).__name__}, not a string"
        _record_bad(config, report, "missing caption", name, full_name, f"{config.text_column} is {detail}")
        return None
    caption = text.strip()
    if not caption:
        _record_bad(config, report, "empty caption", name, full_name, f"{config.text_column} is empty")
        return None
    encoded = image_bytes(value)
    if encoded is None:
        _record_bad(config, report, "missing image", name, full_name, f"{config.image_column} holds no bytes")
        return None
    try:
        width, height = probe_size(encoded, config.verify_images)
    except IMAGE_ERRORS as error:
        _record_bad(config, report, "corrupt image", name, full_name, f"{type(error).__name__}: {error}")
        return None
    return ScannedItem(name=name, caption=caption, width=width, height=height, row=row)


def _parquet_sources_good(values: list[Any], names: tuple[str, str], config: CaptionedDataConfig, report: SkipReport) -> bool:
    """Whether every source cell of a row holds a readable image (else the row is recorded as bad)."""
    for column, value in zip(config.source_columns, values):
        encoded = image_bytes(value)
        if encoded is None:
            _record_bad(config, report, "missing source image", *names, f"{column} holds no bytes")
            return False
        try:
            probe_size(encoded, config.verify_images)
        except IMAGE_ERRORS as error:
            _record_bad(config, report, "corrupt source image", *names, f"{column}: {type(error).__name__}: {error}")
            return False
    return True


def _record_bad(
    config: CaptionedDataConfig, report: SkipReport, reason: str, name: str, full_name: str, detail: str
) -> None:
    """Record a bad item, or raise naming it when ``on_error="error"``."""
    if config.on_error == "error":
        raise ValueError(f"{reason}: {full_name} ({detail}); set on_error='skip' to leave such items out")
    report.record(reason, name, detail)


def parquet_module() -> Any:
    """``pyarrow.parquet``, or an ImportError that says how to install it."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError("the 'parquet' captioned data source needs pyarrow: run `pip install pyarrow`") from error
    return parquet


def image_bytes(value: Any) -> bytes | None:
    """Encoded bytes from a binary cell or a ``datasets`` Image struct ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None
