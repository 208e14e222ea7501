"""Pre-flight: check a training config for a world size and estimate its memory, building nothing real.

``twinflow train --config FILE --dry-run [--world-size N] [--latent-size S]`` calls
:func:`preflight` and prints the :class:`PreflightPlan` it returns
(:func:`twinflow.train.preflight_report.render`). Nothing is
written and no weights are read or allocated: the model is built on the meta device (a diffusers
transformer from its ``config.json`` through the class's ``from_config``, then the family's
TwinFlow adapter, gradient checkpointing and the LoRA adapters exactly as a run builds them; the
U-Net from the data's geometry): the full-size Qwen-Image (20B) builds in under a second on the
meta device, and PEFT takes two or three more to inject its ~960 LoRA layers.

What is checked, in the order a run would meet it (the first problem is a ``ConfigError``
naming the key, module or file, in one line):

* the config itself (:func:`~twinflow.train.config.load_config`, done by the caller), then
  :func:`~twinflow.train.config.check_world_size` and the strategy for ``N`` processes;
* how the objective's slices fall on the per-process micro-batch and the optimizer step
  (:class:`~twinflow.objective.partition.SliceSchedule`), per phase;
* the data: a latent cache's index (shapes only, no latent is read) or the image data set; a
  ``data.root`` that does not exist yet is a note, and the activation estimate then uses
  ``--latent-size`` or the family's default;
* the model: its folder and class, the family, every LoRA target module (one that matches
  nothing is an error listing similar names), the FSDP units (``repeated_blocks``).

The memory estimate (:func:`memory_estimate`) is per process and per strategy; the formulas
carry their reasons. Parameter state is exact for the model as built; activations are a rough,
documented estimate for transformers (:func:`transformer_activations`), not made for the U-Net.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from twinflow.adapters.qwen_image import SOURCE_KEYS
from twinflow.data.cache_format import ITEM_NULL_PREFIX
from twinflow.devices import native_bf16
from twinflow.objective.partition import slice_schedule, stream_position
from twinflow.train.config import LATENT_CACHE, ConfigError, check_world_size, model_arguments, phase_objective

GB = 1e9  # decimal gigabytes, as GPU memory is quoted (a 20B bf16 base: 40.9 GB)

ACTIVATION_BYTES_PER_BLOCK = 34  # per token and width unit in 16 bit (Korthikanti et al. 2022, see below)
NO_GRAD_ELEMENTS_PER_BLOCK = 10  # per token and width unit: one block's working set without saving


@dataclass
class SlicePlan:
    """How the objective's four slices fall in one phase (spec 2.1)."""

    phase: int
    preset: str
    steps: int
    weights: dict[str, int]  # integer slice weights; one period holds sum(weights) samples
    period: int
    micro_batch: dict[str, int]  # slices of rank 0's first micro-batch
    step_window: dict[str, int]  # slices of all samples of the first optimizer step (every process)
    whole_periods: bool  # every optimizer step holds whole periods: exact proportions in every step
    rotation_steps: int  # optimizer steps after which the assignment repeats (1 with whole periods)


@dataclass
class ActivationEstimate:
    """Saved activations of the objective's one gradient call, per sample (see :func:`transformer_activations`)."""

    method: str  # how it was estimated, for the report
    source: str  # where the latent size came from
    latent_shape: tuple[int, ...]  # (C, h, w), or the image shape of a U-Net
    tokens: int  # image + text tokens (transformers), 0 for a U-Net
    per_sample: float  # bytes kept for backward by the gradient call
    no_grad_per_sample: float  # bytes of a no-gradient call's transient working set


@dataclass
class MemoryEstimate:
    """Bytes per process under one strategy; :attr:`total` is their sum (see :func:`memory_estimate`)."""

    strategy: str
    weights: float
    buffers: float
    adapters: float
    gradients: float
    optimizer: float
    teacher: float
    gathered: float
    activations: float

    @property
    def parts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "strategy"}

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class PreflightPlan:
    """Everything a dry run found; numbers are exact unless the field says estimate."""

    world_size: int
    strategy: str  # the one in effect: "none" for one process
    precision: str
    batch_size: int  # global, per micro-step
    per_process_batch: int
    grad_accumulation: int
    samples_per_step: int  # per optimizer step, all processes together
    slices: list[SlicePlan]
    model: str  # class of the network (the transformer's for a diffusers model)
    family: str | None
    transformer_parameters: int  # the network as released (a U-Net: all of it)
    second_embedding_parameters: int  # emb_2 added by the adapter
    base_parameters: int  # transformer + emb_2, before LoRA
    base_dtype: str
    base_bytes: int  # base_parameters in their dtype
    buffer_bytes: int
    lora_rank: int | None
    lora_targets: dict[str, int]  # target -> matched modules
    lora_parameters: int  # one adapter
    adapter_bytes: int  # trained extras beyond base_bytes: the default adapter, emb_2's fp32 upcast
    trained_parameters: int  # what the optimizer gets
    trained_bytes: int
    teacher: str  # "EMA copy", "ema adapter" or "the model itself"
    teacher_bytes: int  # an EMA copy's weights (its buffers come on top) or the ema adapter; 0 for decay 0
    gathered_bytes: int  # FSDP: the full model and teacher weights during the objective
    fsdp_units: dict[str, int]  # block class -> count
    gradient_checkpointing: bool
    activations: ActivationEstimate | None
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---- the plan -----------------------------------------------------------------------------------


