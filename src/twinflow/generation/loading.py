"""Loading a diffusers pipeline folder for TwinFlow generation: checks, device, dtype.

A folder is what ``DiffusionPipeline.save_pretrained`` writes (a released TwinFlow checkpoint
is one): ``model_index.json`` naming the pipeline class and its parts, one subfolder per part.
The transformer is loaded through :func:`twinflow.adapters.load_adapter` (which also finds the
extra TwinFlow weights in ``transformer/``); the other parts by the pipeline class itself,
``local_files_only``, safetensors only. A hub id (``owner/name``, not an existing path) is
fetched once by :func:`resolve_model_folder` into the Hugging Face cache — configs, tokenizer
files and safetensors weights only, never code or pickles — and then read like a folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twinflow.devices import resolve_device, resolve_dtype
from twinflow.diffusers_compat import loading_arguments
from twinflow.families import PIPELINE_FAMILIES, Family

__all__ = [
    "OFFLOAD_MODES", "LoadedPipeline", "check_folder", "check_image_size", "enable_offload", "folder_family", "load_pipeline",
    "offload_mode", "resolve_model_folder",
    "split_hub_id",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.][A-Za-z0-9_. -]*)*$")
"""``owner/name``, or ``owner/name/path/inside/repo`` for a pipeline in a sub-folder (as the
released ``inclusionAI/TwinFlow/TwinFlow-Qwen-Image-v1.0/TwinFlow-Qwen-Image``)."""
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "merges.txt", "vocab*"]
"""What is fetched from the hub: configs, tokenizers and safetensors weights (no ``.bin``/``.pt``, no ``.py``)."""


def split_hub_id(model: str) -> tuple[str, str]:
    """``(repository, sub-folder)`` of a hub id; the sub-folder is ``""`` for the repository's root."""
    owner, name, *inside = model.strip("/").split("/")
    return f"{owner}/{name}", "/".join(inside)


def resolve_model_folder(model: str | Path) -> Path:
    """A local folder for ``model``: an existing path as is, else a hub id downloaded once.

    Only an argument that is not an existing path and looks like ``owner/name`` or
    ``owner/name/sub/folder`` goes to the hub (``huggingface_hub.snapshot_download``): the files
    of :data:`HUB_FILES` in that sub-folder only. ``HF_HUB_OFFLINE=1`` reads the local hub cache
    (``HF_HUB_CACHE``, else huggingface_hub's default) without any network call. Tests and CI
    pass folders, or an offline cache.
    """
    path = Path(model)
    if path.exists() or not HUB_ID.match(str(model)):
        return path
    from huggingface_hub import snapshot_download

    repository, inside = split_hub_id(str(model))
    patterns = [f"{inside}/{pattern}" for pattern in HUB_FILES] if inside else HUB_FILES
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        root = Path(snapshot_download(
            repository, allow_patterns=patterns, local_files_only=offline, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        ))
    except Exception as error:  # offline without a cached copy, unknown repository, gated model: say which
        where = "the local hub cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
        raise FileNotFoundError(
            f"{model!r} is neither a local folder nor a hub model: repository {repository!r} was not found in "
            f"{where} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    folder = root / inside if inside else root
    if not folder.is_dir():
        present = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        raise FileNotFoundError(f"hub repository {repository!r} has no sub-folder {inside!r} (its folders: {present})")
    return folder


MODEL_PARTS = ("transformer", "vae")  # always needed to generate


def _model_index(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}")
    index = folder / "model_index.json"
    if not index.is_file():
        # A repository of several pipelines (the released TwinFlow ones): name those inside.
        inside = sorted(str(found.parent.relative_to(folder)) for found in folder.glob("*/model_index.json"))
        inside += sorted(str(found.parent.relative_to(folder)) for found in folder.glob("*/*/model_index.json"))
        hint = f"; pipelines inside it: {inside} (append one to the path or hub id)" if inside else ""
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder{hint}")
    return json.loads(index.read_text())


def folder_family(folder: str | Path) -> Family:
    """The family of a pipeline folder, from the pipeline class in its ``model_index.json``."""
    folder = Path(folder)
    class_name = _model_index(folder).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"unknown family: {folder / 'model_index.json'} names the pipeline {class_name!r}; TwinFlow "
            f"generation supports {sorted(PIPELINE_FAMILIES)}"
        )
    return PIPELINE_FAMILIES[class_name]


def _listed(index: dict[str, Any], part: str) -> bool:
    """Whether ``model_index.json`` lists a part (``[null, null]`` means the folder has none)."""
    entry = index.get(part)
    return isinstance(entry, list) and entry[0] is not None


