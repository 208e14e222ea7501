"""LoRA fine-tuning of a diffusers transformer through PEFT (``training.lora``).

:func:`apply_lora` freezes the adapted transformer and injects a LoRA adapter named
``default`` (:data:`TRAINED`) into its ``target_modules``; only the LoRA weights train, plus the
second time embedding ``emb_2`` when ``train_second_embedding`` is set. With an EMA teacher
(``training.ema_decay > 0``) a second adapter named ``ema`` (:data:`EMA`) starts as a copy of
``default`` and holds its exponential moving average (:class:`AdapterEMATeacher`),
so the teacher costs two small adapters' worth of memory instead of a copy of the model.

Checkpoints of a LoRA run hold only these weights (:func:`model_weights`); the frozen base
comes from ``model.path`` again on resume and export. Requires ``peft`` (``pip install "peft>=0.17"``).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from twinflow.checks import is_finite_number, is_integer
from twinflow.teacher import EMATeacher

ADAPTABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)  # what PEFT's LoRA adapts
TRAINED = "default"  # the PEFT adapter the optimizer trains
EMA = "ema"  # the PEFT adapter that holds the teacher's EMA of TRAINED

LORA_DEFAULTS: dict[str, Any] = {
    "rank": 16,
    "alpha": 16,
    # The attention projections of every family here (Qwen-Image, Z-Image, SD3, Flux).
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "train_second_embedding": False,  # also train emb_2 in full (the teacher then uses the live emb_2)
}


def lora_options(options: dict | None) -> dict | None:
    """``training.lora`` completed with :data:`LORA_DEFAULTS`; ``None`` (no LoRA) stays ``None``.

    Raises ``ValueError`` naming an unknown or malformed key.
    """
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"training.lora must be a mapping like {{rank: 16}} or null, got {options!r}")
    unknown = sorted(set(options) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {['training.lora.' + k for k in unknown]}; known: {sorted(LORA_DEFAULTS)}")
    options = {**LORA_DEFAULTS, **options}
    if not is_integer(options["rank"]) or options["rank"] < 1:
        raise ValueError(f"training.lora.rank must be a positive integer, got {options['rank']!r}")
    if not is_finite_number(options["alpha"]) or options["alpha"] <= 0:
        raise ValueError(f"training.lora.alpha must be a positive number, got {options['alpha']!r}")
    targets = options["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"training.lora.target_modules must be a non-empty list of module names, got {targets!r}")
    if not isinstance(options["train_second_embedding"], bool):
        raise ValueError(f"training.lora.train_second_embedding must be true or false, got {options['train_second_embedding']!r}")
    return options


def peft_config(options: dict, exclude: list[str] | None = None):
    """The ``peft.LoraConfig`` of completed :func:`lora_options`; ``exclude``: module names (in the
    transformer) that get no adapter even where a target name matches."""
    from peft import LoraConfig

    return LoraConfig(
        r=options["rank"], lora_alpha=options["alpha"], target_modules=list(options["target_modules"]),
        exclude_modules=list(exclude) if exclude else None,
    )


def apply_lora(model: nn.Module, options: dict, ema: bool) -> None:
    """Freeze ``model`` (a :class:`~twinflow.adapters.TransformerAdapter`) and inject the
    ``default`` adapter, and the ``ema`` copy of it when ``ema``; ``default`` is left active."""
    from peft import inject_adapter_in_model

    transformer = getattr(model, "transformer", None)
    if transformer is None:
        raise ValueError(f"training.lora needs a diffusers transformer (model.name: diffusers), got {type(model).__name__}")
    if options["train_second_embedding"] and model.single_time_embedding:
        raise ValueError("training.lora.train_second_embedding needs a second time embedding; model.single_time_embedding is set")
    check_lora_targets(transformer, options["target_modules"])
    model.requires_grad_(False)
    # Modules whose outputs the transformer discards get no adapter: it could never train (and
    # DDP would wait for its gradients).
    exclude = [name.removeprefix("transformer.") for name in model.modules_without_gradient()]
    config = peft_config(options, exclude)
    inject_adapter_in_model(config, transformer, adapter_name=TRAINED)
    if ema:
        with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, transformer, adapter_name=EMA)
        for teacher_parameter, parameter in adapter_pairs(model):
            teacher_parameter.data.copy_(parameter.data)
    set_active_adapter(model, TRAINED)
    # Trained weights stay float32 even on a bfloat16 base (model.dtype: bf16): the optimizer
    # and the EMA need the precision; autocast runs the matmuls in bf16 anyway.
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    if options["train_second_embedding"]:
        model.second_embedding.float().requires_grad_(True)


def check_lora_targets(transformer: nn.Module, targets: list[str]) -> dict[str, int]:
    """How many modules each LoRA target matches, by PEFT's rule (the name, or a ``.``-suffix).

    A target that matches nothing, or matches a layer LoRA cannot adapt, is a ``ValueError``
    naming it (with similar module names); PEFT itself only fails when no target matches at all.
    """
    modules = dict(transformer.named_modules())
    found = {}
    for target in targets:
        matched = [name for name in modules if name == target or name.endswith(f".{target}")]
        if not matched:
            raise ValueError(
                f"training.lora.target_modules: {target!r} not found in the {type(transformer).__name__} "
                f"(Target modules {{{target!r}}} not found in the base model); similar module names: {_similar(target, modules)}"
            )
        wrong = [name for name in matched if not isinstance(modules[name], ADAPTABLE_LAYERS)]
        if wrong:
            inside = sorted(
                name.removeprefix(f"{wrong[0]}.") for name, module in modules.items()
                if name.startswith(f"{wrong[0]}.") and isinstance(module, ADAPTABLE_LAYERS)
            )
            raise ValueError(
                f"training.lora.target_modules: {target!r} matches {len(wrong)} {type(modules[wrong[0]]).__name__} "
                f"module(s) (e.g. {wrong[0]}), which LoRA cannot adapt; the layers inside it are {inside[:12]}"
            )
        found[target] = len(matched)
    return found


def _similar(target: str, modules: dict[str, nn.Module]) -> list[str]:
    """Adaptable module names (last component, with its parent when that is an index) near ``target``."""
    names = set()
    for name, module in modules.items():
        if isinstance(module, ADAPTABLE_LAYERS) and name:
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    close = difflib.get_close_matches(target, sorted(names), n=6, cutoff=0.5)
    return close or sorted(names)[:12]


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` has LoRA layers (PEFT's own record; :func:`merge_lora` removes them)."""
    return bool(_tuner_layers(model))


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of ``model`` by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter of every LoRA layer; PEFT marks exactly its weights trainable."""
    for layer in _tuner_layers(model).values():
        layer.set_adapter(name)


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block ``name`` is active; ``default`` (trainable) again afterwards."""
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, TRAINED)