def preflight(config: dict, world_size: int, latent_size: tuple[int, int] | None = None) -> PreflightPlan:
    """Check a validated config (:func:`~twinflow.train.config.load_config`) for ``world_size``
    processes and plan its memory; raises ``ConfigError`` (a ``ValueError``) naming the problem."""
    training = config["training"]
    check_world_size(config, world_size)
    configured = config["distributed"]["strategy"]
    if world_size > 1 and configured == "none":
        raise ConfigError(
            f"distributed.strategy is 'none' but --world-size is {world_size}; set distributed.strategy to 'ddp' or 'fsdp'"
        )
    strategy = configured if world_size > 1 else "none"
    notes, cautions = [], []
    if configured != "none" and world_size == 1:
        notes.append(f"one process: distributed.strategy {configured!r} does not apply (give --world-size N)")
    batch, accumulation = training["batch_size"], training["grad_accumulation"]
    per_process = batch // world_size
    slices = [_slice_plan(config, number, world_size) for number in range(len(config["phases"]))]

    data, shapes, text_tokens, sources = _read_data(config, notes)
    model, facts = _meta_model(config, data)
    lora = training["lora"]
    decay = float(training["ema_decay"])
    fsdp_units = dict(Counter(type(block).__name__ for block in _fsdp_blocks(model)))
    if strategy == "fsdp" and not fsdp_units:
        cautions.append("FSDP: the model has no repeated blocks, so it is one unit, gathered whole in every forward")
    if facts["weight_files"] is False:
        cautions.append(f"{facts['folder']} holds no weight files: a dry run reads none, the run would fail to load")

    precision = _planned_precision(config)
    activations = _activations(model, facts, config, precision, shapes, (text_tokens, sources), latent_size, notes)
    teacher = "the model itself" if decay == 0 else ("ema adapter" if lora else "EMA copy")
    ema_adapter = _bytes(model, lambda name: "lora_" in name and ".ema." in name)
    # FSDP gathers the model and an EMA copy in full for the whole objective (gathered_weights):
    # in bf16 under precision bf16 (mixed_precision_policy's param_dtype), else as stored.
    bf16 = precision == "bf16"
    gathered = sum(p.numel() * (2 if bf16 else p.element_size()) for p in model.parameters())
    if teacher == "EMA copy":
        gathered += 2 * facts["base_parameters"] if bf16 else facts["base_bytes"]
    plan = PreflightPlan(
        world_size=world_size, strategy=strategy, precision=precision, batch_size=batch,
        per_process_batch=per_process, grad_accumulation=accumulation, samples_per_step=batch * accumulation,
        slices=slices, model=facts["model"], family=facts["family"],
        transformer_parameters=facts["transformer_parameters"],
        second_embedding_parameters=facts["second_embedding_parameters"],
        base_parameters=facts["base_parameters"], base_dtype=facts["base_dtype"], base_bytes=facts["base_bytes"],
        buffer_bytes=facts["buffer_bytes"], lora_rank=lora["rank"] if lora else None, lora_targets=facts["lora_targets"],
        lora_parameters=_count(model, lambda name: "lora_" in name and ".default." in name),
        # What the trained extras add beyond the base in its dtype: the default adapter (fp32)
        # and, when emb_2 trains in full, its upcast to fp32.
        adapter_bytes=_bytes(model) - facts["base_bytes"] - ema_adapter,
        trained_parameters=_count(model, trained=True), trained_bytes=_bytes(model, trained=True),
        # An EMA copy is a deep copy of the model (teacher_for, before any LoRA); a LoRA teacher the ema adapter.
        teacher=teacher, teacher_bytes={"EMA copy": facts["base_bytes"], "ema adapter": ema_adapter}.get(teacher, 0),
        gathered_bytes=gathered, fsdp_units=fsdp_units, gradient_checkpointing=training["gradient_checkpointing"],
        activations=activations, notes=notes, warnings=cautions,
    )
    for name in (["none"] if world_size == 1 else ["ddp", "fsdp"]):
        plan.memory[name] = memory_estimate(plan, name)
    return plan


