"""The extra TwinFlow weights of an adapted transformer: ``emb_2``, saved and loaded as safetensors.

They are stored under the released key names, as they appear in the adapted transformer's own
state dict: ``time_text_embed_2.*`` (Qwen-Image, SD3, Flux) or ``t_embedder_2.*`` (Z-Image).
A source is a safetensors file (a separate file of extra weights, or one holding the whole
transformer), a folder of safetensors files (a diffusers transformer folder, sharded or not, as
the released TwinFlow checkpoints are), a diffusers pipeline folder (its ``transformer/``
subfolder is read), or a state dict.

Separate files as users have them (the "patch" files of ComfyUI's TwinFlow nodes, pipeline-level
exports) may carry the names under a wrapper (:data:`WRAPPER_PREFIXES`):
``transformer.time_text_embed_2.*`` (Qwen-Image), ``extended_weights.t_embedder_2.*`` (Z-Image),
``transformer.time_embed_2.*`` (Sana), ...; they load as the bare names do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from twinflow.adapters.base import TransformerAdapter

__all__ = [
    "WRAPPER_PREFIXES", "extra_state_dict", "find_extra_weights", "load_extra_weights", "released_name", "save_extra_weights",
    "weight_files",
]

SUFFIX = ".safetensors"

WRAPPER_PREFIXES = ("transformer.", "extended_weights.")
"""Prefixes a separate file of extra weights may put before every family's released names."""


def extra_state_dict(adapter: TransformerAdapter) -> dict[str, Tensor]:
    """``emb_2``'s tensors under their released names, e.g. ``time_text_embed_2.timestep_embedder...``
    (none for an adapter with a single time embedding)."""
    if adapter.single_time_embedding:
        return {}
    prefix = adapter.second_embedding_name
    return {f"{prefix}.{key}": value for key, value in adapter.second_embedding.state_dict().items()}


def save_extra_weights(adapter: TransformerAdapter, path: str | Path) -> Path:
    """Write :func:`extra_state_dict` to the safetensors file ``path``; returns the path."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"extra weights are saved as safetensors; the file name must end in {SUFFIX}, got {path}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in extra_state_dict(adapter).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "twinflow_family": adapter.family}
    if adapter.time_convention.reversed:  # Z-Image: where r = 0 lands belongs to the weights
        metadata["twinflow_zero_time"] = adapter.time_convention.zero_time
    save_file(tensors, str(path), metadata=metadata)
    return path


def weight_files(source: str | Path) -> list[Path]:
    """The safetensors files of a source: the file itself, or every ``*.safetensors`` of a folder
    (of its ``transformer/`` subfolder when it is a pipeline folder)."""
    path = Path(source)
    if path.is_file():
        if path.suffix != SUFFIX:
            raise ValueError(f"only safetensors files are read, got {path}")
        return [path]
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob(f"*{SUFFIX}"))
        if files:
            return files
        raise FileNotFoundError(f"no {SUFFIX} files in {folder}")
    raise FileNotFoundError(f"no such file or folder: {path}")


def released_name(name: str, prefix: str) -> str | None:
    """``name`` as the released ``prefix.*`` name (a :data:`WRAPPER_PREFIXES` wrapper removed), or
    None when it is not one of ``emb_2``'s tensors."""
    for wrapper in ("", *WRAPPER_PREFIXES):
        if name.startswith(f"{wrapper}{prefix}."):
            return name[len(wrapper):]
    return None


def _split(names: list[str], prefix: str, read) -> tuple[dict[str, Tensor], list[str]]:
    """``emb_2``'s tensors among ``names`` under their released names (``read(name)`` fetches
    one), and the other names."""
    tensors: dict[str, Tensor] = {}
    others: list[str] = []
    for name in names:
        released = released_name(name, prefix)
        if released is None:
            others.append(name)
            continue
        if released in tensors:
            raise ValueError(f"{released} appears more than once (as {name} too)")
        tensors[released] = read(name)
    return tensors, others


def _read(files: list[Path], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of ``emb_2`` (``prefix.*``, wrapped or not) in ``files``, under their released
    names, and the names of all other tensors.

    Only the headers and the matching tensors are read, never a whole 20B checkpoint.
    """
    tensors: dict[str, Tensor] = {}
    others: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            found, rest = _split(list(handle.keys()), prefix, handle.get_tensor)
        duplicated = sorted(set(found) & set(tensors))
        if duplicated:
            raise ValueError(f"{duplicated[0]} appears in more than one of {[str(f) for f in files]}")
        tensors |= found
        others += rest
    return tensors, others


def find_extra_weights(source: str | Path, prefix: str) -> dict[str, Tensor]:
    """The tensors named ``prefix.*`` (e.g. ``t_embedder_2``) in a file or folder; empty if none."""
    return _read(weight_files(source), prefix)[0]


def load_extra_weights(adapter: TransformerAdapter, source: str | Path | Mapping[str, Tensor]) -> None:
    """Copy trained ``emb_2`` weights into the adapter from a source (see the module notes).

    The source must hold exactly ``emb_2``'s keys under the released prefix (or a wrapper of
    :data:`WRAPPER_PREFIXES` before it); it may also hold the transformer's own weights, which
    are ignored. Missing keys, and keys that are neither,
    raise a ``ValueError`` that lists them.
    """
    prefix = adapter.second_embedding_name
    if isinstance(source, Mapping):
        tensors, others = _split(list(source), prefix, source.__getitem__)
    else:
        tensors, others = _read(weight_files(source), prefix)
    expected = set(extra_state_dict(adapter))
    own = set(adapter.transformer.state_dict()) - expected
    missing = sorted(expected - set(tensors))
    unexpected = sorted((set(tensors) - expected) | (set(others) - own))
    if missing or unexpected:
        where = "the state dict" if isinstance(source, Mapping) else str(source)
        raise ValueError(
            f"{adapter.family} extra weights in {where} do not match {prefix}.*: "
            f"missing {_listing(missing)}; unexpected {_listing(unexpected)}"
        )
    start = len(prefix) + 1
    adapter.second_embedding.load_state_dict({name[start:]: value for name, value in tensors.items()})


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
