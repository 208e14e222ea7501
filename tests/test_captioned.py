"""Tests for captioned data (twinflow.data.captioned and its scan, decoding and buckets): folders, parquet, bad items."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twinflow.data import (
    BucketBatches,
    CaptionedDataConfig,
    aspect_ratio_buckets,
    load_captioned,
    nearest_bucket,
    resize_center_crop,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _encoded(image: Image.Image, format: str = "PNG") -> bytes:
    stream = io.BytesIO()
    image.save(stream, format=format)
    return stream.getvalue()


def _expected(image: Image.Image, height: int, width: int, mode: str = "RGB") -> torch.Tensor:
    array = np.asarray(resize_center_crop(image.convert(mode), height, width), dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float() / 127.5 - 1.0


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Four good pairs (png, jpg in a sub-folder, webp, grayscale png) and three bad items."""
    root = tmp_path / "captioned"
    (root / "a" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _noise(40, 30, 0).save(root / "a" / "red.png")
    (root / "a" / "red.txt").write_text("  a wide picture\n")
    _noise(30, 40, 1).save(root / "a" / "sub" / "blue.jpg", quality=95)
    (root / "a" / "sub" / "blue.txt").write_text("a tall picture")
    _noise(24, 24, 2).save(root / "green.webp", lossless=True)
    (root / "green.txt").write_text("a square picture")
    _noise(20, 20, 3, "L").save(root / "gray.png")
    (root / "gray.txt").write_text("a gray picture")
    (root / "broken.png").write_bytes(b"this is not a png file")
    (root / "broken.txt").write_text("a corrupt picture")
    _noise(20, 20, 4).save(root / "nocap.png")
    _noise(20, 20, 5).save(root / "empty.png")
    (root / "empty.txt").write_text("  \n")
    _noise(20, 20, 6).save(root / ".hidden" / "secret.png")
    (root / ".hidden" / "secret.txt").write_text("ignored")
    (root / "notes.txt").write_text("a caption without an image")
    return root


GOOD = ["a/red.png", "a/sub/blue.jpg", "gray.png", "green.webp"]


def test_folder_skip_mode_counts_reports_and_yields_the_rest(folder: Path) -> None:
    with pytest.warns(UserWarning, match="3 bad items skipped"):
        dataset = load_captioned(CaptionedDataConfig(root=str(folder), image_size=16))
    assert len(dataset) == 4
    assert dataset.names == GOOD
    assert dataset.captions == ["a wide picture", "a tall picture", "a gray picture", "a square picture"]
    assert dataset.report.total == 3
    assert dataset.report.counts == {"corrupt image": 1, "missing caption": 1, "empty caption": 1}
    summary = dataset.report.summary()
    for name in ("broken.png", "nocap.png", "empty.png"):
        assert name in summary
    assert dataset.report.as_dict()["total"] == 3

    images, captions = dataset[torch.arange(4)]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert captions == dataset.captions
    torch.testing.assert_close(images[0], _expected(_noise(40, 30, 0), 16, 16), rtol=0, atol=0)
    torch.testing.assert_close(images[2], _expected(_noise(20, 20, 3, "L"), 16, 16), rtol=0, atol=0)
    image, caption = dataset[1]
    assert image.shape == (3, 16, 16) and caption == "a tall picture"


def test_report_names_only_the_first_few(folder: Path) -> None:
    with pytest.warns(UserWarning):
        dataset = load_captioned(CaptionedDataConfig(root=str(folder), image_size=16, report_limit=1))
    assert dataset.report.total == 3 and len(dataset.report.examples) == 1
    assert "first 1" in dataset.report.summary()


@pytest.mark.parametrize(
    ("remove", "expected"),
    [([], "broken.png"), (["broken.png"], "empty.png"), (["broken.png", "empty.png"], "nocap.png")],
)
def test_folder_error_mode_names_the_file(folder: Path, remove: list[str], expected: str) -> None:
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(ValueError, match=expected):
        load_captioned(CaptionedDataConfig(root=str(folder), image_size=16, on_error="error"))


def test_grayscale_and_limit(folder: Path) -> None:
    dataset = load_captioned(CaptionedDataConfig(root=str(folder), image_size=8, channels=1, limit=2))
    assert len(dataset) == 2 and dataset.report.total == 0  # the scan stops before the bad items
    assert dataset[0][0].shape == (1, 8, 8)


def test_truncated_image_is_found_while_decoding(tmp_path: Path) -> None:
    """A file whose header reads but whose pixels do not: replaced in skip mode, named in error mode."""
    for index in range(3):
        _noise(16, 16, index).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(f"caption {index}")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])

    dataset = load_captioned(CaptionedDataConfig(root=str(tmp_path), image_size=16))
    assert len(dataset) == 3 and dataset.report.total == 0  # the header scan passes it
    with pytest.warns(UserWarning, match="1.png"):
        images, captions = dataset[torch.tensor([0, 1])]
    assert captions == ["caption 0", "caption 2"]  # replaced by the next good item, caption included
    torch.testing.assert_close(images[1], dataset[2][0], rtol=0, atol=0)
    assert dataset.report.counts == {"corrupt image": 1} and "1.png" in dataset.report.summary()
    assert dataset[1][1] == "caption 2"  # known broken: no second decode or warning

    strict = load_captioned(CaptionedDataConfig(root=str(tmp_path), image_size=16, on_error="error"))
    with pytest.raises(ValueError, match="1.png"):
        strict[1]
    with pytest.warns(UserWarning, match="1 corrupt image"):
        verified = load_captioned(CaptionedDataConfig(root=str(tmp_path), image_size=16, verify_images=True))
    assert verified.names == ["0.png", "2.png"]


