"""Text-to-image generation with a TwinFlow diffusers model: ``TextToImage.from_pretrained(...).generate(...)``.

    pipe = TextToImage.from_pretrained("TwinFlow-Z-Image-Turbo")
    result = pipe.generate(["a red fox in the snow"], preset="2nfe", width=1024, height=1024)
    result.images[0].save("fox.png")

The denoising loop is :func:`twinflow.sampler.sample` on the family's adapter; the diffusers
pipeline contributes its parts (text encoders, VAE, image processor) and its ``encode_prompt``,
never its ``__call__``. Every image has its own random stream, ``torch.Generator`` seeded
``seed + index`` (index: the image's position in the request), which draws its starting noise
and the fresh noise of stochastic sampler steps, so an image does not depend on its batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from twinflow.adapters import TransformerAdapter, load_adapter, load_lora_export
from twinflow.devices import resolve_device, resolve_dtype
from twinflow.families import Family
from twinflow.generation.edits import EditSources, open_source
from twinflow.generation.embeddings import PromptEmbeddings, concatenate_conditions, load_embeddings, select_rows
from twinflow.generation.loading import MODEL_PARTS, check_folder, folder_family, load_pipeline, resolve_model_folder
from twinflow.sampler import SamplerConfig, resolve_sampler, sample

__all__ = ["GenerationResult", "PromptEncoder", "TextToImage"]

DEFAULT_SIZE = 1024


@dataclass
class GenerationResult:
    """What :meth:`TextToImage.generate` returns.

    Attributes:
        images: one PIL image per prompt (or embedding row), in request order.
        prompts: the prompt of each image (``None`` where embeddings came without prompts).
        seeds: the seed of each image's random stream, ``seed + index``.
        settings: everything needed to reproduce the images (model, preset, sampler fields,
            size, guidance, dtype, device, batch size).
        seconds: wall time of the whole call (encoding, sampling, decoding).
        network_calls: transformer evaluations per image (the NFE; a guided call counts 2).
    """

    images: list[Any]
    prompts: list[str | None]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    network_calls: int = 0

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(len(self.images), 1)


class PromptEncoder:
    """Prompts -> conditions with a family's text encoder(s) only (no transformer weights, no VAE).

    ``PromptEncoder.from_pretrained(folder).encode(prompts)``; what ``twinflow encode`` uses.
    """

    def __init__(self, pipeline: Any, family: Family, device: torch.device, max_sequence_length: int | None = None):
        self.pipeline = pipeline
        self.family = family
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length  # None: the family's (Family.token_limit)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
        max_sequence_length: int | None = None,
    ) -> PromptEncoder:
        loaded = load_pipeline(folder, device=device, dtype=dtype, load_transformer=False)
        if not loaded.can_encode:
            raise FileNotFoundError(_no_encoder_message(loaded.folder, loaded.family))
        return cls(loaded.pipeline, loaded.family, loaded.device, max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], batch_size: int | None = None) -> dict[str, Tensor]:
        """The condition dict for ``prompts`` (one row each), encoded ``batch_size`` at a time."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("give one or more prompts (strings)")
        step = batch_size or len(prompts)
        chunks = [
            self.family.encode(self.pipeline, prompts[start:start + step], self.device, self.max_sequence_length)
            for start in range(0, len(prompts), step)
        ]
        return concatenate_conditions(chunks) if len(chunks) > 1 else chunks[0]

    @torch.no_grad()
    def encode_null(self) -> dict[str, Tensor]:
        """The condition of the family's null prompt (batch 1): the unconditional input."""
        return self.family.encode_null(self.pipeline, self.device, self.max_sequence_length)


def _no_encoder_message(folder: Path, family: Family) -> str:
    parts = ", ".join(f"{part}/" for part in family.required_text_components)
    return (
        f"{folder} has no text encoder to encode prompts with (a {family.name} folder needs {parts}); "
        "generate from precomputed embeddings instead (twinflow encode, --embeddings)"
    )