def memory_estimate(plan: PreflightPlan, strategy: str) -> MemoryEstimate:
    """Bytes per process of ``plan`` under ``strategy``; every line says why."""
    shards = plan.world_size if strategy == "fsdp" else 1  # FSDP keeps 1/N of every parameter and its state
    per_sample = plan.activations.per_sample if plan.activations else 0.0
    no_grad = plan.activations.no_grad_per_sample if plan.activations else 0.0
    return MemoryEstimate(
        strategy=strategy,
        # The base in its dtype (model.dtype); FSDP shards it.
        weights=plan.base_bytes / shards,
        # Buffers (e.g. SD3's positional table) are not sharded: every process holds them.
        buffers=plan.buffer_bytes,
        # LoRA: the trained adapter in fp32 (plus emb_2 upcast when it trains in full); sharded with its block.
        adapters=plan.adapter_bytes / shards,
        # One gradient per trained parameter, in the parameter's dtype (fp32: the base is frozen
        # under LoRA; full-parameter training keeps fp32 weights); FSDP reduce-scatters into shards;
        # DDP's reduction buckets hold the gradients themselves (gradient_as_bucket_view).
        gradients=plan.trained_bytes / shards,
        # Adam/AdamW: two moments per trained parameter, in its dtype (fp32); sharded like the parameters.
        optimizer=2 * plan.trained_bytes / shards,
        # An EMA copy is weight-sized (sharded like the model) plus its own buffers; a LoRA teacher
        # is the second adapter (sharded with its block); decay 0 is the model itself: nothing.
        teacher=plan.teacher_bytes / shards + (plan.buffer_bytes if plan.teacher == "EMA copy" else 0),
        # FSDP: the full model and teacher live on every device for the whole objective
        # (gathered_weights, reshard_after_forward=False), on top of the shards.
        gathered=plan.gathered_bytes if strategy == "fsdp" else 0.0,
        # The gradient call keeps its activations for backward; the no-gradient calls (teacher,
        # fake samples, Delta_v) keep none, but the batched guidance call (2 b samples) needs a
        # block's working set while the gradient call's activations are alive.
        activations=plan.per_process_batch * per_sample + 2 * plan.per_process_batch * no_grad,
    )


# ---- batch and slices -----------------------------------------------------------------------


def _slice_plan(config: dict, number: int, world_size: int) -> SlicePlan:
    phase = config["phases"][number]
    objective = phase_objective(phase, f"phases.{number}")
    schedule = slice_schedule(objective.proportions)
    batch, accumulation = config["training"]["batch_size"], config["training"]["grad_accumulation"]
    per_process, window = batch // world_size, batch * accumulation
    start = stream_position(0, 0, accumulation, 0, world_size, per_process)
    return SlicePlan(
        phase=number, preset=str((phase.get("objective") or {}).get("preset", "twinflow")), steps=phase["steps"],
        weights=dict(schedule.weights), period=schedule.period,
        micro_batch=schedule.counts(start, per_process), step_window=schedule.counts(0, window),
        whole_periods=window % schedule.period == 0,
        # Step k covers stream positions [k W, (k + 1) W): the pattern is back at its start when
        # k W is a multiple of the period.
        rotation_steps=schedule.period // math.gcd(window, schedule.period),
    )


# ---- data -----------------------------------------------------------------------------------


def _read_data(config: dict, notes: list[str]):
    """``(training data or None, latent shapes, text tokens or None, edit source images)``; a
    latent cache's index only."""
    from twinflow.train.data import load_training_data

    source = config["data"]
    if source["source"] == LATENT_CACHE and not Path(source["root"]).exists():
        notes.append(f"data.root {source['root']} does not exist (yet): data not checked")
        return None, [], None, 0
    try:
        data = load_training_data(source)  # a cache: its index.json only; images: the data set
        data.batch_order(config["training"]["batch_size"], config["seed"])  # the batch must fit the data
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data ({source.get('root') or source['source']}): {error}") from None
    if source["source"] != LATENT_CACHE:
        return data, [tuple(data.image_shape)], None, 0
    # Text tokens: the longest condition sequence (dimension 1 of 3-d tensors) in any shard; an
    # edit's null prompt ("null." keys) is a separate call, not more tokens.
    lengths = [
        shape[1] for shard in data.cache.index["shards"] for key, shape in shard["shapes"].items()
        if key != "latents" and len(shape) == 3 and not key.startswith(ITEM_NULL_PREFIX)
    ]
    # Edits: each source's latents (at the target's size) join the sequence.
    sources = sum(key in SOURCE_KEYS for key in data.cache.condition_keys)
    return data, list(data.latent_shapes), max(lengths) if lengths else None, sources


