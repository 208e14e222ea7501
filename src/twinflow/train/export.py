"""Export a trained text-to-image checkpoint as a diffusers transformer folder.

:func:`export_diffusers` rebuilds the adapter from the checkpoint's ``architecture`` (the
pretrained folder it was trained from), loads the trained (or EMA) weights and writes the
transformer with diffusers' ``save_pretrained``: ``config.json`` plus safetensors holding every
original key and the TwinFlow extra weights under their released names (``time_text_embed_2.*``
/ ``t_embedder_2.*``). :func:`twinflow.adapters.load_adapter` reads the folder back with the
trained second embedding (no copy-initialisation warning); diffusers alone reports the extra
keys as unused, as it does for the released TwinFlow checkpoints.

A LoRA run (``training.lora``) exports its adapter instead of a merged model: ``out_dir`` gets
``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_adapter`` format: PEFT key names,
the ``LoraConfig`` in the safetensors metadata; the ``ema`` adapter when ``use_ema``) and
``twinflow_extra_weights.safetensors`` (``emb_2`` under its released names; absent for a
``model.single_time_embedding`` run). A full export of such a run has only the original keys:
read it with ``load_adapter(out_dir, single_time_embedding=True)``.
:func:`load_lora_export` puts both on the pretrained transformer again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from twinflow.adapters import TransformerAdapter, load_adapter, load_extra_weights, save_extra_weights
from twinflow.models import build_model
from twinflow.train.checkpoint import load_checkpoint
from twinflow.train.lora import EMA, TRAINED, apply_lora, load_model_weights

__all__ = ["EXTRA_WEIGHTS_FILE", "LORA_WEIGHTS_FILE", "export_diffusers", "load_lora_export"]

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA adapter
EXTRA_WEIGHTS_FILE = "twinflow_extra_weights.safetensors"


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, use_ema: bool = False) -> Path:
    """Write the transformer of ``checkpoint`` (a checkpoint folder, or a run folder: its newest)
    to ``out_dir``; ``use_ema`` exports the EMA teacher's weights. Returns ``out_dir``."""
    stored = load_checkpoint(checkpoint, full=False)
    architecture = stored.state["architecture"]
    if architecture["name"] != "diffusers":
        raise ValueError(f"export_diffusers needs a model.name=diffusers checkpoint, got {architecture['name']!r}")
    if architecture.get("lora") is not None:
        return _export_lora(stored, architecture, Path(out_dir), use_ema)
    weights = stored.ema if use_ema else stored.model
    if weights is None:
        raise ValueError(f"checkpoint {checkpoint} has no EMA weights (training.ema_decay was 0); use use_ema=False")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 is copy-initialised, then overwritten just below
        adapter = build_model(architecture["name"], **architecture["config"])
    adapter.load_state_dict(weights)
    out_dir = Path(out_dir)
    adapter.transformer.save_pretrained(out_dir)
    return out_dir


def _export_lora(stored, architecture: dict, out_dir: Path, use_ema: bool) -> Path:
    if use_ema and not architecture.get("ema_adapter"):
        raise ValueError("this LoRA run has no EMA adapter (training.ema_decay was 0); use use_ema=False")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = build_model(architecture["name"], **architecture["config"])
    apply_lora(adapter, architecture["lora"], ema=bool(architecture.get("ema_adapter")))
    load_model_weights(adapter, stored.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.transformer.save_lora_adapter(out_dir, adapter_name=EMA if use_ema else TRAINED, weight_name=LORA_WEIGHTS_FILE)
    if not adapter.single_time_embedding:
        save_extra_weights(adapter, out_dir / EXTRA_WEIGHTS_FILE)
    return out_dir


def load_lora_export(base: str | Path, export: str | Path) -> TransformerAdapter:
    """The adapter of the pretrained folder ``base`` with an exported LoRA (the PEFT adapter
    ``default``, active) and the exported ``emb_2``; an export without ``emb_2`` comes from a
    ``model.single_time_embedding`` run and gives that adapter."""
    export = Path(export)
    extra = export / EXTRA_WEIGHTS_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 is copy-initialised, then overwritten just below
        adapter = load_adapter(base, single_time_embedding=not extra.is_file())
    if extra.is_file():
        load_extra_weights(adapter, extra)
    adapter.transformer.load_lora_adapter(str(export), prefix=None, weight_name=LORA_WEIGHTS_FILE, adapter_name=TRAINED)
    return adapter
