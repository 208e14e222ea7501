"""The adapter registry: family names, detection from the transformer's class, loading a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from twinflow.adapters.base import TransformerAdapter
from twinflow.adapters.exported import read_export_metadata, recorded_zero_time
from twinflow.adapters.flux import FluxAdapter
from twinflow.adapters.qwen_image import QwenImageAdapter
from twinflow.adapters.sana import SanaAdapter
from twinflow.adapters.sd3 import SD3Adapter
from twinflow.adapters.weights import find_extra_weights
from twinflow.adapters.z_image import ZImageAdapter
from twinflow.diffusers_compat import loading_arguments

__all__ = ["ADAPTERS", "adapter_for", "build_adapter", "family_of", "load_adapter", "transformer_family"]

ADAPTERS: dict[str, type[TransformerAdapter]] = {
    adapter.family: adapter for adapter in (QwenImageAdapter, ZImageAdapter, SD3Adapter, FluxAdapter, SanaAdapter)
}


def _family_of_class_names(names: list[str]) -> str:
    for name in names:
        for family, adapter in ADAPTERS.items():
            if name in adapter.class_names:
                return family
    known = sorted(name for adapter in ADAPTERS.values() for name in adapter.class_names)
    raise ValueError(f"no TwinFlow adapter for {names[0]}; adapters exist for {known}")


def family_of(transformer: nn.Module) -> str:
    """The family of a transformer, from its class or the nearest known base class."""
    return _family_of_class_names([klass.__name__ for klass in type(transformer).__mro__])


def build_adapter(family: str, transformer: nn.Module, **options: Any) -> TransformerAdapter:
    """The adapter of a named family (``qwen_image``, ``z_image``, ``sd3``, ``flux``, ``sana``) around
    ``transformer``; ``options`` go to its constructor (``extra_weights``, ...)."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown adapter family {family!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[family](transformer, **options)


def adapter_for(transformer: nn.Module, **options: Any) -> TransformerAdapter:
    """:func:`build_adapter` with the family detected from the transformer's class."""
    return build_adapter(family_of(transformer), transformer, **options)


def _transformer_folder(path: str | Path) -> Path:
    folder = Path(path)
    return folder / "transformer" if (folder / "transformer").is_dir() else folder


def _class_name(folder: Path) -> str:
    """The diffusers class named by ``folder/config.json``; errors name the file."""
    import diffusers

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: give a diffusers transformer folder or a pipeline folder")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config_file} is not a JSON object: {error}") from None
    if not isinstance(class_name, str) or not hasattr(diffusers, class_name):
        raise ValueError(f"{config_file} names _class_name {class_name!r}, which is no diffusers class")
    return class_name


def transformer_family(path: str | Path) -> str:
    """The family of the transformer in a transformer folder (or a pipeline's ``transformer/``),
    from the class named in its ``config.json``; nothing is loaded."""
    return _family_of_class_names([_class_name(_transformer_folder(path))])