def _planned_precision(config: dict) -> str:
    """The precision a launch would compute in: ``auto`` plans bf16 unless the run is on the CPU
    of a machine without native bfloat16 (a dry run usually plans GPUs it does not have)."""
    precision = config["precision"]
    if precision != "auto":
        return precision
    return "fp32" if str(config["device"]) == "cpu" and not native_bf16(torch.device("cpu")) else "bf16"


# ---- the model on the meta device ------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings or diffusers log lines while building (emb_2 copies, dtype casts, PEFT)."""
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # a U-Net config without the diffusers extra
        diffusers_logging = None
    level = diffusers_logging.get_verbosity() if diffusers_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if diffusers_logging:
            diffusers_logging.set_verbosity_error()
        try:
            yield
        finally:
            if diffusers_logging:
                diffusers_logging.set_verbosity(level)


def _meta_model(config: dict, data) -> tuple[nn.Module, dict]:
    """The network a run would train, on the meta device, and the facts about it: the backbone
    (a U-Net through the run's own builder, a diffusers transformer through :func:`_meta_adapter`),
    then what ``build_backbone`` adds (gradient checkpointing; LoRA, or the frozen gradient-free modules)."""
    from twinflow.train.backbone import build_network, finish_backbone

    name, arguments = model_arguments(config)
    training = config["training"]
    with torch.device("meta"), _quiet():
        if name == "diffusers":
            model, folder = _meta_adapter(arguments)
        elif data is None:
            raise ConfigError(f"model.name {name!r} takes its geometry from the data, and there is none")
        else:
            (model, _), folder = build_network(name, arguments, data), None
        transformer = getattr(model, "transformer", model)
        second = 0 if getattr(model, "single_time_embedding", True) else _count(model.second_embedding)
        facts = {
            "model": type(transformer).__name__, "family": getattr(model, "family", None),
            "folder": str(folder) if folder else None,
            "weight_files": (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))) if folder else None,
            "transformer_parameters": _count(model) - second, "second_embedding_parameters": second,
            "base_parameters": _count(model), "base_bytes": _bytes(model),
            "base_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()), "lora_targets": {},
        }
        try:
            finish_backbone(model, training)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if training["lora"] is not None:
            facts["lora_targets"] = _adapted(model.transformer, training["lora"]["target_modules"])
    return model, facts


def _meta_adapter(arguments: dict) -> tuple[nn.Module, Path]:
    """The family adapter around the transformer of ``model.path``'s config.json, on the meta
    device: what a run builds (:func:`~twinflow.models.diffusers.build_diffusers`), without weights."""
    from twinflow.models.diffusers import DiffusersConfig, build_diffusers

    try:
        settings = DiffusersConfig(**arguments)
        model = build_diffusers(settings, weights=False)
    except (FileNotFoundError, TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"model.path {arguments.get('path')}: {error}") from None
    folder = Path(settings.path)
    return model, folder / "transformer" if (folder / "transformer").is_dir() else folder


def _adapted(transformer: nn.Module, targets: list[str]) -> dict[str, int]:
    """LoRA layers per target after injection (a family's gradient-free modules get none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [name for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)]
    return {target: sum(1 for name in layers if name == target or name.endswith(f".{target}")) for target in targets}


def _fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``wrap_model`` shards one by one (those with parameters)."""
    from twinflow.train.distributed import repeated_blocks

    return [block for block in repeated_blocks(model) if any(True for _ in block.parameters())]


def _count(model: nn.Module, select=None, trained: bool = False) -> int:
    """Parameters of ``model`` (whose names ``select`` accepts; only trainable ones with ``trained``)."""
    return sum(p.numel() for n, p in model.named_parameters() if (select is None or select(n)) and (p.requires_grad or not trained))


def _bytes(model: nn.Module, select=None, trained: bool = False) -> int:
    return sum(
        p.numel() * p.element_size() for n, p in model.named_parameters()
        if (select is None or select(n)) and (p.requires_grad or not trained)
    )


