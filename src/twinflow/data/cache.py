"""An offline cache of image latents and prompt embeddings, and the dataset that reads it.

Text-to-image training spends most of its time in the VAE and the text encoder unless their
outputs are computed once. :func:`cache_dataset` runs a captioned dataset (anything with
``len(dataset)`` and ``dataset[indices] -> (images, captions)``, e.g.
:class:`~twinflow.data.CaptionedImages`) through two callables,

* ``encode_images(images) -> latents``: images float ``(B, C, H, W)`` in ``[-1, 1]``;
* ``encode_prompts(captions) -> {name: tensor}``: a list of ``B`` strings to tensors with ``B`` rows
  (``{"prompt_embeds", "prompt_embeds_mask"}``, ``{"prompt_embeds", "pooled_prompt_embeds"}``, ...),

so the cache pass knows nothing of a particular VAE or text encoder (:func:`vae_encoder` builds the
first from a diffusers VAE, :func:`prompt_encoder` the second from a diffusers pipeline). :class:`CachedLatents` reads the result back lazily.

On-disk layout of ``out_dir``::

    index.json                 counts, shapes, dtypes, source, encoder, captions (see below)
    null_condition.safetensors optional: the encoded empty prompt, one row per key
                               (``cache_dataset(..., null_prompt="")`` or :func:`cache_null_condition`)
    shard_00000.safetensors    "latents" (n, ...) and one tensor per condition key (n, ...);
    shard_00001.safetensors    metadata "twinflow": JSON of the shard's captions and source indices
    ...

Shards hold at most ``shard_size`` items and items of one latent shape only: when the dataset
has aspect-ratio buckets (a ``bucket_ids`` attribute) items are cached bucket by bucket (stable
order within a bucket) and a new shard starts at every bucket change. Within a shard, condition
tensors whose lengths differ between encoder batches (dimension 1, e.g. prompt tokens) are
right-padded with zeros to the longest; :class:`CachedLatents` does the same across shards.
Zeros are also what a ``*_mask`` tensor uses for padding, so masked encoders stay exact.

Atomic and resumable: the pass writes into ``<out_dir>.partial/`` (a plan, then each shard to a
temporary name renamed into place once written) and renames the folder to ``out_dir`` only after
the index is written, so ``out_dir`` is either absent or complete. Run again after an
interruption with the same dataset and settings, it checks the plan, keeps the complete shards
and continues with the first missing one; since encoder batches never cross shards, the result
is the same as that of an uninterrupted pass (for deterministic encoders).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from twinflow.data.datasets import _is_int
from twinflow.families.latents import LatentNormalisation, config_value
from twinflow.families.prompts import pad_tokens

CACHE_FORMAT = "twinflow-latent-cache"
"""The ``format`` entry of every cache index."""

CACHE_VERSION = 1
"""The layout version; :class:`CachedLatents` refuses other versions."""

INDEX_FILE = "index.json"
NULL_CONDITION_FILE = "null_condition.safetensors"
"""The empty-prompt condition (one row per key), the null condition of training-time guidance."""
PLAN_FILE = "plan.json"
PARTIAL_SUFFIX = ".partial"
LATENTS_KEY = "latents"
"""The tensor name of the latents in every shard; condition keys may not use it."""

SHARD_METADATA_KEY = "twinflow"
"""The shard metadata entry: JSON ``{"captions": [...], "source_indices": [...]}`` of its items."""


def shard_name(number: int) -> str:
    """The file name of shard ``number``: ``shard_00000.safetensors``, ..."""
    return f"shard_{number:05d}.safetensors"


def cache_dataset(
    dataset: Any,
    encode_images: Callable[[Tensor], Tensor],
    encode_prompts: Callable[[list[str]], Mapping[str, Tensor]] | None,
    out_dir: str | Path,
    shard_size: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
    *,
    source: str | None = None,
    encoder: Any = None,
    overwrite: bool = False,
    null_prompt: str | None = None,
) -> CachedLatents:
    """Encode every item of ``dataset`` once and write the shards and index into ``out_dir``.

    Args:
        dataset: ``len(dataset)`` items; ``dataset[indices]`` (an int64 tensor) returns
            ``(images, captions)``. Optional attributes: ``bucket_ids`` (items are cached by
            bucket), ``captions`` (fingerprinted so that a resume with changed data is refused),
            ``description`` (the default ``source``), ``report`` with ``as_dict()`` (stored).
        encode_images: images ``(B, C, H, W)`` in ``[-1, 1]`` -> latents with ``B`` rows.
        encode_prompts: ``B`` captions -> a mapping of tensors with ``B`` rows; ``None`` caches
            latents (and captions) only.
        out_dir: the cache folder to create; ``<out_dir>.partial`` is used while it is written.
        shard_size: items per shard (fewer at bucket changes and at the end).
        batch_size: items per encoder call; calls never span two shards.
        progress: show a progress bar.
        source: what the data is, for the index (default: ``dataset.description`` or its type).
        encoder: a JSON-ready description of the encoders for the index (default: the
            ``description`` attribute of each callable, else its qualified name).
        overwrite: replace an existing cache, or a partial one made with another plan.
        null_prompt: also encode this prompt (normally ``""``) once and store it as the cache's
            null condition (:attr:`CachedLatents.null_condition`); ``None`` stores none.

    Returns:
        The finished cache, opened. If ``out_dir`` already holds a finished cache of the same
        plan it is returned without encoding anything.

    Raises:
        FileExistsError: ``out_dir`` holds a different cache and ``overwrite`` is false.
        ValueError: a leftover ``.partial`` folder has a different plan (and ``overwrite`` is
            false); an encoder returns the wrong number of rows, a non-tensor or the key ``latents``.
    """
    num_items = len(dataset)
    if num_items < 1:
        raise ValueError("cache_dataset needs a non-empty dataset")
    if not _is_int(shard_size) or shard_size < 1:
        raise ValueError(f"cache_dataset shard_size must be a positive int, got {shard_size!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"cache_dataset batch_size must be a positive int, got {batch_size!r}")
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    plan = _plan(dataset, int(shard_size), int(batch_size), source, encoder, encode_images, encode_prompts)
    plan_hash = _hash(plan)

    if out_dir.exists() and not overwrite:
        index_path = out_dir / INDEX_FILE
        existing = json.loads(index_path.read_text()) if index_path.is_file() else {}
        if existing.get("plan_sha256") == plan_hash:
            return CachedLatents(out_dir)
        raise FileExistsError(
            f"{out_dir} already exists and holds another cache (or none); pass --overwrite (overwrite=True in Python) to replace it"
        )
    if partial.exists():
        plan_path = partial / PLAN_FILE
        previous = json.loads(plan_path.read_text()) if plan_path.is_file() else None
        if previous != plan:
            if not overwrite:
                raise ValueError(
                    f"{partial} is left from an interrupted cache pass with other data or settings "
                    f"(its plan differs); delete it or pass --overwrite (overwrite=True in Python)"
                )
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / PLAN_FILE, plan)

    order = plan["order"]
    bar = tqdm(total=num_items, disable=not progress, unit="img", desc=f"caching {out_dir.name}")
    try:
        for number, (start, stop) in enumerate(plan["shards"]):
            path = partial / shard_name(number)
            if _shard_complete(path, stop - start):
                bar.update(stop - start)
                continue
            tensors, captions = _encode_shard(
                dataset, order[start:stop], plan["batch_size"], encode_images, encode_prompts, bar
            )
            # One metadata key: safetensors writes several in no fixed order, and equal runs should give equal files.
            metadata = {SHARD_METADATA_KEY: json.dumps({"captions": captions, "source_indices": order[start:stop]})}
            temporary = path.with_name(path.name + ".tmp")
            save_file(tensors, str(temporary), metadata=metadata)
            os.replace(temporary, path)
    finally:
        bar.close()

    if null_prompt is not None and encode_prompts is not None:
        cache_null_condition(partial, encode_prompts, null_prompt)
    index = _index(partial, plan, plan_hash, dataset)
    _write_json(partial / INDEX_FILE, index)
    (partial / PLAN_FILE).unlink()
    if out_dir.exists():  # overwrite: move the old cache aside only now that the new one is whole
        stale = out_dir.with_name(out_dir.name + ".old")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(out_dir, stale)
        os.replace(partial, out_dir)
        shutil.rmtree(stale)
    else:
        os.replace(partial, out_dir)
    return CachedLatents(out_dir)


def cache_null_condition(
    root: str | Path, encode_prompts: Callable[[list[str]], Mapping[str, Tensor]], prompt: str = ""
) -> Path:
    """Encode ``prompt`` (the empty prompt) and write it to ``root/null_condition.safetensors``.

    The training loop uses it as the null condition of the guidance-enhanced target; a cache
    without it falls back to zeros (see :attr:`CachedLatents.null_condition`).
    """
    condition = encode_prompts([prompt])
    if not isinstance(condition, Mapping) or not all(isinstance(v, Tensor) for v in condition.values()):
        raise ValueError("encode_prompts must return a mapping of tensors")
    tensors = {key: value.detach().cpu().contiguous()[:1] for key, value in condition.items()}
    path = Path(root) / NULL_CONDITION_FILE
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={SHARD_METADATA_KEY: json.dumps({"prompt": prompt})})
    os.replace(temporary, path)
    return path


class CachedLatents:
    """The items of a cache written by :func:`cache_dataset`, read lazily from the shards.

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
            partial = self.root.with_name(self.root.name + PARTIAL_SUFFIX)
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
        if isinstance(index, Tensor) and index.ndim == 0:
            index = int(index)
        if _is_int(index):
            position = int(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {len(self)} cached items")
            latents, condition = self._rows([position % len(self)])
            return latents[0], {key: value[0] for key, value in condition.items()}
        positions = torch.as_tensor(index, dtype=torch.int64).flatten().tolist()
        if not positions:
            raise ValueError("CachedLatents needs at least one index")
        for position in positions:
            if not 0 <= position < len(self):
                raise IndexError(f"index {position} is out of range for {len(self)} cached items")
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
        gathered = {key: _concatenate_rows(parts[key], key)[inverse] for key in keys}
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


class VaeEncoder:
    """``encode_images`` for :func:`cache_dataset` from a diffusers VAE (build with :func:`vae_encoder`).

    Images ``(B, C, H, W)`` in ``[-1, 1]`` go in; latents ``(B, c, H / f, W / f)`` normalised the
    way the family's pipelines do before the transformer come out:

    * ``AutoencoderKL`` (SD3, Flux, Z-Image): ``(z - shift_factor) * scaling_factor``
      (``shift_factor`` 0 when the config has none);
    * VAEs with ``latents_mean`` / ``latents_std`` in the config (``AutoencoderKLQwenImage``):
      ``(z - latents_mean) / latents_std`` per channel (times ``scaling_factor`` if the config
      also has one, as SDXL's pipelines do). Qwen-Image's VAE works on video (B, C, T, H, W):
      images are given ``T = 1`` and the frame axis is dropped again.

    ``z`` is the *mean* of the VAE's posterior by default. That keeps a cache reproducible:
    a resumed pass gives exactly what an uninterrupted one does, and two caches of the same data
    agree. (The posteriors of these VAEs are narrow, so a sample differs little from the mean.)
    With a ``generator`` ``z`` is a sample drawn with it instead; the draws then depend on how far
    the generator has advanced, so a resumed pass draws different noise for the remaining shards.
    """

    def __init__(self, vae: Any, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        config = vae.config
        self.vae = vae
        self.generator = generator
        self.dtype = dtype
        self.video = type(vae).__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLWan") or (
            config_value(config, "temperal_downsample") is not None
        )
        self.normalisation = LatentNormalisation(config)  # the rule generation undoes (twinflow.families)

    @property
    def description(self) -> dict[str, Any]:
        """A JSON-ready account of the VAE and the normalisation, for the cache index."""
        normalisation = self.normalisation
        return {
            "vae": type(self.vae).__name__,
            "latent": "posterior sample" if self.generator is not None else "posterior mean",
            "normalisation": normalisation.formula,
            "scaling_factor": normalisation.scaling_factor,
            "shift_factor": normalisation.shift_factor,
            "latents_mean": normalisation.latents_mean,
            "latents_std": normalisation.latents_std,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"vae_encoder expects images (B, C, H, W), got shape {tuple(images.shape)}")
        parameter = next(self.vae.parameters())
        pixels = images.to(parameter.device, parameter.dtype)
        if self.video:
            pixels = pixels.unsqueeze(2)
        output = self.vae.encode(pixels)
        distribution = output.latent_dist if hasattr(output, "latent_dist") else output[0]
        if self.generator is not None:
            latents = distribution.sample(generator=self.generator)
        else:
            latents = distribution.mode()
        if self.video:
            latents = latents.squeeze(2)
        return self.normalize(latents.float()).to(self.dtype)

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw VAE latents ``(B, c, h, w)`` -> the transformer's latents."""
        return self.normalisation.normalize(latents)

    def denormalize(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`: what the VAE's ``decode`` takes (add the frame axis for video VAEs)."""
        return self.normalisation.denormalize(latents)


def vae_encoder(vae: Any, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> VaeEncoder:
    """``encode_images`` for :func:`cache_dataset` from a diffusers VAE; see :class:`VaeEncoder`.

    Args:
        vae: an ``AutoencoderKL``, ``AutoencoderKLQwenImage`` or another diffusers VAE whose
            ``encode`` returns a ``latent_dist`` (used as it is: device, dtype, eval mode).
        generator: ``None`` takes the posterior mean (the default, reproducible); a generator
            (on the VAE's device) draws a posterior sample with it.
        dtype: the dtype of the returned latents (``torch.bfloat16`` halves the cache).
    """
    return VaeEncoder(vae, generator=generator, dtype=dtype)


class PromptEncoder:
    """``encode_prompts`` for :func:`cache_dataset` from a diffusers pipeline: the family's own
    prompt encoding (:meth:`twinflow.families.Family.encode`, what generation uses too), cast to
    ``dtype``. ``max_sequence_length`` None: the family's limit, else the pipeline's.

    Returns the condition mapping of the family's adapter (see :mod:`twinflow.adapters`):

    * Qwen-Image: ``{"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L)}``; the pipeline
      drops the mask when no token is padding, here it is then all ones, so every batch has
      the same keys;
    * Z-Image: the pipeline's unpadded per-caption embeddings right-padded with zeros into
      ``prompt_embeds`` (B, L, D), with ``prompt_embeds_mask`` (B, L) marking the real tokens;
    * SD3 and Flux: ``{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)}`` (no
      negative prompts: ``do_classifier_free_guidance=False`` for SD3).
    """

    def __init__(self, pipeline: Any, max_sequence_length: int | None = None, dtype: torch.dtype | None = None):
        from twinflow.families import PIPELINE_FAMILIES, pipeline_family

        family = pipeline_family(pipeline)
        if family is None:
            raise TypeError(
                f"prompt_encoder knows the pipelines {sorted(PIPELINE_FAMILIES)}, got {type(pipeline).__name__}; "
                f"write an encode_prompts callable for it"
            )
        self.pipeline = pipeline
        self.family = family.name
        self._family = family
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype

    @property
    def description(self) -> dict[str, Any]:
        """A JSON-ready account for the cache index."""
        return {
            "pipeline": type(self.pipeline).__name__,
            "family": self.family,
            "max_sequence_length": self.max_sequence_length,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        # The family's own encoding: the one generation uses (twinflow.families).
        condition = self._family.encode(
            self.pipeline, list(captions), _pipeline_device(self.pipeline), self.max_sequence_length
        )
        if self.dtype is not None:
            condition = {
                key: value.to(self.dtype) if value.is_floating_point() else value for key, value in condition.items()
            }
        return condition


def prompt_encoder(
    pipeline: Any, max_sequence_length: int | None = None, dtype: torch.dtype | None = None
) -> PromptEncoder:
    """``encode_prompts`` for :func:`cache_dataset` from a diffusers pipeline; see :class:`PromptEncoder`.

    Args:
        pipeline: a ``QwenImagePipeline``, ``ZImagePipeline``, ``StableDiffusion3Pipeline`` or
            ``FluxPipeline`` (only its text encoders and tokenizers are used; load it without
            the transformer and VAE to save memory).
        max_sequence_length: passed on to ``encode_prompt``; ``None`` keeps the pipeline's default.
        dtype: cast the floating-point outputs (``None`` keeps the text encoder's dtype).
    """
    return PromptEncoder(pipeline, max_sequence_length=max_sequence_length, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Helpers of the cache pass
# ---------------------------------------------------------------------------------------------


def _plan(
    dataset: Any,
    shard_size: int,
    batch_size: int,
    source: str | None,
    encoder: Any,
    encode_images: Callable,
    encode_prompts: Callable | None,
) -> dict[str, Any]:
    """What the pass will do: the item order, the shard boundaries and what is being encoded."""
    num_items = len(dataset)
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is None:
        order = list(range(num_items))
        buckets = [0] * num_items
    else:
        ids = torch.as_tensor(bucket_ids, dtype=torch.int64)
        if ids.shape != (num_items,):
            raise ValueError(f"dataset.bucket_ids must have shape ({num_items},), got {tuple(ids.shape)}")
        order = torch.sort(ids, stable=True).indices.tolist()
        buckets = ids[order].tolist()
    shards: list[list[int]] = []
    start = 0
    for position in range(1, num_items + 1):
        if position == num_items or position - start == shard_size or buckets[position] != buckets[start]:
            shards.append([start, position])
            start = position
    if encoder is None:
        encoder = {"images": _describe(encode_images), "prompts": _describe(encode_prompts)}
    captions = getattr(dataset, "captions", None)
    plan = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "num_items": num_items,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "source": source if source is not None else str(getattr(dataset, "description", type(dataset).__name__)),
        "encoder": encoder,
        "captions_sha256": None if captions is None else _hash(list(captions)),
        "order": order,
        "shards": shards,
    }
    return json.loads(json.dumps(plan))  # as it reads back from plan.json, for comparison


def _describe(function: Callable | None) -> Any:
    """An encoder's ``description`` attribute, else its qualified name (stable across runs)."""
    if function is None:
        return None
    description = getattr(function, "description", None)
    if description is not None:
        return description
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', None) or type(function).__module__}.{name}"


def _encode_shard(
    dataset: Any,
    indices: list[int],
    batch_size: int,
    encode_images: Callable,
    encode_prompts: Callable | None,
    bar: Any,
) -> tuple[dict[str, Tensor], list[str]]:
    """Encode one shard's items in batches; return its tensors and captions."""
    parts: dict[str, list[Tensor]] = {}
    captions: list[str] = []
    for start in range(0, len(indices), batch_size):
        batch = torch.tensor(indices[start : start + batch_size], dtype=torch.int64)
        images, texts = dataset[batch]
        texts = [str(text) for text in texts]
        with torch.no_grad():
            outputs = {LATENTS_KEY: encode_images(images)}
            if encode_prompts is not None:
                condition = encode_prompts(texts)
                if not isinstance(condition, Mapping):
                    raise ValueError(f"encode_prompts must return a mapping of tensors, got {type(condition).__name__}")
                if LATENTS_KEY in condition:
                    raise ValueError(f"encode_prompts may not return the key {LATENTS_KEY!r} (the latents use it)")
                outputs.update(condition)
        if parts and set(outputs) != set(parts):
            raise ValueError(f"encoder outputs changed keys between batches: {sorted(parts)} then {sorted(outputs)}")
        for key, value in outputs.items():
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != len(batch):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"encoder output {key!r} must be a tensor with {len(batch)} rows, got {shape}")
            parts.setdefault(key, []).append(value.detach().to("cpu"))
        captions.extend(texts)
        bar.update(len(batch))
    tensors = {key: _concatenate_rows(values, key).contiguous() for key, values in parts.items()}
    return tensors, captions


def _concatenate_rows(parts: list[Tensor], key: str) -> Tensor:
    """Concatenate along dimension 0, right-padding dimension 1 with zeros where lengths differ."""
    if len(parts) == 1:
        return parts[0]
    shapes = {tuple(part.shape[1:]) for part in parts}
    dtypes = {part.dtype for part in parts}
    if len(dtypes) > 1:
        raise ValueError(f"{key!r} has several dtypes {sorted(str(dtype) for dtype in dtypes)}")
    if len(shapes) > 1:
        if len({len(shape) for shape in shapes}) > 1 or len({shape[1:] for shape in shapes}) > 1:
            raise ValueError(f"{key!r} has per-item shapes {sorted(shapes)} that differ beyond dimension 1")
        length = max(shape[0] for shape in shapes)
        parts = [pad_tokens(part, length) for part in parts]
    return torch.cat(parts)


def _shard_complete(path: Path, num_items: int) -> bool:
    """True when ``path`` is a readable shard of ``num_items`` items (else it is removed)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            rows = handle.get_slice(LATENTS_KEY).get_shape()[0]
            complete = rows == num_items and SHARD_METADATA_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable shard is simply made again
        complete = False
    if not complete:
        path.unlink()
    return complete


def _index(folder: Path, plan: dict[str, Any], plan_hash: str, dataset: Any) -> dict[str, Any]:
    """The index of the finished shards in ``folder``."""
    shards: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, Any]] = {}
    captions: list[str] = []
    for number, (start, stop) in enumerate(plan["shards"]):
        name = shard_name(number)
        with safe_open(str(folder / name), framework="pt") as handle:
            captions.extend(json.loads(handle.metadata()[SHARD_METADATA_KEY])["captions"])
            shapes = {}
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shape = list(tensor_slice.get_shape())
                shapes[key] = shape
                entry = tensors.setdefault(key, {"dtype": _dtype_name(tensor_slice.get_dtype()), "shapes": []})
                if shape[1:] not in entry["shapes"]:
                    entry["shapes"].append(shape[1:])
        shards.append({"file": name, "num_items": stop - start, "shapes": shapes})
    ordered = {LATENTS_KEY: tensors.pop(LATENTS_KEY), **dict(sorted(tensors.items()))}
    report = getattr(dataset, "report", None)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "num_items": plan["num_items"],
        "num_shards": len(shards),
        "shard_size": plan["shard_size"],
        "batch_size": plan["batch_size"],
        "source": plan["source"],
        "encoder": plan["encoder"],
        "tensors": ordered,
        "shards": shards,
        "dataset_report": report.as_dict() if hasattr(report, "as_dict") else None,
        "plan_sha256": plan_hash,
        "source_indices": plan["order"],
        "captions": captions,
    }


def _dtype_name(safetensors_dtype: str) -> str:
    """safetensors' dtype names (``F32``, ``BF16``, ``I64``, ``BOOL``) as torch's (``float32``, ...)."""
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    }
    return names.get(safetensors_dtype, safetensors_dtype.lower())


def _pipeline_device(pipeline: Any) -> Any:
    """Where the pipeline runs its text encoders (diffusers' ``_execution_device``, else ``device``)."""
    device = getattr(pipeline, "_execution_device", None)
    return device if device is not None else getattr(pipeline, "device", None)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    """Write JSON to a temporary name and rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)
