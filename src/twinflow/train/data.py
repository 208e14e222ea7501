"""What the training loop reads: one small interface over labelled images and latent caches.

The loop draws global batches of indices (:class:`~twinflow.data.ShuffledBatches`) and asks the
training data for ``(data, condition)`` and the matching null condition, so the same loop and
objective train a class-conditional U-Net on MNIST and a text-to-image transformer on cached
latents. ``data.source`` picks the kind (:data:`TRAINING_DATA`).

Null conditions (the "empty" condition of the guidance-enhanced target, spec 2.2):

* labelled images: the extra class ``num_classes``;
* a latent cache: the cache's encoded empty prompt (``null_condition.safetensors``, written by
  ``cache_dataset(..., null_prompt="")``), repeated over the batch. An edit cache holds each
  item's own null condition (the null prompt with the item's source images, ``null.*`` keys),
  and the source latents stay in it: the guidance target, the fake flow and the rectification
  all see the same source images. A cache without it falls
  back to zeros for the floating-point tensors (prompt embeddings, pooled embeddings) while
  integer and boolean tensors (attention masks) are copied from the batch, so every sample keeps
  at least one unmasked token. The fallback is the "zero text" null condition; cache the empty
  prompt to train the guidance term as the pretrained models were trained.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from twinflow.conditions import Condition
from twinflow.data import BucketBatches, CachedLatents, DataConfig, ImageDataset, ShuffledBatches, load_dataset
from twinflow.data.cache_format import ITEM_NULL_PREFIX, split_item_null
from twinflow.families.prompts import pad_tokens
from twinflow.train.config import LATENT_CACHE


class TrainingData(Protocol):
    """What the loop needs from a data set."""

    class_conditional: bool  # whether class grids can be sampled from it

    def __len__(self) -> int: ...

    def batch_order(self, batch_size: int, seed: int) -> ShuffledBatches | BucketBatches:
        """The seeded, resumable order of global batches (every batch must fit :meth:`batch`)."""

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Tensor, Condition, Condition]:
        """``(data, condition, null condition)`` of the items ``indices``, on ``device``."""

    def description(self) -> dict[str, Any]:
        """JSON-ready facts stored in every checkpoint."""


class LabelledImages:
    """An :class:`~twinflow.data.ImageDataset` (MNIST, image folders): class labels, null class ``num_classes``."""

    class_conditional = True

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        self.image_shape = dataset.image_shape
        self.num_classes = dataset.num_classes
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_order(self, batch_size: int, seed: int) -> ShuffledBatches:
        return ShuffledBatches(len(self.dataset), batch_size, seed=seed)

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = self.dataset[indices]
        labels = labels.to(device)
        return images.to(device), labels, torch.full_like(labels, self.num_classes)

    def description(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "image_shape": list(self.image_shape)}


def other_class_labels(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """For each label a uniformly random *other* class (``training.unconditional_label:
    other_class``): the guidance target ``v + w (F(c) - F(c'))`` then contrasts each class with a
    trained one, where the null class's embedding gets no gradient from any loss. The reference's
    MNIST tutorial uses the batch's labels shuffled (the same class with probability about
    1 / num_classes, and the label itself in a batch of one); this draws per sample, whatever the
    per-process batch."""
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator, device=generator.device)
    return (labels + offsets.to(labels.device)) % num_classes


class CachedLatentData:
    """A latent cache (:class:`~twinflow.data.CachedLatents`) of one or more latent shapes.

    A cache of several aspect-ratio buckets is drawn one bucket per global batch
    (:class:`~twinflow.data.BucketBatches`), so every batch stacks latents of one shape; a cache
    of one shape keeps the plain shuffled order. Latents and floating-point conditions are
    returned in float32 (bf16 autocast, when asked, applies inside the model); see the module
    notes for the null condition.
    """

    class_conditional = False

    def __init__(self, cache: CachedLatents):
        self.cache = cache
        self.latent_shapes = list(cache.buckets)  # one per aspect-ratio bucket
        self.null = cache.null_condition

    def __len__(self) -> int:
        return len(self.cache)

    def batch_order(self, batch_size: int, seed: int) -> ShuffledBatches | BucketBatches:
        if len(self.latent_shapes) == 1:
            return ShuffledBatches(len(self.cache), batch_size, seed=seed)
        return BucketBatches(self.cache.bucket_ids, batch_size, seed=seed)

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        latents, condition = self.cache[indices]
        condition, item_null = split_item_null({key: _float32(value).to(device) for key, value in condition.items()})
        null = item_null if item_null is not None else self.null_condition(condition)
        return _float32(latents).to(device), *match_lengths(condition, null)

    def null_condition(self, condition: dict[str, Tensor]) -> dict[str, Tensor]:
        count = next(iter(condition.values())).shape[0]
        if self.null is None:
            return {key: value if _is_mask(value) else torch.zeros_like(value) for key, value in condition.items()}
        if set(self.null) != set(condition):
            raise ValueError(
                f"the cache's null condition has keys {sorted(self.null)}, its items {sorted(condition)}"
            )
        device = next(iter(condition.values())).device
        return {key: _float32(value).to(device).expand(count, *value.shape[1:]).clone() for key, value in self.null.items()}

    def description(self) -> dict[str, Any]:
        if any(key.startswith(ITEM_NULL_PREFIX) for key in self.cache.condition_keys):
            null = "per item (the null prompt with the item's source images)"
        else:
            null = "cached empty prompt" if self.null is not None else "zeros (no null_condition.safetensors)"
        return {"latent_cache": str(self.cache.root), "latent_shapes": [list(shape) for shape in self.latent_shapes], "null_condition": null}


def match_lengths(condition: dict[str, Tensor], null: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Right-pad token dimensions (1) with zeros to a common length, as the cache does between
    shards, so the guidance target can batch condition and null condition together."""
    padded_condition, padded_null = {}, {}
    for key, value in condition.items():
        other = null[key]
        if value.ndim >= 2 and value.shape[1] != other.shape[1]:
            length = max(value.shape[1], other.shape[1])
            value, other = pad_tokens(value, length), pad_tokens(other, length)
        padded_condition[key], padded_null[key] = value, other
    return padded_condition, padded_null


def _is_mask(tensor: Tensor) -> bool:
    return not tensor.is_floating_point()


def _float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def load_training_data(data: dict) -> TrainingData:
    """The training data that ``data`` (the config section) names."""
    if data["source"] == LATENT_CACHE:
        return CachedLatentData(CachedLatents(data["root"]))
    return LabelledImages(load_dataset(DataConfig(**data)))