def test_resize_center_crop_shapes_and_centre() -> None:
    """A 60x20 strip red|white|blue cropped to 20x20 is the white centre, exactly (scale 1)."""
    strip = np.zeros((20, 60, 3), dtype=np.uint8)
    strip[:, :20] = (255, 0, 0)
    strip[:, 20:40] = 255
    strip[:, 40:] = (0, 0, 255)
    wide = Image.fromarray(strip)
    assert (np.asarray(resize_center_crop(wide, 20, 20)) == 255).all()
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    assert (np.asarray(resize_center_crop(tall, 20, 20)) == 255).all()
    assert resize_center_crop(wide, 8, 24).size == (24, 8)
    assert resize_center_crop(wide, 30, 10).size == (10, 30)  # upscales to cover
    square = _noise(16, 16, 0)
    assert resize_center_crop(square, 16, 16) is square


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("nothing")
    dataset = load_captioned(CaptionedDataConfig(root=str(tmp_path), image_size=8))
    assert (dataset[0][0] == 1.0).all()


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["struct", "binary"])
def test_parquet_round_trip(tmp_path: Path, layout: str) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    images = [_noise(24, 16, seed) for seed in range(5)]
    payloads = [_encoded(image) for image in images]
    payloads[3] = b"\x89PNG broken"
    captions = ["zero", "one", None, "three", "four"]
    if layout == "struct":
        column = pyarrow.array(
            [{"bytes": payload, "path": f"{index}.png"} for index, payload in enumerate(payloads)],
            type=pyarrow.struct([("bytes", pyarrow.binary()), ("path", pyarrow.string())]),
        )
    else:
        column = pyarrow.array(payloads, type=pyarrow.binary())
    table = pyarrow.table({"caption": pyarrow.array(captions, type=pyarrow.string()), "img": column})
    (tmp_path / "part").mkdir()
    parquet.write_table(table, tmp_path / "part" / "train-00000.parquet", row_group_size=2)
    config = CaptionedDataConfig(source="parquet", root=str(tmp_path), image_size=16, text_column="caption", image_column="img")

    with pytest.warns(UserWarning, match="2 bad items"):
        dataset = load_captioned(config)
    assert len(dataset) == 3
    assert dataset.captions == ["zero", "one", "four"]
    assert dataset.names == ["part/train-00000.parquet row 0", "part/train-00000.parquet row 1", "part/train-00000.parquet row 4"]
    assert dataset.report.counts == {"corrupt image": 1, "missing caption": 1}
    assert "row 2" in dataset.report.summary() and "row 3" in dataset.report.summary()
    batch, texts = dataset[torch.tensor([2, 0])]
    assert batch.shape == (2, 3, 16, 16) and texts == ["four", "zero"]
    torch.testing.assert_close(batch[0], _expected(images[4], 16, 16), rtol=0, atol=0)
    torch.testing.assert_close(batch[1], _expected(images[0], 16, 16), rtol=0, atol=0)

    with pytest.raises(ValueError, match="train-00000.parquet row 2"):
        load_captioned(CaptionedDataConfig(**{**config.__dict__, "on_error": "error"}))
    with pytest.raises(ValueError, match="no column"):
        load_captioned(CaptionedDataConfig(source="parquet", root=str(tmp_path), image_size=16))


# ---------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ---------------------------------------------------------------------------------------------