def check_folder(folder: str | Path, parts: tuple[str, ...]) -> None:
    """Raise ``FileNotFoundError`` naming the first missing part (subfolder or file) of ``parts``."""
    folder = Path(folder)
    index = _model_index(folder)
    for part in parts:
        if not _listed(index, part):
            raise FileNotFoundError(f"{folder / 'model_index.json'} lists no {part!r} (it is missing or null)")
        subfolder = folder / part
        if not subfolder.is_dir():
            raise FileNotFoundError(f"{folder} has no {part}/ subfolder, which model_index.json lists")
        if part.startswith("tokenizer"):
            continue  # tokenizer files differ by kind; the tokenizer's own loader names what is missing
        if not (subfolder / "config.json").is_file():
            raise FileNotFoundError(f"{subfolder} has no config.json")
        if not any(subfolder.glob("*.safetensors")):
            others = sorted(p.name for p in subfolder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f" (found {others}: only safetensors weights are read)" if others else ""
            raise FileNotFoundError(f"{subfolder} has no .safetensors weights{extra}")


def _empty_model(folder: Path, part: str) -> Any:
    """The part's model built from its config on the meta device: its geometry, no weights."""
    import diffusers
    from accelerate import init_empty_weights

    model_class = getattr(diffusers, json.loads((folder / part / "config.json").read_text())["_class_name"])
    with init_empty_weights():
        return model_class.from_config(model_class.load_config(str(folder / part)))


def check_image_size(model: str | Path, width: int, height: int, transformer_weights: bool = True) -> None:
    """Raise ``ValueError`` naming the numbers when the family's pipeline cannot make a
    ``width`` x ``height`` image; reads the configs only (seconds, whatever the model's size),
    so that a bad ``--size`` is named before the weights are loaded."""
    import inspect

    import diffusers
    from diffusers.utils import logging as diffusers_logging

    folder = resolve_model_folder(model)
    family = folder_family(folder)
    check_folder(folder, MODEL_PARTS if transformer_weights else ("vae",))  # --gguf: weights from another file
    transformer, vae = _empty_model(folder, "transformer"), _empty_model(folder, "vae")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    names = [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "None cannot be saved" for the parts left out
    try:  # the pipeline computes its own VAE factor: the one rule generation uses
        pipeline = pipeline_class(**{name: {"transformer": transformer, "vae": vae}.get(name) for name in names})
    finally:
        diffusers_logging.set_verbosity(verbosity)
    family.latent_shape(pipeline, transformer, width, height)


OFFLOAD_MODES = ("model", "group", "sequential")
"""The memory ladder of ``generate`` (diffusers' own hooks), most memory first:

* ``model``: each model (text encoder, transformer, VAE) moves to the GPU while it runs;
* ``group``: the transformer's blocks move to the GPU one at a time (block-level group offload),
  the other models as groups too; about one block of the transformer on the GPU;
* ``sequential``: every layer moves to the GPU for its own call (accelerate); least memory, slowest.
"""


def offload_mode(offload: bool | str | None) -> str | None:
    """``None`` (no offload), or one of :data:`OFFLOAD_MODES` (``True`` is ``model``)."""
    if offload is None or offload is False:
        return None
    if offload is True:
        return "model"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}")
    return offload


def enable_offload(pipeline: Any, mode: str, device: torch.device) -> None:
    """Put diffusers' offload hooks of ``mode`` (:data:`OFFLOAD_MODES`) on ``pipeline``, computing
    on ``device``. The target-time hook needs nothing: ``emb_2`` is a submodule of the
    transformer, moved with it (tested with CPU-to-CPU offload)."""
    if mode == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1,
        )


@dataclass
class LoadedPipeline:
    """A pipeline folder loaded for generation or for encoding only."""

    pipeline: Any  # the diffusers pipeline (transformer and/or text encoder may be None)
    family: Family
    folder: Path
    device: torch.device  # where the work runs (the GPU under offloading)
    dtype: torch.dtype
    can_encode: bool  # a text encoder is loaded


def _text_parts(folder: Path, family: Family, load_text_encoder: bool) -> tuple[dict[str, None], bool]:
    """Which text parts to skip (passed as ``None`` to ``from_pretrained``) and whether the rest can encode."""
    index = _model_index(folder)
    if load_text_encoder and all(_listed(index, part) for part in family.required_text_components):
        check_folder(folder, tuple(part for part in family.text_components if _listed(index, part)))
        return {part: None for part in family.text_components if not _listed(index, part)}, True
    return {part: None for part in family.text_components}, False


def load_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    offload: bool | str = False,
    load_text_encoder: bool = True,
    load_transformer: bool = True,
    transformer: Any = None,
    load_vae: bool | None = None,
) -> LoadedPipeline:
    """Load a pipeline folder's parts with ``local_files_only`` (see the module notes).

    ``load_transformer=False`` loads no transformer weights (the transformer is built on the
    meta device from its config, which some pipelines read) and, unless ``load_vae``, no VAE:
    prompt encoding only; with ``load_vae`` the VAE too (caching latents for training).
    ``transformer`` is an already loaded (adapted) transformer to use.
    A folder whose ``model_index.json`` lists no text encoder loads without one.
    """
    import diffusers

    folder = resolve_model_folder(folder)
    family = folder_family(folder)
    load_vae = load_transformer if load_vae is None else load_vae
    needed = MODEL_PARTS if load_vae else ("transformer",)
    check_folder(folder, tuple(part for part in needed if not (part == "transformer" and transformer is not None)))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    offload = offload_mode(offload)
    if offload and device.type != "cuda":
        raise ValueError(
            f"offload moves each model between CPU and GPU memory as it is needed; it needs a CUDA "
            f"device, got {device}"
        )
    skipped, can_encode = _text_parts(folder, family, load_text_encoder)
    parts: dict[str, Any] = {**skipped, **family.extra_parts(folder, can_encode)}
    if not load_transformer:
        parts["transformer"] = _empty_model(folder, "transformer")  # no memory: only its config is read
        if not load_vae:
            parts["vae"] = None
    elif transformer is not None:
        parts["transformer"] = transformer
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(
        str(folder), **loading_arguments({"dtype": dtype}), local_files_only=True, use_safetensors=True, **parts
    )
    family.complete_pipeline(pipeline, folder, can_encode)
    pipeline.set_progress_bar_config(disable=True)
    if offload:
        enable_offload(pipeline, offload, device)
    elif load_transformer:
        pipeline.to(device)
    else:
        for part in (*family.text_components, "vae"):
            model = getattr(pipeline, part, None)
            if isinstance(model, torch.nn.Module):
                model.to(device)
    return LoadedPipeline(pipeline, family, folder, device, dtype, can_encode)
