"""Reading a latent cache back: :class:`CachedLatents`, a lazy dataset over its shards.

The cache is written by :func:`twinflow.data.cache_dataset` (:mod:`twinflow.data.cache_writer`)
in the format of :mod:`twinflow.data.cache_format`. Reading it needs neither the VAE nor the text
encoder: the training loop (:mod:`twinflow.train.data`) draws batches of latents and prompt
embeddings from it, memory-mapped, reading only the requested rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from twinflow.data.buckets import item_positions
from twinflow.data.cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_FILE,
    LATENTS_KEY,
    NULL_CONDITION_FILE,
    concatenate_rows,
    partial_folder,
)


class CachedLatents:
    """The items of a cache written by :func:`~twinflow.data.cache_dataset`, read lazily from its shards.

    ``cache[i]`` is ``(latents, condition)`` for one item: a tensor ``(C, h, w)`` and a dict of
    tensors without the batch dimension. ``cache[indices]`` (a LongTensor or a sequence of ints,
    e.g. from :class:`~twinflow.data.ShuffledBatches`) is ``(latents (B, C, h, w), {key: (B, ...)})``.
    Tensors keep the dtype they were cached in; condition tensors of different lengths
    (dimension 1) are right-padded with zeros. The shards are opened with safetensors'
    ``safe_open`` (memory-mapped) and only the requested rows are read.

    A cache of several aspect-ratio buckets holds latents of several shapes; batches must then
    come from one bucket: use :class:`~twinflow.data.BucketBatches` with :attr:`bucket_ids`.

    Attributes:
        root: the cache folder.
        index: the parsed ``index.json``.
        captions: the caption of every item, in cache order.
        source_indices: int64 ``(N,)``, the dataset index each item was made from.
        condition_keys: the names of the condition tensors.
        buckets: the distinct per-item latent shapes, in order of first appearance.
        bucket_ids: int64 ``(N,)``, each item's index into ``buckets``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            partial = partial_folder(self.root)
            hint = f"; {partial} holds an unfinished pass, run cache_dataset again" if partial.exists() else ""
            raise FileNotFoundError(f"no latent cache at {self.root} ({INDEX_FILE} not found{hint})")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != CACHE_FORMAT or self.index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{index_path} is not a version {CACHE_VERSION} {CACHE_FORMAT} index "
                f"(format {self.index.get('format')!r}, version {self.index.get('version')!r})"
            )
        shards = self.index["shards"]
        for shard in shards:
            if not (self.root / shard["file"]).is_file():
                raise FileNotFoundError(f"latent cache {self.root} is missing shard {shard['file']}")
        counts = [shard["num_items"] for shard in shards]
        self._offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
        self._files = [self.root / shard["file"] for shard in shards]
        self._handles: dict[int, Any] = {}
        self.captions: list[str] = list(self.index["captions"])
        self.source_indices = torch.tensor(self.index["source_indices"], dtype=torch.int64)
        self.condition_keys: tuple[str, ...] = tuple(key for key in self.index["tensors"] if key != LATENTS_KEY)
        self.buckets: list[tuple[int, ...]] = []
        ids: list[int] = []
        for shard in shards:
            shape = tuple(shard["shapes"][LATENTS_KEY][1:])
            if shape not in self.buckets:
                self.buckets.append(shape)
            ids.extend([self.buckets.index(shape)] * shard["num_items"])
        self.bucket_ids = torch.tensor(ids, dtype=torch.int64)
        if len(self.captions) != len(self) or len(self.source_indices) != len(self):
            raise ValueError(f"{index_path} is inconsistent: {len(self)} items in shards, {len(self.captions)} captions")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def null_condition(self) -> dict[str, Tensor] | None:
        """The cached empty-prompt condition ``{key: (1, ...)}``, or ``None`` if the cache has none."""
        path = self.root / NULL_CONDITION_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The per-item latent shape, e.g. ``(C, h, w)``; only for a cache with one bucket."""
        if len(self.buckets) != 1:
            raise ValueError(f"this cache holds latents of {len(self.buckets)} shapes: {self.buckets}")
        return self.buckets[0]

    def __getitem__(self, index: int | Tensor | Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
        positions = item_positions(index, len(self), "CachedLatents", "cached items")
        if isinstance(positions, int):
            latents, condition = self._rows([positions])
            return latents[0], {key: value[0] for key, value in condition.items()}
        buckets = {int(self.bucket_ids[position]) for position in positions}
        if len(buckets) > 1:
            raise ValueError(
                f"indices span latents of several shapes {sorted(self.buckets[b] for b in buckets)}; "
                f"draw batches with BucketBatches(cache.bucket_ids, batch_size, seed)"
            )
        return self._rows(positions)

    def _rows(self, positions: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """Read ``positions`` (in that order), coalescing consecutive rows of a shard into one read."""
        shards = (torch.searchsorted(self._offsets, torch.tensor(positions), right=True) - 1).tolist()
        keys = (LATENTS_KEY, *self.condition_keys)
        parts: dict[str, list[Tensor]] = {key: [] for key in keys}
        order: list[int] = []  # where each read row goes in the answer
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for slot, (position, shard) in enumerate(zip(positions, shards)):
            by_shard.setdefault(shard, []).append((position - int(self._offsets[shard]), slot))
        for shard, rows in by_shard.items():
            handle = self._handle(shard)
            rows.sort()
            runs: list[list[tuple[int, int]]] = []
            for row, slot in rows:
                if runs and runs[-1][-1][0] + 1 == row:
                    runs[-1].append((row, slot))
                else:
                    runs.append([(row, slot)])
            for key in keys:
                tensor_slice = handle.get_slice(key)
                for run in runs:
                    parts[key].append(tensor_slice[run[0][0] : run[-1][0] + 1])
            order.extend(slot for run in runs for _, slot in run)
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        gathered = {key: concatenate_rows(parts[key], key)[inverse] for key in keys}
        latents = gathered.pop(LATENTS_KEY)
        return latents, gathered

    def _handle(self, shard: int) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self._files[shard]), framework="pt")
            self._handles[shard] = handle
        return handle

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open shard handles (for DataLoader workers)."""
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