# ---- activations ----------------------------------------------------------------------------


def _activations(model, facts, config, precision, shapes, text, latent_size, notes) -> ActivationEstimate | None:
    """The activation estimate at the data's largest latents, ``--latent-size`` or the family
    default, in ``precision`` (the planned one); ``text``: the cache's text tokens (or None) and its
    edit source images."""
    text_tokens, sources = text
    element = 2 if precision == "bf16" else 4
    if facts["family"] is None:
        notes.append(f"activations: not estimated for {facts['model']} (the estimate is a transformer's; a short run measures it)")
        return None
    from twinflow.families import FAMILIES

    family, transformer = FAMILIES[facts["family"]], model.transformer
    channels, patch = family.latent_channels(transformer), family.patch_size(transformer)
    # Without a latent cache: the family's native size and its longest prompt (twinflow.families).
    side, what, default_text = family.native_latent_side, family.native_size, family.longest_prompt
    for shape in shapes:  # the cache's latents must fit the transformer
        if shape[0] != channels or shape[1] % patch or shape[2] % patch:
            raise ConfigError(
                f"data.root {config['data']['root']}: latents of shape {list(shape)} do not fit this "
                f"{facts['family']} transformer ({channels} channels, sides multiples of {patch})"
            )
    if latent_size is not None:
        height, width = latent_size
        if height % patch or width % patch:
            raise ConfigError(f"--latent-size {height}x{width}: sides must be multiples of the patch size {patch}")
        latent, source = (channels, height, width), "--latent-size"
    elif shapes:
        latent = max(shapes, key=lambda s: s[1] * s[2])
        source = "data.root" + (f" (largest of {len(shapes)} buckets)" if len(shapes) > 1 else "")
    else:
        latent, source = (channels, side, side), f"the {facts['family']} default ({what})"
        notes.append(f"activations at {source}: latents {channels}x{side}x{side}; give --latent-size HxW for another")
    if text_tokens is None:
        text_tokens = default_text
        notes.append(f"text tokens: {default_text}, the {facts['family']} prompt limit (an upper bound)")
    image_tokens = (latent[1] // patch) * (latent[2] // patch) * (1 + sources)
    if sources:
        notes.append(f"edits: {sources} source image(s) per item add {sources} x the target's tokens to the sequence")
    per_sample, no_grad = transformer_activations(
        image_tokens + text_tokens, _width(transformer.config), len(_fsdp_blocks(model)), element,
        config["training"]["gradient_checkpointing"],
    )
    method = "checkpointed blocks: block inputs + one recomputed block" if config["training"]["gradient_checkpointing"] \
        else "no checkpointing: every block's saved tensors"
    return ActivationEstimate(method, source, tuple(latent), image_tokens + text_tokens, per_sample, no_grad)


def transformer_activations(tokens: int, width: int, blocks: int, element: int, checkpointing: bool) -> tuple[float, float]:
    """``(saved bytes per sample of the gradient call, transient bytes per sample of a no-gradient call)``.

    A rough estimate, good to perhaps +-50 %: a transformer block keeps about 34 s*d bytes for
    backward in 16 bit (s tokens, width d; Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", without the attention-score term, which SDPA's
    flash / memory-efficient kernels never store; adaLN modulation and q/k norms add some).
    diffusers' gradient checkpointing keeps only each block's input (s*d elements) and recomputes
    one block at a time in backward. A no-gradient call holds one block's working set, about
    10 s*d elements (input, q, k, v, attention output, the MLP's hidden state). fp32 doubles all.
    """
    scale = element / 2
    block = ACTIVATION_BYTES_PER_BLOCK * tokens * width * scale
    saved = blocks * tokens * width * element + block if checkpointing else blocks * block
    return saved, NO_GRAD_ELEMENTS_PER_BLOCK * tokens * width * element


def _width(config) -> int:
    """The transformer's hidden width: ``dim`` (Z-Image) or heads x head width (MMDiTs)."""
    if "dim" in config:
        return int(config["dim"])
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def parse_latent_size(text: str) -> tuple[int, int]:
    """``128`` or ``166x128`` (height x width, in latent pixels) -> ``(height, width)``."""
    height, _, width = text.lower().partition("x")
    width = width or height
    if not (height.strip().isdigit() and width.strip().isdigit()) or int(height) < 1 or int(width) < 1:
        raise ConfigError(f"--latent-size must look like 128 or 166x128 (latent height x width), got {text!r}")
    return int(height), int(width)


def default_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun's), else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE in the environment must be a positive integer, got {value!r}")
    return int(value)