def load_adapter(
    path: str | Path,
    *,
    single_time_embedding: bool | None = None,
    z_image_zero_time: str = "auto",
    weights: bool = True,
    extra_weights: str | Path | None = None,
    gguf: str | Path | None = None,
    **from_pretrained: Any,
) -> TransformerAdapter:
    """An adapter from a diffusers transformer folder (or a pipeline folder with ``transformer/``).

    The transformer comes from its class's ``from_pretrained(folder, **from_pretrained)``
    (diffusers reports the TwinFlow keys it does not know as unused); the extra weights are
    then read from the same safetensors files. A folder without them gives a copy-initialised
    ``emb_2`` and a warning. ``single_time_embedding`` builds the LoRA variant without ``emb_2``
    (see :class:`~twinflow.adapters.TransformerAdapter`); no extra weights are read then.
    ``None`` takes it from the folder's ``twinflow.json`` (an export of such a run), else ``False``.

    ``z_image_zero_time`` (Z-Image only; see :mod:`twinflow.adapters.z_image`) is where the
    target time ``r = 0`` lands on the reversed clock: ``reference`` or ``data``; ``auto``
    follows the weights: the folder's ``twinflow.json`` (an export of this project), else
    ``reference`` when the folder holds ``t_embedder_2`` (a released TwinFlow checkpoint, read
    bitwise as the reference code does) and ``data`` when it does not (a base model, trained
    here). ``reference`` / ``data`` for another family is a ``ValueError``.

    ``extra_weights``: a separate safetensors file (or folder) of trained ``emb_2`` weights to
    use instead of any the folder holds: a TwinFlow "patch" file on a plain base model
    (:mod:`twinflow.adapters.weights`, wrapped key names included). For Z-Image, ``auto`` then
    reads ``r = 0`` as the file's ``twinflow_zero_time`` metadata says (files exported here),
    else as the reference does (released patches).

    ``gguf``: a GGUF file of the transformer's weights (quantized, as the community publishes
    them), loaded by diffusers' GGUF backend with the folder's ``config.json``, computing in
    ``from_pretrained``'s ``dtype`` (default float32); ``emb_2`` stays unquantized and comes from
    ``extra_weights``, else from the GGUF file, else the folder (:mod:`twinflow.adapters.quantized`).

    ``weights=False`` builds the same adapter on the meta device from ``config.json`` alone (the
    class's ``from_config``; ``dtype`` in ``from_pretrained`` is applied): no weight is read or
    allocated, for a dry run of a 20B model. ``emb_2`` is then the copy of ``emb``.
    """
    import diffusers  # the optional extra: pip install "twinflow[diffusers]"

    folder = _transformer_folder(path)
    class_name = _class_name(folder)
    family = _family_of_class_names([class_name])
    if z_image_zero_time != "auto" and family != ZImageAdapter.family:
        raise ValueError(
            f"z_image_zero_time={z_image_zero_time!r} applies to Z-Image only; {folder} holds a {family} transformer"
        )
    metadata = read_export_metadata(folder)
    if single_time_embedding is None:
        single_time_embedding = bool(metadata.get("single_time_embedding", False))
    options: dict[str, Any] = {}
    if family == ZImageAdapter.family:
        zero_time = recorded_zero_time(metadata, family) if z_image_zero_time == "auto" else z_image_zero_time
        options["zero_time"] = zero_time  # still "auto" without twinflow.json: the weights decide
    if not weights:
        return _meta_adapter(folder, class_name, family, single_time_embedding, options, from_pretrained.get("dtype"))
    if gguf is not None:
        return _gguf_adapter(folder, class_name, family, Path(gguf), extra_weights, options, from_pretrained)
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(item.name for item in folder.iterdir() if item.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(
            f"{folder} holds no .safetensors weights{f' (only {pickled})' if pickled else ''}: twinflow loads "
            "transformer weights from safetensors only, never from pickle files"
        )
    # use_safetensors=True: diffusers would otherwise fall back to a pickled .bin next to them
    options_for_diffusers = loading_arguments({**from_pretrained, "use_safetensors": True})
    transformer = getattr(diffusers, class_name).from_pretrained(str(folder), **options_for_diffusers)
    if single_time_embedding:
        if extra_weights is not None:
            raise ValueError(f"{folder} is a single-time-embedding model (twinflow.json): it takes no extra weights")
        return build_adapter(family, transformer, single_time_embedding=True, **options)
    if extra_weights is not None:
        if options.get("zero_time") == "auto":
            options["zero_time"] = _file_zero_time(extra_weights)
        return build_adapter(family, transformer, extra_weights=extra_weights, **options)
    extra = find_extra_weights(folder, f"{ADAPTERS[family].embedding_name}_2")
    return build_adapter(family, transformer, extra_weights=extra or None, **options)


def _gguf_adapter(folder: Path, class_name: str, family: str, file: Path, extra_weights, options: dict, from_pretrained: dict):
    """:func:`load_adapter` of a GGUF file: the quantized transformer, an unquantized ``emb_2``."""
    import diffusers
    import torch

    from twinflow.adapters.quantized import gguf_extra_weights

    if not file.is_file() or file.suffix.lower() != ".gguf":
        raise FileNotFoundError(f"gguf {file}: not a .gguf file")
    compute = from_pretrained.get("dtype") or torch.float32
    transformer = getattr(diffusers, class_name).from_single_file(
        str(file), config=str(folder), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=compute),
        **loading_arguments({"dtype": compute}),
    )
    prefix = f"{ADAPTERS[family].embedding_name}_2"
    extra = extra_weights
    if extra is None:  # the GGUF file's own emb_2, else the folder's, else a copy of emb
        extra = gguf_extra_weights(file, prefix) or (find_extra_weights(folder, prefix) if any(folder.glob("*.safetensors")) else {})
    if options.get("zero_time") == "auto" and extra_weights is not None:
        options["zero_time"] = _file_zero_time(extra_weights)
    return build_adapter(family, transformer, extra_weights=extra or None, **options)


def _file_zero_time(source: str | Path) -> str:
    """Z-Image's ``r = 0`` reading recorded in an extra-weights file (``twinflow_zero_time``
    metadata of this project's exports), else ``auto`` (trained weights: the reference's)."""
    from safetensors import safe_open

    from twinflow.adapters.weights import weight_files

    for file in weight_files(source):
        with safe_open(str(file), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("twinflow_zero_time")
            if recorded:
                return recorded
    return "auto"


def _meta_adapter(folder: Path, class_name: str, family: str, single: bool, options: dict, dtype: Any) -> TransformerAdapter:
    """:func:`load_adapter` without weights: the transformer from its config on the meta device."""
    import warnings

    import diffusers
    import torch

    if options.get("zero_time") == "auto":  # as the weights would decide it, from the files' keys alone
        options = {**options, "zero_time": "reference" if _holds_extra_weights(folder, family) else "data"}
    klass = getattr(diffusers, class_name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy-initialised emb_2
        transformer = klass.from_config(klass.load_config(str(folder)))
        if dtype is not None:
            transformer = transformer.to(dtype)
        return build_adapter(family, transformer, single_time_embedding=single, **options)


def _holds_extra_weights(folder: Path, family: str) -> bool:
    """Whether the folder's safetensors files name ``emb_2`` tensors (headers only are read)."""
    from safetensors import safe_open

    prefix = f"{ADAPTERS[family].embedding_name}_2."
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            if any(key.startswith(prefix) for key in handle.keys()):
                return True
    return False