def test_aspect_ratio_buckets_cover_the_target_area() -> None:
    buckets = aspect_ratio_buckets(512)
    assert (512, 512) in buckets and len(buckets) == 7
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width / 512**2 - 1) < 0.1
    assert [width / height for height, width in buckets] == sorted(width / height for height, width in buckets)
    assert nearest_bucket(1920, 1080, buckets) == buckets.index(max(buckets, key=lambda size: size[1] / size[0]))
    assert buckets[nearest_bucket(100, 100, buckets)] == (512, 512)
    assert len(aspect_ratio_buckets(16, multiple=16)) < 7  # small sizes collapse to fewer buckets


def test_buckets_assign_images_by_aspect_ratio(folder: Path) -> None:
    # An EXIF-rotated JPEG: stored 40x20 (wide), displayed 20x40 (tall).
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(40, 20, 7).save(folder / "rotated.jpg", exif=exif.tobytes())
    (folder / "rotated.txt").write_text("rotated")
    with pytest.warns(UserWarning):
        dataset = load_captioned(CaptionedDataConfig(root=str(folder), image_size=32, buckets=True, bucket_multiple=8))
    sizes = {name: dataset.image_size(index) for index, name in enumerate(dataset.names)}
    assert sizes["a/red.png"] == (24, 40)  # 40x30 is 4:3 -> width 36.9 -> 40, height 27.7 -> 24
    assert sizes["a/sub/blue.jpg"] == (40, 24)
    assert sizes["green.webp"] == (32, 32)
    assert sizes["rotated.jpg"][0] > sizes["rotated.jpg"][1]
    for index in range(len(dataset)):
        assert dataset[index][0].shape[1:] == dataset.image_size(index)
    with pytest.raises(ValueError, match="BucketBatches"):
        dataset[torch.arange(len(dataset))]


def _bucket_ids(count: int = 53, buckets: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, buckets, (count,), generator=torch.Generator().manual_seed(seed))


def test_bucket_batches_are_same_bucket_and_cover_each_epoch_once() -> None:
    ids = _bucket_ids()
    batches = BucketBatches(ids, batch_size=4, seed=3)
    expected_per_epoch = sum(int((ids == bucket).sum()) // 4 for bucket in range(4))
    assert batches.batches_per_epoch == expected_per_epoch
    epoch = [batches.next_indices() for _ in range(expected_per_epoch)]
    for batch in epoch:
        assert batch.shape == (4,) and batch.dtype == torch.int64
        assert len(set(ids[batch].tolist())) == 1
    seen = torch.cat(epoch).tolist()
    assert len(seen) == len(set(seen))  # no item twice in an epoch
    assert batches.epoch == 0
    batches.next_indices()
    assert (batches.epoch, batches.position) == (1, 1)


def test_bucket_batches_are_seeded_and_resume_exactly() -> None:
    ids = _bucket_ids()
    reference = BucketBatches(ids, batch_size=3, seed=7)
    stream = [reference.next_indices() for _ in range(40)]  # crosses two epoch boundaries
    again = BucketBatches(ids, batch_size=3, seed=7)
    assert all(torch.equal(a, again.next_indices()) for a in stream)
    other = BucketBatches(ids, batch_size=3, seed=8)
    assert not all(torch.equal(a, other.next_indices()) for a in stream)

    interrupted = BucketBatches(ids, batch_size=3, seed=7)
    for _ in range(23):
        interrupted.next_indices()
    state = interrupted.state_dict()
    resumed = BucketBatches(ids, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_indices()) for a in stream[23:])


def test_bucket_batches_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="larger than every bucket"):
        BucketBatches(torch.tensor([0, 0, 1, 1, 2]), batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatches(torch.tensor([0, 0]), batch_size=0)
    batches = BucketBatches(torch.tensor([0, 0, 1, 1]), batch_size=2)
    with pytest.raises(ValueError, match="position"):
        batches.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="missing key"):
        batches.load_state_dict({"epoch": 0})


@pytest.mark.parametrize(
    "changes",
    [{"source": "web"}, {"root": None}, {"image_size": 0}, {"channels": 2}, {"on_error": "ignore"},
     {"bucket_ratios": (1.0, -2.0)}, {"buckets": True, "image_size": 8, "bucket_multiple": 16}, {"limit": 0}],
)
def test_config_validation(changes: dict) -> None:
    with pytest.raises(ValueError):
        CaptionedDataConfig(**{"root": "somewhere", **changes})


def test_missing_root_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_captioned(CaptionedDataConfig(root=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="no image files"):
        load_captioned(CaptionedDataConfig(root=str(tmp_path)))
