"""Export a trained text-to-image checkpoint in diffusers' formats (``twinflow export``).

:func:`export_diffusers` rebuilds the adapter from the checkpoint's ``architecture`` (the
pretrained folder it was trained from), loads the trained (or EMA) weights and writes:

* a **pipeline folder** that ``twinflow generate --model OUT`` loads, when the model was trained
  from a pipeline folder's ``transformer/`` (or when ``pipeline`` names one): the pipeline's other
  parts (VAE, text encoders, tokenizers, scheduler, ``model_index.json``) are copied (or, with
  ``link_parts``, hard-linked) and ``transformer/`` is the trained one;
* else a **transformer folder** (diffusers' ``save_pretrained``: ``config.json`` plus safetensors
  with every original key and the TwinFlow extra weights under their released names,
  ``time_text_embed_2.*`` / ``t_embedder_2.*``), as the released TwinFlow checkpoints ship them;
* for a LoRA run, the **adapter**: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA
  format (diffusers' own ``pipe.load_lora_weights`` reads it) and ``emb_2`` in
  ``twinflow_extra_weights.safetensors`` (see :mod:`twinflow.adapters.exported`), for
  ``twinflow generate --model BASE --lora OUT``; or with ``merge_lora`` the LoRA merged into the
  base weights, written as a full folder as above.

With ``export_format="comfyui"`` the export is laid out for ComfyUI's TwinFlow nodes instead
(ComfyUI-TwinFlow's "TwinFlow Model Patcher"; Qwen-Image and Z-Image, the families they patch):
``diffusion_models/twinflow_<family>_patch.safetensors`` holds the trained ``emb_2`` under the
key names the patcher reads (``time_text_embed_2.*``, ``t_embedder_2.*``: the released ones), and
a LoRA run adds ``loras/twinflow_<family>_lora.safetensors`` in diffusers' LoRA format, which
ComfyUI's LoRA loader reads. ``twinflow generate --model BASE --extra-weights PATCH [--lora LORA]``
loads the same files. A full-parameter run's transformer itself goes out in diffusers' format.

Every transformer folder gets ``twinflow.json`` (where the weights came from; how the model reads
time: whether it uses the single time embedding and, for Z-Image, where ``r = 0`` lands on its
reversed clock, as the checkpoint's ``architecture`` recorded it). The export is written beside
``out_dir`` and renamed into place at the end, so an interrupted export leaves nothing
half-written; an existing ``out_dir`` is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from twinflow import __version__
from twinflow.adapters import (
    EXTRA_WEIGHTS_FILE,
    LORA_WEIGHTS_FILE,
    METADATA_FILE,
    TransformerAdapter,
    load_lora_export,
    save_extra_weights,
    time_metadata,
)
from twinflow.models.diffusers import WEIGHT_DTYPES
from twinflow.train.checkpoint import Checkpoint, load_checkpoint
from twinflow.train.backbone import model_from_architecture
from twinflow.train.lora import EMA, TRAINED, load_model_weights
from twinflow.train.lora import merge_lora as merge_into_base  # the name merge_lora is export's argument

__all__ = [
    "COMFYUI_FAMILIES", "EXPORT_FORMATS", "EXTRA_WEIGHTS_FILE", "LORA_WEIGHTS_FILE", "comfyui_files", "export_diffusers",
    "load_lora_export", "pipeline_folder_of",
]

TRANSFORMER = "transformer"
EXPORT_FORMATS = ("diffusers", "comfyui")
COMFYUI_FAMILIES = ("qwen_image", "z_image")
"""The families ComfyUI's TwinFlow nodes patch (they find ``time_text_embed`` or ``t_embedder``)."""


def comfyui_files(out_dir: str | Path, family: str) -> tuple[Path, Path]:
    """``(patch, lora)``: where a ComfyUI export puts the ``emb_2`` patch and the LoRA file."""
    out_dir = Path(out_dir)
    return (out_dir / "diffusion_models" / f"twinflow_{family}_patch.safetensors",
            out_dir / "loras" / f"twinflow_{family}_lora.safetensors")