class TextToImage:
    """A TwinFlow text-to-image model: adapter, VAE and (optionally) text encoder of one folder.

    Build it with :meth:`from_pretrained`. ``encoder`` is ``None`` when no text encoder was
    loaded; :meth:`generate` then needs ``embeddings``.
    """

    def __init__(
        self,
        pipeline: Any,
        adapter: TransformerAdapter,
        family: Family,
        *,
        device: torch.device,
        dtype: torch.dtype,
        encoder: PromptEncoder | None = None,
        folder: str | Path | None = None,
    ):
        self.pipeline = pipeline
        self.adapter = adapter.eval()
        self.family = family
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder = encoder
        self.folder = None if folder is None else Path(folder)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        offload: bool | str = False,
        load_text_encoder: bool = True,
        lora: str | Path | None = None,
        extra_weights: str | Path | None = None,
        gguf: str | Path | None = None,
        max_sequence_length: int | None = None,
    ) -> TextToImage:
        """Load a diffusers pipeline folder (``QwenImagePipeline``, ``ZImagePipeline``,
        ``StableDiffusion3Pipeline`` or ``FluxPipeline``) with its TwinFlow adapter.

        Args:
            folder: the pipeline folder; ``transformer/`` may hold the extra TwinFlow weights
                (``t_embedder_2.*`` / ``time_text_embed_2.*``), else they start as a copy of
                the first embedding, with a warning.
            device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``.
            dtype: ``None``/``auto`` gives bfloat16 on CUDA and float32 on the CPU; or ``bf16``,
                ``fp16``, ``fp32`` or a ``torch.dtype``.
            offload: diffusers' CPU offload, a rung of the memory ladder
                (:data:`~twinflow.generation.loading.OFFLOAD_MODES`): ``True`` or ``"model"``
                (each model moves to the GPU while it runs), ``"group"`` (the transformer's
                blocks one at a time), ``"sequential"`` (every layer on its own). Needs CUDA; on
                another device it raises ``ValueError``.
            load_text_encoder: ``False`` never loads the text encoder(s): generate from
                precomputed embeddings (small GPUs; folders without a text encoder).
            lora: a LoRA export of ``twinflow export`` (``pytorch_lora_weights.safetensors``
                and the trained second time embedding), or a LoRA file in diffusers' format, to
                apply to the folder's transformer.
            extra_weights: a safetensors file of TwinFlow's second time embedding (a "patch"
                file: ``time_text_embed_2.*``, ``transformer.time_text_embed_2.*``,
                ``t_embedder_2.*``, ``extended_weights.t_embedder_2.*``, ...) for a plain base
                pipeline; it replaces any the folder (or the LoRA export) holds.
            gguf: a GGUF file of the transformer's weights (quantized; diffusers' GGUF backend,
                needs ``pip install gguf``), used instead of ``transformer/``'s; the second time
                embedding stays unquantized (:mod:`twinflow.adapters.quantized`).
            max_sequence_length: the prompt encoding's token limit (``None``: the family's, else
                the pipeline's); a model generates best with the limit its training cache used.
        """
        folder = resolve_model_folder(folder)  # a folder, or a hub id (owner/name[/sub/folder])
        family = folder_family(folder)
        check_folder(folder, MODEL_PARTS if gguf is None else ("vae",))  # a GGUF file replaces transformer/'s weights
        loaded_dtype = resolve_dtype(dtype, resolve_device(device))
        loading = {"dtype": loaded_dtype, "local_files_only": True, "use_safetensors": True}
        if gguf is not None:
            if lora is not None:
                raise ValueError("a GGUF transformer takes no LoRA here: merge the LoRA before quantizing")
            adapter = load_adapter(folder, extra_weights=extra_weights, gguf=gguf, dtype=loaded_dtype)
        elif lora is None:
            adapter = load_adapter(folder, extra_weights=extra_weights, **loading)
        else:
            adapter = load_lora_export(folder, lora, extra_weights=extra_weights, **loading)
        if adapter.family != family.name:
            raise ValueError(
                f"{folder}: the pipeline is {family.pipeline_class} but transformer/ holds a {adapter.family} model"
            )
        loaded = load_pipeline(
            folder, device=device, dtype=loaded_dtype, offload=offload,
            load_text_encoder=load_text_encoder, transformer=adapter.transformer,
        )
        if not offload:
            adapter.to(loaded.device)
        encoder = PromptEncoder(loaded.pipeline, family, loaded.device, max_sequence_length) if loaded.can_encode else None
        return cls(
            loaded.pipeline, adapter, family, device=loaded.device, dtype=loaded.dtype, encoder=encoder, folder=folder
        )

    # -- conditions ----------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str], batch_size: int | None = None) -> dict[str, Tensor]:
        """The condition dict for ``prompts`` (see :class:`PromptEncoder`); needs the text encoder."""
        return self._require_encoder().encode(prompts, batch_size)

    def _require_encoder(self) -> PromptEncoder:
        if self.encoder is None:
            raise ValueError(
                "no text encoder is loaded (load_text_encoder=False, or the folder has none): generate from "
                "precomputed embeddings instead (TextToImage.generate(embeddings=...), twinflow encode, --embeddings)"
            )
        return self.encoder

    def _prepare(self, condition: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A condition as the transformer takes it: trimmed, on the device, in the model dtype."""
        return self._on_device(self.family.for_transformer(self._on_device(condition), self.adapter.transformer))

    def _on_device(self, condition: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            key: value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
            for key, value in condition.items()
        }

    # -- generation ----------------------------------------------------------------------

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents of a ``width`` x ``height`` image (checks the size)."""
        return self.family.latent_shape(self.pipeline, self.adapter.transformer, width, height)

    def _model(self, x: Tensor, time: Tensor, target_time: Tensor, condition: Any) -> Tensor:
        """``F(x, t, r, c)`` in the model dtype; the sampler keeps its state in float32."""
        return self.adapter(x.to(self.dtype), time, target_time, condition).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Any]:
        """PIL images from latents (B, C, h, w), through the VAE and the pipeline's image processor."""
        images = self.family.decode(self.pipeline, latents.to(self.device))
        return self.pipeline.image_processor.postprocess(images, output_type="pil")

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        embeddings: PromptEmbeddings | Mapping[str, Tensor] | str | Path | None = None,
        images: Any = None,
        preset: str | SamplerConfig = "2nfe",
        width: int | None = None,
        height: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        guidance_scale: float = 0.0,
        progress: bool = True,
        source_area: int | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate one image per prompt (or per row of ``embeddings``).

        Args:
            prompts: the prompts (edit instructions for an edit pipeline); with ``embeddings``
                they only label the images (optional).
            embeddings: precomputed conditions (:func:`load_embeddings`'s result, a condition
                dict or a file path); the text encoder is not used. Not for edits.
            images: an edit pipeline's source image(s), PIL images or paths, one or a list; every
                prompt edits the same sources (see :mod:`twinflow.families.qwen_image_edit`).
            preset: a sampler preset (``1nfe``, ``2nfe``, ``4nfe``, ``any``, ``multi``), a spec
                such as ``"multi:steps=50"``, or a :class:`~twinflow.sampler.SamplerConfig`;
                keyword ``overrides`` change single fields (``steps=8``).
            width, height: image size in pixels, multiples of VAE factor x patch size (16 for
                all released models); default 1024, or for an edit the pipeline's size for its sources.
            source_area: an edit's source pixel count (default the pipelines' 1024 x 1024); each
                source keeps its aspect ratio.
            seed: image ``i`` uses a generator seeded ``seed + i``.
            batch_size: images per transformer batch; the images do not depend on it (up to
                floating-point rounding of batched kernels).
            guidance_scale: classifier-free guidance ``F_u + w (F_c - F_u)`` (0: off, as TwinFlow
                models are meant to be used); the unconditional input is the family's null prompt
                (:attr:`~twinflow.families.Family.null_prompt`).
            progress: a progress bar over batches.
        """
        start = time.perf_counter()
        label = "custom" if isinstance(preset, SamplerConfig) else preset  # for the images' metadata
        config = resolve_sampler(preset, **overrides)
        config = replace(config, guidance_scale=float(guidance_scale)).validate()
        edit = self._edit_sources(images, embeddings, source_area)
        if width is None or height is None:
            default = edit.output_size if edit is not None else (DEFAULT_SIZE, DEFAULT_SIZE)
            width, height = width or default[0], height or default[1]
        latent_shape = self.latent_shape(width, height)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        prompts = [prompts] if isinstance(prompts, str) else None if prompts is None else list(prompts)
        stored = self._embeddings(embeddings, prompts)
        if stored is None and not prompts:
            raise ValueError("give prompts or embeddings")
        count = len(stored) if stored is not None else len(prompts)
        labels = prompts if prompts is not None else stored.prompts or [None] * count
        null = None
        if config.guidance_scale != 0.0:
            null = edit.null_condition(self) if edit is not None else self._null_condition(stored)

        images, seeds, calls = [], [], 0
        batches = range(0, count, batch_size)
        for first in tqdm(batches, disable=not progress, desc="generating", unit="batch"):
            rows = list(range(first, min(first + batch_size, count)))
            if stored is not None:
                condition = select_rows(stored.conditions, rows)
            elif edit is not None:
                condition = edit.condition(self, [labels[row] for row in rows])
            else:
                condition = self.encode([labels[row] for row in rows])
            null_batch = None
            if null is None:
                condition = self._prepare(condition)
            else:
                # Prepared together, so both halves of the guided batch share one token count.
                empty = {key: value.expand(len(rows), *value.shape[1:]) for key, value in null.items()}
                both = self._prepare(concatenate_conditions([self._on_device(condition), self._on_device(empty)]))
                condition = select_rows(both, slice(0, len(rows)))
                null_batch = select_rows(both, slice(len(rows), None))
            generators = [torch.Generator().manual_seed(seed + row) for row in rows]
            noise = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators]).to(self.device)
            result = sample(self._model, noise, condition, config, null_cond=null_batch, generator=generators)
            images += self.decode(result.sample)
            seeds += [seed + row for row in rows]
            calls = result.network_calls
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        settings = {
            "model": str(self.folder) if self.folder is not None else None,
            "family": self.family.name,
            "preset": label,
            "sampler": config.to_dict(),
            "width": width,
            "height": height,
            **({"source_images": len(edit.latents), "source_sizes": edit.sizes} if edit is not None else {}),
            "guidance_scale": config.guidance_scale,
            "batch_size": batch_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
        return GenerationResult(images, list(labels), seeds, settings, time.perf_counter() - start, calls)

    def _edit_sources(self, images: Any, embeddings: Any, area: int | None) -> EditSources | None:
        """An edit's prepared sources, or None; refuses sources for a text-to-image model and
        an edit without sources or from precomputed embeddings, naming the problem."""
        if not self.family.edits:
            if images is not None:
                raise ValueError(
                    f"{self.family.pipeline_class} does not edit images; --image needs an edit pipeline "
                    f"(QwenImageEditPipeline, QwenImageEditPlusPipeline)"
                )
            return None
        if embeddings is not None:
            raise ValueError(f"{self.family.pipeline_class} encodes prompts with their source images: give prompts, not embeddings")
        if area is not None and (not isinstance(area, int) or area < 1):
            raise ValueError(f"source_area must be a positive number of pixels, got {area!r}")
        self._require_encoder()
        sources = [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)
        return EditSources.prepare(self, [open_source(source) for source in sources], area)

    def _embeddings(self, embeddings: Any, prompts: list[str] | None) -> PromptEmbeddings | None:
        if embeddings is None:
            return None
        if isinstance(embeddings, (str, Path)):
            embeddings = load_embeddings(embeddings)
        elif isinstance(embeddings, Mapping):
            embeddings = PromptEmbeddings(dict(embeddings))
        if not isinstance(embeddings, PromptEmbeddings):
            raise ValueError(f"embeddings must be PromptEmbeddings, a condition dict or a file, got {type(embeddings).__name__}")
        if embeddings.family is not None and embeddings.family != self.family.name:
            raise ValueError(f"these embeddings were encoded for {embeddings.family}, this model is {self.family.name}")
        if prompts is not None and len(prompts) != len(embeddings):
            raise ValueError(f"{len(prompts)} prompts for {len(embeddings)} rows of embeddings")
        return embeddings

    def _null_condition(self, stored: PromptEmbeddings | None) -> dict[str, Tensor]:
        """The empty prompt's condition (batch 1): stored with the embeddings, else encoded."""
        if stored is not None and stored.null_condition is not None:
            return stored.null_condition
        if self.encoder is None:
            raise ValueError(
                "guidance needs the empty prompt's embedding: load the text encoder, or use embeddings "
                "saved with a null condition (twinflow encode stores one)"
            )
        return self.encoder.encode_null()