def adapter_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(ema parameter, default parameter)`` of every LoRA weight, matched by name."""
    parameters = dict(model.named_parameters())
    pairs = []
    for name, parameter in parameters.items():
        if f".{EMA}." in name:
            pairs.append((parameter, parameters[name.replace(f".{EMA}.", f".{TRAINED}.")]))
    return pairs


def merge_lora(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (``W + scale * B A``) and remove every LoRA
    layer, leaving the transformer with its original module names and keys (for export)."""
    for module_name, layer in _tuner_layers(model).items():
        layer.merge(adapter_names=[name])
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for module in model.modules():  # PEFT's record of the injected adapters, now gone
        if hasattr(module, "peft_config"):
            del module.peft_config


def model_weights(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint stores: the whole state dict, or for LoRA only the adapters (and emb_2)."""
    state = model.state_dict()
    if not is_lora(model):
        return state
    # Both adapters (the EMA one is frozen) and whatever else trains: emb_2 under
    # train_second_embedding, which apply_lora leaves trainable beside the adapter.
    keep = {name for name, parameter in model.named_parameters() if "lora_" in name or parameter.requires_grad}
    return {name: value for name, value in state.items() if name in keep}


def load_model_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Inverse of :func:`model_weights`: a LoRA checkpoint must hold exactly those keys."""
    if not is_lora(model):
        model.load_state_dict(weights)
        return
    expected = set(model_weights(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"LoRA checkpoint does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict(weights, strict=False)


# ---- the EMA teacher of a LoRA model ---------------------------------------------------------


class AdapterView(nn.Module):
    """The model with one of its LoRA adapters active for the duration of each call."""

    def __init__(self, model: nn.Module, adapter: str):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        with active_adapter(self.model, self.adapter):
            return self.model(*args, **kwargs)


class AdapterEMATeacher(EMATeacher):
    """The EMA teacher of a LoRA model: the second PEFT adapter ``ema`` (made by
    :func:`apply_lora`) holds the EMA of the trained adapter ``default``.

    Same warm-up and interface as :class:`EMATeacher`; the teacher calls switch the active
    adapter, so the frozen base weights are shared. The EMA weights live in the model's own state
    dict (``...lora_A.ema.weight``), so checkpoints need no separate EMA file (``owns_weights`` is false).
    A fully trained ``emb_2`` (``train_second_embedding``) is shared with the model, not averaged.

    :meth:`update` pairs the adapters' parameters of the model it is given, not those seen here:
    FSDP's ``fully_shard`` replaces every parameter by a sharded one after the teacher is made
    (:mod:`twinflow.train.distributed`), and each process then blends its own shards.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.working_decay = 0.0
        if decay > 0 and not adapter_pairs(model):
            raise ValueError("the model has no 'ema' LoRA adapter; build it with apply_lora(model, options, ema=True)")
        self.network = AdapterView(model, EMA) if decay > 0 else model

    @property
    def owns_weights(self) -> bool:
        return False  # the EMA adapter lives in (and is saved with) the model's own weights

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``default`` into ``ema`` (``model``: the unwrapped model, sharded or not)."""
        for teacher_parameter, parameter in adapter_pairs(model):
            teacher_parameter.lerp_(parameter.detach(), 1.0 - self.working_decay)
        self.working_decay += (1.0 - self.working_decay) * (self.decay - self.working_decay) * 0.5


def teacher_for(model: nn.Module, decay: float) -> EMATeacher:
    """The EMA teacher that suits ``model``: a LoRA adapter for a LoRA model, else a copy (or the model)."""
    if is_lora(model):
        return AdapterEMATeacher(model, decay)
    return EMATeacher(model, decay)
