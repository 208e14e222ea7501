"""Prepare text-to-image training data: captioned images -> a latent cache (``twinflow cache``).

Training a large transformer should not keep its VAE and text encoder in memory, nor run them
on every step. :func:`cache_from_pipeline` runs them once over the captioned data (a folder of
images with same-name ``.txt`` captions, or parquet files) with the VAE and text encoder(s) of
a diffusers pipeline folder, and writes the latents, the prompt embeddings and the empty
prompt's embedding (the null condition of the guidance-enhanced target: the family's null
prompt, see :class:`~twinflow.families.Family`) to a resumable
safetensors cache that ``data.source: latent_cache`` trains from. The transformer's weights are
never loaded; only its config is read, to check that every image size fits the model.

Edit pipelines (Qwen-Image-Edit, Edit-Plus) cache edit triplets (``source_roots`` /
``source_columns`` of the data): the instruction encoded with the item's source images, the
source latents and each item's null condition (:class:`~twinflow.data.EditEncoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from twinflow.data import (
    CachedLatents,
    CaptionedDataConfig,
    CaptionedImages,
    EditEncoder,
    cache_dataset,
    load_captioned,
    prompt_encoder,
    vae_encoder,
)
from twinflow.generation.loading import load_pipeline

__all__ = ["cache_from_pipeline"]


def cache_from_pipeline(
    pipeline: str | Path,
    data: CaptionedDataConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    max_sequence_length: int | None = None,
) -> tuple[CachedLatents, CaptionedImages]:
    """Encode the captioned ``data`` with the VAE and text encoder of ``pipeline`` into ``out_dir``.

    Returns the cache and the dataset (``dataset.report`` lists the skipped items, those found
    while encoding included). An interrupted run continues where it stopped when called again.
    ``max_sequence_length``: the prompts' token limit (``None``: the family's, else the pipeline's).

    Raises:
        FileNotFoundError: the pipeline folder lacks its VAE or text encoder.
        ValueError: an image size (or bucket) that the model cannot take, naming the numbers.
    """
    dataset = load_captioned(data)
    loaded = load_pipeline(pipeline, device=device, dtype=dtype, load_transformer=False, load_vae=True)
    if not loaded.can_encode:
        parts = ", ".join(f"{part}/" for part in loaded.family.required_text_components)
        raise FileNotFoundError(f"{loaded.folder} has no text encoder to cache prompt embeddings with (needs {parts})")
    for height, width in dataset.buckets:  # fail before encoding anything, not at the first odd bucket
        loaded.family.latent_shape(loaded.pipeline, loaded.pipeline.transformer, width, height)
    family = loaded.family
    if family.edits != bool(data.source_count):
        raise ValueError(
            f"{loaded.folder} is a {family.pipeline_class}: its data are edit triplets, give the source images "
            f"(source_roots, source_columns; twinflow cache --edit-source)" if family.edits else
            f"the data have source images (edit triplets) but {loaded.folder} is a {family.pipeline_class}, "
            f"not an edit pipeline"
        )
    if family.edits:
        family.check_sources(data.source_count)
        encode_prompts, null_prompt = EditEncoder(loaded.pipeline), None  # each item's null: with its sources
    else:
        # The family's null prompt ("Generate an image." for Qwen-Image and SD3, as the reference) and
        # token limit, the same ones generation uses.
        limit = family.token_limit(max_sequence_length).get("max_sequence_length")
        encode_prompts, null_prompt = prompt_encoder(loaded.pipeline, limit), family.null_prompt
    cache = cache_dataset(
        dataset, vae_encoder(loaded.pipeline.vae), encode_prompts, out_dir,
        shard_size=shard_size, batch_size=batch_size, progress=progress, overwrite=overwrite, null_prompt=null_prompt,
    )
    return cache, dataset