def export_diffusers(
    checkpoint: str | Path,
    out_dir: str | Path,
    use_ema: bool = False,
    pipeline: str | Path | None = None,
    merge_lora: bool = False,
    link_parts: bool = False,
    dtype: str = "fp32",
    export_format: str = "diffusers",
) -> Path:
    """Write the model of ``checkpoint`` (a checkpoint folder, or a run folder: its newest) to
    ``out_dir`` (see the module notes); returns ``out_dir``.

    Args:
        use_ema: export the EMA teacher's weights (the ``ema`` adapter of a LoRA run).
        pipeline: a diffusers pipeline folder whose other parts join the trained transformer;
            default: the pipeline that ``model.path`` is the ``transformer/`` of, if any.
        merge_lora: a LoRA run is merged into the base weights and written as a full folder
            instead of as an adapter file.
        link_parts: hard-link the pipeline's other parts instead of copying them (no second copy
            of a multi-GB text encoder; the files are then shared with ``pipeline``: never
            rewrite them in place). Falls back to copying across file systems.
        dtype: ``fp32`` or ``bf16``, the dtype of the written transformer weights (``bf16``
            halves the files, as the released checkpoints are stored; merging always runs in
            float32 first). A LoRA file keeps the adapters' float32.
        export_format: ``diffusers``, or ``comfyui`` (the patch and LoRA files of ComfyUI's
            TwinFlow nodes, see the module notes; the patch in ``dtype``).
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {list(EXPORT_FORMATS)}, got {export_format!r}")
    stored = load_checkpoint(checkpoint, full=False)
    architecture = stored.state["architecture"]
    if architecture["name"] != "diffusers":
        raise ValueError(f"export_diffusers needs a model.name=diffusers checkpoint, got {architecture['name']!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; export into a new folder")
    lora = architecture.get("lora") is not None
    if use_ema and (stored.ema is None if not lora else not architecture.get("ema_adapter")):
        raise ValueError(f"checkpoint {checkpoint} has no EMA weights (training.ema_decay was 0); use use_ema=False")
    source = pipeline_folder_of(architecture["config"]["path"]) if pipeline is None else Path(pipeline)
    if source is not None and not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"pipeline {source} has no model_index.json: not a diffusers pipeline folder")

    if lora and not merge_lora and pipeline is not None:
        raise ValueError("an unmerged LoRA export holds the adapter only; use merge_lora=True for a full pipeline folder")
    if export_format == "comfyui":
        family = architecture.get("family")
        if family not in COMFYUI_FAMILIES:
            raise ValueError(f"--format comfyui: ComfyUI's TwinFlow nodes patch {list(COMFYUI_FAMILIES)} models, not {family}")
        if merge_lora or pipeline is not None:
            raise ValueError("--format comfyui writes the patch (and LoRA) files only: it takes no --merge-lora or --pipeline")

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    partial.mkdir(parents=True)
    metadata = {
        "twinflow_version": __version__, "checkpoint": str(Path(checkpoint).resolve()), "step": stored.step,
        "weights": "ema" if use_ema else "model", "family": architecture.get("family"),
    }
    try:
        adapter = _trained_adapter(stored, architecture, use_ema, merged_or_full=(not lora or merge_lora) and export_format != "comfyui")
        if export_format == "comfyui":
            _write_comfyui(adapter, lora, partial, use_ema, dtype)
            (partial / METADATA_FILE).write_text(json.dumps(metadata | time_metadata(adapter) | {"format": "comfyui"}, indent=2))
        elif lora and not merge_lora:
            _write_lora(adapter, architecture, partial, use_ema, metadata)
        else:
            if lora:
                merge_into_base(adapter, EMA if use_ema else TRAINED)
            transformer_dir = partial / TRANSFORMER if source is not None else partial
            if source is not None:
                _copy_pipeline_parts(source, partial, link_parts)
            adapter.transformer.to(WEIGHT_DTYPES[dtype]).save_pretrained(transformer_dir)
            metadata |= {"lora_merged": lora, **time_metadata(adapter), "dtype": dtype}
            (transformer_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out_dir)
    return out_dir


def pipeline_folder_of(model_path: str | Path) -> Path | None:
    """The pipeline folder that ``model.path`` belongs to: itself if it has ``model_index.json``,
    its parent if it is that pipeline's ``transformer/``; else ``None`` (a bare transformer)."""
    path = Path(model_path)
    if (path / "model_index.json").is_file():
        return path
    if path.name == TRANSFORMER and (path.parent / "model_index.json").is_file():
        return path.parent
    return None


