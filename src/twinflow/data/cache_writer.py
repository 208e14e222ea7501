"""Writing a latent cache: one pass of a captioned dataset through a VAE and a text encoder.

Text-to-image training spends most of its time in the VAE and the text encoder unless their
outputs are computed once. :func:`cache_dataset` runs a captioned dataset (anything with
``len(dataset)`` and ``dataset[indices] -> (images, captions)``, e.g.
:class:`~twinflow.data.CaptionedImages`) through two callables,

* ``encode_images(images) -> latents``: images float ``(B, C, H, W)`` in ``[-1, 1]``;
* ``encode_prompts(captions) -> {name: tensor}``: a list of ``B`` strings to tensors with ``B`` rows
  (``{"prompt_embeds", "prompt_embeds_mask"}``, ``{"prompt_embeds", "pooled_prompt_embeds"}``, ...);
  for edit triplets (``dataset[indices] -> (images, captions, sources)``) ``encode_prompts(captions,
  sources)``, which also encodes the sources and each item's null condition
  (:class:`~twinflow.data.encoders.EditEncoder`),

so the cache pass knows nothing of a particular VAE or text encoder (:mod:`twinflow.data.encoders`
builds both from diffusers models). It writes the format of :mod:`twinflow.data.cache_format`
and returns the cache opened with :class:`~twinflow.data.CachedLatents`.

Shards hold at most ``shard_size`` items and items of one latent shape only: when the dataset
has aspect-ratio buckets (a ``bucket_ids`` attribute) items are cached bucket by bucket (stable
order within a bucket) and a new shard starts at every bucket change. Within a shard, condition
tensors whose lengths differ between encoder batches (dimension 1, e.g. prompt tokens) are
right-padded with zeros to the longest.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from twinflow.data.cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_FILE,
    LATENTS_KEY,
    NULL_CONDITION_FILE,
    PLAN_FILE,
    SHARD_METADATA_KEY,
    concatenate_rows,
    partial_folder,
    shard_name,
)
from twinflow.data.cache_reader import CachedLatents
from twinflow.checks import is_integer


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
            null condition (:attr:`~twinflow.data.CachedLatents.null_condition`); ``None`` stores none.

    Returns:
        The finished cache, opened. If ``out_dir`` already holds a finished cache of the same
        plan it is returned without encoding anything.

    Raises:
        FileExistsError: ``out_dir`` holds a different cache and ``overwrite`` is false.
        ValueError: a leftover ``.partial`` folder has a different plan (and ``overwrite`` is
            false); an encoder returns the wrong number of rows, a non-tensor or the key ``latents``.
    """
    _check_pass(dataset, shard_size, batch_size)
    out_dir = Path(out_dir)
    partial = partial_folder(out_dir)
    plan = _plan(dataset, int(shard_size), int(batch_size), source, encoder, encode_images, encode_prompts)
    plan_hash = _hash(plan)
    if out_dir.exists() and not overwrite:
        return _finished_cache(out_dir, plan_hash)
    _start_or_resume(partial, plan, overwrite)
    _write_shards(dataset, plan, partial, encode_images, encode_prompts, progress, f"caching {out_dir.name}")
    if null_prompt is not None and encode_prompts is not None:
        cache_null_condition(partial, encode_prompts, null_prompt)
    _write_json(partial / INDEX_FILE, _index(partial, plan, plan_hash, dataset))
    (partial / PLAN_FILE).unlink()
    _publish(partial, out_dir)
    return CachedLatents(out_dir)


def cache_null_condition(
    root: str | Path, encode_prompts: Callable[[list[str]], Mapping[str, Tensor]], prompt: str = ""
) -> Path:
    """Encode ``prompt`` (the empty prompt) and write it to ``root/null_condition.safetensors``.

    The training loop uses it as the null condition of the guidance-enhanced target; a cache
    without it falls back to zeros (see :attr:`~twinflow.data.CachedLatents.null_condition`).
    """
    # An encoder may encode the null prompt its own way (PromptEncoder.encode_null: Sana's has no instruction).
    encode_null = getattr(encode_prompts, "encode_null", None)
    condition = encode_null(prompt) if callable(encode_null) else encode_prompts([prompt])
    if not isinstance(condition, Mapping) or not all(isinstance(v, Tensor) for v in condition.values()):
        raise ValueError("encode_prompts must return a mapping of tensors")
    tensors = {key: value.detach().cpu().contiguous()[:1] for key, value in condition.items()}
    path = Path(root) / NULL_CONDITION_FILE
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={SHARD_METADATA_KEY: json.dumps({"prompt": prompt})})
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------
# The steps of the cache pass
# ---------------------------------------------------------------------------------------------


def _check_pass(dataset: Any, shard_size: Any, batch_size: Any) -> None:
    """Refuse an empty dataset and sizes that are not positive ints."""
    if len(dataset) < 1:
        raise ValueError("cache_dataset needs a non-empty dataset")
    if not is_integer(shard_size) or shard_size < 1:
        raise ValueError(f"cache_dataset shard_size must be a positive int, got {shard_size!r}")
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"cache_dataset batch_size must be a positive int, got {batch_size!r}")


def _finished_cache(out_dir: Path, plan_hash: str) -> CachedLatents:
    """The cache already in ``out_dir`` when it was made with this plan; else refuse to touch it."""
    index_path = out_dir / INDEX_FILE
    existing = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if existing.get("plan_sha256") == plan_hash:
        return CachedLatents(out_dir)
    raise FileExistsError(
        f"{out_dir} already exists and holds another cache (or none); "
        f"pass --overwrite (overwrite=True in Python) to replace it"
    )


def _start_or_resume(partial: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Keep a ``.partial`` folder of the same plan (to resume it), else start one and write the plan."""
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


def _write_shards(
    dataset: Any,
    plan: dict[str, Any],
    partial: Path,
    encode_images: Callable,
    encode_prompts: Callable | None,
    progress: bool,
    description: str,
) -> None:
    """Encode and write every shard of ``plan`` that ``partial`` does not hold complete yet."""
    order = plan["order"]
    bar = tqdm(total=plan["num_items"], disable=not progress, unit="img", desc=description)
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


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished ``partial`` to ``out_dir``; an old cache goes only now that the new one is whole."""
    if out_dir.exists():
        stale = out_dir.with_name(out_dir.name + ".old")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(out_dir, stale)
        os.replace(partial, out_dir)
        shutil.rmtree(stale)
    else:
        os.replace(partial, out_dir)


# ---------------------------------------------------------------------------------------------
# Plan, shards and index
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
        images, texts, *sources = dataset[batch]  # edit triplets add the source images
        texts = [str(text) for text in texts]
        if sources and encode_prompts is None:
            raise ValueError("this dataset holds edit triplets: their source images need an encode_prompts(captions, sources)")
        with torch.no_grad():
            outputs = {LATENTS_KEY: encode_images(images)}
            if encode_prompts is not None:
                condition = encode_prompts(texts, *sources)
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
    tensors = {key: concatenate_rows(values, key).contiguous() for key, values in parts.items()}
    return tensors, captions


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


def _hash(value: Any) -> str:
    """The SHA-256 of ``value`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    """Write JSON to a temporary name and rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)