def _trained_adapter(stored: Checkpoint, architecture: dict, use_ema: bool, merged_or_full: bool = True) -> TransformerAdapter:
    """The adapter with the checkpoint's weights (a LoRA run: with its adapters, unmerged): its
    base in float32 whatever ``model.dtype`` trained on when the export writes the transformer
    (merging a LoRA adds its product in float32), else in the run's dtype: an adapter file
    needs only the adapters (float32 anyway), and a 20B bf16 base then takes 40 GB, not 80."""
    dtype = "fp32" if merged_or_full else architecture["config"].get("dtype", "fp32")
    adapter = model_from_architecture(architecture, dtype=dtype)
    if architecture.get("lora") is None:
        adapter.load_state_dict(stored.ema if use_ema else stored.model)
    else:
        load_model_weights(adapter, stored.model)
    return adapter


def _write_lora(adapter: TransformerAdapter, architecture: dict, out_dir: Path, use_ema: bool, metadata: dict) -> None:
    save_lora_file(adapter, EMA if use_ema else TRAINED, out_dir)
    if not adapter.single_time_embedding:
        save_extra_weights(adapter, out_dir / EXTRA_WEIGHTS_FILE)
    metadata |= {"lora": architecture["lora"], "base": architecture["config"]["path"], **time_metadata(adapter)}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def _write_comfyui(adapter: TransformerAdapter, lora: bool, out_dir: Path, use_ema: bool, dtype: str) -> None:
    """The ComfyUI layout of the module notes: the ``emb_2`` patch, and the LoRA file of a LoRA run."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    patch, lora_file = comfyui_files(out_dir, adapter.family)
    if adapter.single_time_embedding:
        raise ValueError("--format comfyui: this single-time-embedding run has no second time embedding to patch in")
    patch.parent.mkdir(parents=True)
    written = save_extra_weights(adapter, patch)  # the released names, which the patcher reads
    with safe_open(str(written), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).to(WEIGHT_DTYPES[dtype]).contiguous() for key in handle.keys()}
        metadata = handle.metadata()
    save_file(tensors, str(patch), metadata=metadata)
    if lora:
        lora_file.parent.mkdir(parents=True)
        os.replace(save_lora_file(adapter, EMA if use_ema else TRAINED, lora_file.parent), lora_file)


def save_lora_file(adapter: TransformerAdapter, name: str, out_dir: Path) -> Path:
    """PEFT adapter ``name`` as diffusers' pipeline-level LoRA file: keys ``transformer.<module>.lora_A.weight``
    and the ``LoraConfig`` in the safetensors metadata, written by the family's pipeline class
    (``ZImagePipeline.save_lora_weights``, ...), so that ``pipe.load_lora_weights(out_dir)`` reads it."""
    import diffusers
    from peft import get_peft_model_state_dict

    from twinflow.families import FAMILIES

    transformer = adapter.transformer
    pipeline_class = getattr(diffusers, FAMILIES[adapter.family].pipeline_class)
    pipeline_class.save_lora_weights(
        out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=name),
        transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict(), weight_name=LORA_WEIGHTS_FILE,
    )
    return out_dir / LORA_WEIGHTS_FILE


def _copy_pipeline_parts(source: Path, out_dir: Path, link: bool) -> None:
    """Every part of the pipeline ``source`` but its transformer, copied or hard-linked."""
    copy = _link_or_copy if link else shutil.copy2
    for entry in sorted(source.iterdir()):
        if entry.name == TRANSFORMER:
            continue
        if entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name, copy_function=copy)
        else:
            copy(entry, out_dir / entry.name)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
