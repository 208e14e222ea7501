"""Fine-tuning cost of a diffusers text-to-image transformer: TwinFlow against flow matching.

    python benchmarks/finetune_cost.py --out benchmarks/results          # CPU: a tiny random Z-Image
    python benchmarks/finetune_cost.py --device cuda --size medium       # GPU: ~1B (not run here)

The claim checked: TwinFlow training needs at most 1.3x the memory of plain flow-matching
fine-tuning of the same model, because it trains one network only (no frozen teacher, no
discriminator, no fake-score network). Every configuration is one optimizer step of what
``twinflow train`` does for a diffusers backbone, built from the project's own pieces: the
family's adapter around the transformer, diffusers' gradient checkpointing
(:func:`twinflow.train.backbone.enable_gradient_checkpointing`) and PEFT LoRA
(:func:`twinflow.train.lora.apply_lora`) as ``training.*`` of the config says,
:func:`twinflow.train.lora.teacher_for`, :func:`twinflow.train.loop.objective_loss` (with bf16
autocast when asked) on ``TwinFlowObjective(objective_config(preset))``, gradient clipping,
AdamW over the trainable parameters, and the teacher update. The configurations:

* method ``flow_matching`` or ``twinflow`` (the objective presets) x mode ``full`` or ``lora``;
* full-parameter TwinFlow twice: with the EMA teacher (a full copy of the model, the config's
  ``training.ema_decay``, 0.99) and with decay 0 (the model is its own teacher, what the spec
  recommends at 20B scale); with LoRA the EMA teacher is a second adapter, also measured with
  and without it. Flow matching has no teacher (decay 0; its objective never calls one).

Training options (gradient checkpointing, LoRA rank / targets, optimizer settings, EMA decay)
come from ``--config`` (default: the project's ``configs/z_image_twinflow.yaml``). The model is
not read from a folder: ``build_backbone`` would load ``model.path`` with ``from_pretrained``,
and writing a random 6B model to disk only to read it back would measure the disk and the
loader's transient pages, not training. Instead the transformer is built in memory from its
config with random weights and wrapped with :func:`twinflow.adapters.adapter_for` (what
``load_adapter`` does after ``from_pretrained``), then given the same training options in the
same order as ``build_backbone``. The batch is random latents and random prompt embeddings
(no VAE or text encoder runs during training anyway: they come from a latent cache); the
null condition is a random "empty prompt" of a few unmasked tokens, padded like a cached one.

Memory: one fresh Python process per configuration and round (``--probe``), so no allocation
of another configuration is counted.

* CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``) after warm-up and timed
  steps, with the peak reset before the model is built.
* CPU: the process's peak resident set (``VmHWM``) at the end, minus its value once torch,
  diffusers, PEFT and twinflow are imported, before the model is built (at that point it equals
  the resident set). Not the growth over the set-up, as ``costs.py`` measures for the MNIST
  objectives: there the model is shared and only the step differs, whereas here what differs is
  exactly what the set-up holds (an EMA copy or adapter, trainable weights, optimizer state).
  The claim is about total training memory (weights, gradients, optimizer state, teacher,
  activations), so that is what is measured. The ratio to flow matching depends on how much
  of the total the activations are: when the weights dominate (gradient checkpointing, small
  images) an EMA copy adds 1 to the 4 weight-sized fp32 buffers of full-parameter AdamW
  training (weights, gradients, two moments), i.e. up to 1.25x; larger activations, which
  TwinFlow's single gradient-carrying forward shares with flow matching, pull it towards 1.

Time: seconds per optimizer step, after one warm-up step, averaged over ``--steps`` steps; the
configurations take turns round by round (``--rounds``), so drift of the machine's speed hits
all alike, and the fastest round counts (other work only ever adds time), as in ``costs.py``.
Memory per round is deterministic up to allocator noise; the median round is reported.

On this project's machine (2 CPU cores shared with other work, no GPU) the CPU path uses one
torch thread (``--threads``): small matrices run faster that way and neighbours keep a core.
Numbers on the tiny model show the relative cost, not real-model step times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from costs import peak_resident_kib, synchronise  # noqa: E402

from twinflow.adapters import adapter_for  # noqa: E402
from twinflow.objective import TwinFlowObjective, objective_config  # noqa: E402
from twinflow.train.lora import AdapterEMATeacher, teacher_for  # noqa: E402
from twinflow.train.backbone import enable_gradient_checkpointing  # noqa: E402
from twinflow.train.distributed import clip_gradients  # noqa: E402
from twinflow.train.lora import adapter_pairs, apply_lora  # noqa: E402
from twinflow.train.loop import objective_loss  # noqa: E402

MEMORY_TARGET = 1.3  # TwinFlow peak memory over flow matching of the same mode
BASELINE = "flow_matching"
MODES = ("full", "lora")
MODE_LABELS = {"full": "full-parameter", "lora": "LoRA"}
DEFAULT_CONFIG = "configs/z_image_twinflow.yaml"
NULL_TOKENS = 4  # unmasked tokens of the random "empty prompt" (a cached one is a handful)


@dataclass(frozen=True)
class ModelSize:
    """A random Z-Image transformer (``ZImageTransformer2DModel`` keyword arguments) and the batch it trains on."""

    transformer: dict
    description: str
    latent_size: int  # latent side; the VAE downsamples 8x, so 64 is a 512 px image
    caption_tokens: int
    batch_size: int


SIZES: dict[str, ModelSize] = {
    # ~18M parameters: one step well under 2 s on one CPU thread, weights + AdamW state ~290 MB.
    "tiny": ModelSize(
        dict(in_channels=16, dim=384, n_layers=6, n_refiner_layers=1, n_heads=6, n_kv_heads=6, cap_feat_dim=256,
             axes_dims=[16, 24, 24], axes_lens=[256, 64, 64]),
        "tiny random Z-Image transformer", latent_size=16, caption_tokens=16, batch_size=4,
    ),
    # ~1.1B parameters: Z-Image's layout (head width 128) at half the width and two thirds of the depth.
    "medium": ModelSize(
        dict(dim=1920, n_layers=20, n_heads=15, n_kv_heads=15),
        "medium random Z-Image transformer", latent_size=64, caption_tokens=128, batch_size=4,
    ),
    # diffusers' defaults are the released Z-Image transformer: 6.15B parameters.
    "full": ModelSize({}, "full-size random Z-Image transformer (6B)", latent_size=64, caption_tokens=128, batch_size=4),
}


@dataclass(frozen=True)
class Setting:
    """One configuration: objective preset, full-parameter or LoRA, and the teacher's EMA decay."""

    method: str
    mode: str
    ema_decay: float

    @property
    def teacher(self) -> str:
        if self.method == BASELINE:
            return "none"
        if self.ema_decay == 0:
            return "the model itself"
        return f"EMA {'copy' if self.mode == 'full' else 'adapter'} ({self.ema_decay:g})"


def settings(ema_decay: float) -> list[Setting]:
    """Flow matching, TwinFlow with an EMA teacher and TwinFlow as its own teacher, per mode."""
    if not 0 < ema_decay < 1:
        raise ValueError(f"the EMA configurations need training.ema_decay in (0, 1), the config has {ema_decay}")
    return [
        setting
        for mode in MODES
        for setting in (Setting(BASELINE, mode, 0.0), Setting("twinflow", mode, ema_decay), Setting("twinflow", mode, 0.0))
    ]


@dataclass
class Options:
    """Everything a probe process needs (sent to it as JSON)."""

    device: str
    size: str
    precision: str  # fp32 | bf16 (autocast, as training's ``precision``)
    gradient_checkpointing: bool
    lora: dict  # completed training.lora options, used in mode "lora"
    optimizer: str
    learning_rate: float
    betas: list[float]
    weight_decay: float
    grad_clip: float
    batch_size: int
    latent_size: int
    caption_tokens: int
    steps: int
    threads: int


# ---- the measured thing: one optimizer step of twinflow train --------------------------------------


def build_model(setting: Setting, options: Options) -> torch.nn.Module:
    """The adapted random transformer with the training options, in build_backbone's order."""
    import diffusers  # the optional extra: pip install "twinflow[diffusers]"

    torch.manual_seed(0)
    with torch.device(options.device):  # parameters are created where they train (no CPU copy of 6B)
        transformer = diffusers.ZImageTransformer2DModel(**SIZES[options.size].transformer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 starts as a copy of emb: the weights are random anyway
        model = adapter_for(transformer)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if setting.mode == "lora":
        apply_lora(model, options.lora, ema=setting.ema_decay > 0)
    return model.train()


def random_batch(model: torch.nn.Module, options: Options, device: torch.device) -> tuple:
    """``(latents, condition, null condition)`` shaped like a latent cache's batch.

    ``model`` is an adapted Z-Image or Qwen-Image transformer: the latent channels and the
    prompt width are its family's (Z-Image: ``in_channels`` and ``cap_feat_dim``).
    """
    from twinflow.generation import FAMILIES

    from generation_speed import text_width

    transformer = model.transformer
    channels = FAMILIES[model.family].latent_channels(transformer)
    width = text_width(model.family, transformer)
    generator = torch.Generator().manual_seed(0)
    count, tokens = options.batch_size, options.caption_tokens
    latents = torch.randn(count, channels, options.latent_size, options.latent_size, generator=generator)
    condition = {
        "prompt_embeds": torch.randn(count, tokens, width, generator=generator),
        "prompt_embeds_mask": torch.ones(count, tokens, dtype=torch.int64),
    }
    null_mask = torch.zeros(count, tokens, dtype=torch.int64)
    null_mask[:, :NULL_TOKENS] = 1
    empty_prompt = torch.randn(1, tokens, width, generator=generator) * null_mask[:1, :, None]
    null = {"prompt_embeds": empty_prompt.expand(count, -1, -1).clone(), "prompt_embeds_mask": null_mask}
    move = lambda tensors: {key: value.to(device) for key, value in tensors.items()}  # noqa: E731
    return latents.to(device), move(condition), move(null)


class FinetuneStep:
    """Model, teacher, optimizer and batch of one configuration; calling it is one optimizer step,
    in the training loop's order (objective, backward, clip, step, zero, teacher update).

    ``model`` and ``batch`` default to :func:`build_model` and :func:`random_batch` of the
    options; a caller with a model already built (``benchmarks/gpu_check.py``) passes its own,
    with checkpointing and LoRA already applied. ``optimizer_options`` go to the optimizer as
    extra keyword arguments (e.g. ``fused=True``).
    """

    def __init__(self, setting: Setting, options: Options, model: torch.nn.Module | None = None,
                 batch: tuple | None = None, optimizer_options: dict | None = None):
        self.device = torch.device(options.device)
        self.precision = options.precision
        self.grad_clip = options.grad_clip
        self.model = build_model(setting, options) if model is None else model.train()
        self.teacher = teacher_for(self.model, setting.ema_decay)
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        optimizer_class = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(trainable, lr=options.learning_rate, betas=tuple(options.betas),
                                         weight_decay=options.weight_decay, **(optimizer_options or {}))
        self.objective = TwinFlowObjective(objective_config(setting.method))
        self.generator = torch.Generator().manual_seed(0)
        self.batch = random_batch(self.model, options, self.device) if batch is None else batch
        self.network_calls = 0
        self.samples_seen = 0  # the stream position of the next batch (as the training loop counts)

    def __call__(self) -> None:
        images, condition, null = self.batch
        position = {"stream_position": self.samples_seen} if _takes_stream_position() else {}
        result = objective_loss(self.objective, self.model, self.teacher.network, images, condition, null,
                                self.generator, self.precision, **position)
        result.loss.backward()
        clip_gradients(self.model, self.grad_clip if self.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update(self.model)
        self.network_calls = result.network_calls
        self.samples_seen += images.shape[0]

    def parameter_counts(self) -> dict[str, int]:
        """The trained network's parameters, the trained ones among them, and what the teacher adds.

        A LoRA EMA adapter sits inside the model's modules but is the teacher's: it is counted
        as the teacher's, not the network's, so that the two add up to what the process holds.
        """
        total = sum(parameter.numel() for parameter in self.model.parameters())
        if isinstance(self.teacher, AdapterEMATeacher):
            teacher = sum(ema.numel() for ema, _ in adapter_pairs(self.model))
            total -= teacher
        elif self.teacher.owns_weights:
            teacher = sum(parameter.numel() for parameter in self.teacher.network.parameters())
        else:
            teacher = 0
        trainable = sum(parameter.numel() for parameter in self.model.parameters() if parameter.requires_grad)
        return {"parameters": total, "trainable_parameters": trainable, "teacher_parameters": teacher}


def _takes_stream_position() -> bool:
    """Whether ``objective_loss`` places a batch in the run's sample stream (the slices of a batch
    smaller than the four slices then rotate from step to step, as in ``twinflow train``)."""
    import inspect

    return "stream_position" in inspect.signature(objective_loss).parameters


def state_megabytes(parameters: int, trainable: int, teacher: int) -> float:
    """fp32 weights + gradients + two Adam moments of the trained weights + the teacher's extra weights."""
    return 4 * (parameters + trainable * 3 + teacher) / 2**20


# ---- one probe: a fresh process per configuration and round ---------------------------------------


def probe(setting: Setting, options: Options) -> dict:
    """Build, warm up, time ``options.steps`` steps; peak memory above the pre-build baseline.

    Runs inside the probe process (see the module notes on what the memory numbers hold).
    """
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        torch.set_num_threads(options.threads)
        baseline = peak_resident_kib() * 1024  # equal to the resident set here: nothing was built yet
    try:
        step = FinetuneStep(setting, options)
        step()  # warm-up: optimizer state, kernels, allocator
        synchronise(device)
        started = time.perf_counter()
        for _ in range(options.steps):
            step()
        synchronise(device)
        seconds = (time.perf_counter() - started) / options.steps
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident_kib() * 1024
    return {"seconds_per_step": seconds, "peak_memory_mb": (peak - baseline) / 2**20,
            "network_calls": step.network_calls, **step.parameter_counts()}


def _import_everything() -> None:
    """What any probe imports lazily, imported before its baseline so that the baseline is common."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401


def run_probe(setting: Setting, options: Options) -> dict:
    """:func:`probe` in a fresh Python process; its result is the last line of its output."""
    request = json.dumps({"setting": asdict(setting), "options": asdict(options)})
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", request]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(
            f"the probe of {setting} failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}"
        )
    return json.loads(finished.stdout.strip().splitlines()[-1])


# ---- results: rows, ratios, verdicts, markdown -------------------------------------------------------


@dataclass
class Row:
    """One configuration's numbers over all rounds."""

    method: str
    mode: str
    ema_decay: float
    teacher: str
    seconds_per_step: float | None  # the fastest round
    peak_memory_mb: float | None  # the median round
    parameters: int = 0
    trainable_parameters: int = 0
    teacher_parameters: int = 0
    network_calls: int = 0
    seconds_rounds: list[float] = field(default_factory=list)
    memory_rounds: list[float] = field(default_factory=list)
    error: str | None = None
    memory_ratio: float | None = None  # to flow matching of the same mode
    time_ratio: float | None = None

    @property
    def state_mb(self) -> float:
        return state_megabytes(self.parameters, self.trainable_parameters, self.teacher_parameters)


def summarise(setting: Setting, probes: list[dict]) -> Row:
    """The fastest round's seconds and the median round's memory (see the module notes)."""
    row = Row(setting.method, setting.mode, setting.ema_decay, setting.teacher, None, None)
    failed = [result["error"] for result in probes if "error" in result]
    if failed:
        row.error = failed[0]
        return row
    row.seconds_rounds = [result["seconds_per_step"] for result in probes]
    row.memory_rounds = [result["peak_memory_mb"] for result in probes]
    row.seconds_per_step, row.peak_memory_mb = min(row.seconds_rounds), statistics.median(row.memory_rounds)
    for key in ("parameters", "trainable_parameters", "teacher_parameters", "network_calls"):
        setattr(row, key, probes[-1][key])
    return row


def add_ratios(rows: list[Row]) -> list[Row]:
    """Set each row's memory and time ratio to the flow-matching row of the same mode."""
    baselines = {row.mode: row for row in rows if row.method == BASELINE}
    for row in rows:
        if row.mode not in baselines:
            raise ValueError(f"no {BASELINE} row for mode {row.mode!r}: the ratios need one per mode")
        baseline = baselines[row.mode]
        row.memory_ratio = _ratio(row.peak_memory_mb, baseline.peak_memory_mb)
        row.time_ratio = _ratio(row.seconds_per_step, baseline.seconds_per_step)
    return rows


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else value / baseline


def verdicts(rows: list[Row], target: float = MEMORY_TARGET) -> list[tuple[str, bool | None, str]]:
    """Per mode: ``(mode, met, what was measured)``; met when every TwinFlow variant of the mode
    stays within ``target`` x flow matching's memory (None: something was not measured)."""
    results = []
    for mode in MODES:
        twinflow = [row for row in rows if row.mode == mode and row.method != BASELINE]
        if not twinflow:
            continue
        ratios = [row.memory_ratio for row in twinflow]
        if any(ratio is not None and ratio > target for ratio in ratios):
            met = False
        else:
            met = None if None in ratios else True
        results.append((mode, met, "; ".join(_measured(row, target) for row in twinflow)))
    return results


def _measured(row: Row, target: float) -> str:
    """``teacher EMA copy (0.99): 1.21x``, with how far over ``target`` when it is."""
    if row.memory_ratio is None:
        return f"teacher {row.teacher}: not measured"
    over = f", {row.memory_ratio / target - 1:.0%} over" if row.memory_ratio > target else ""
    return f"teacher {row.teacher}: {row.memory_ratio:.2f}x{over}"


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _number(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table_row(row: Row) -> str:
    """One markdown table row (the columns of :func:`markdown`'s table)."""
    if row.error:
        return f"| {row.method} | {MODE_LABELS[row.mode]} | {row.teacher} | {row.error} | | | | | | |"
    return (
        f"| {row.method} | {MODE_LABELS[row.mode]} | {row.teacher} | {row.trainable_parameters:,} | "
        f"{row.network_calls} | {_number(row.seconds_per_step, '{:.3f}')} | {_number(row.peak_memory_mb, '{:,.0f}')} | "
        f"{row.state_mb:,.0f} | {_number(row.memory_ratio, '{:.2f}x')} | {_number(row.time_ratio, '{:.2f}x')} |"
    )


def markdown(report: dict) -> str:
    """The report: what ran where, the table, the verdicts, and how to read the numbers."""
    rows = [Row(**row) for row in report["rows"]]
    lines = [
        "# Fine-tuning cost: TwinFlow against flow matching",
        "",
        f"**{report['label']}.** {report['details']}",
        "",
        f"Machine: {report['machine']}. Date {report['date']}; the run took {report['minutes']:.1f} minutes.",
        f"Command: `{report['command']}`",
        "",
        "| method | mode | teacher (EMA decay) | trained parameters | network calls / step | s / step | peak memory (MB) "
        "| weights + grads + AdamW + teacher (MB, computed) | memory vs flow matching | time vs flow matching |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[table_row(row) for row in rows],
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| TwinFlow {MODE_LABELS[mode]} peak memory <= {MEMORY_TARGET:g}x flow matching | {measured} | {_mark(met)} |"
          for mode, met, measured in verdicts(rows)],
        "",
        f"Peak memory: {report['memory_kind']}, one fresh process per configuration and round, the median of "
        f"{report['settings']['rounds']} rounds; seconds per step: the fastest of {report['settings']['rounds']} "
        f"interleaved rounds of {report['settings']['steps']} steps after one warm-up step. The computed column is "
        "the fp32 parameter state alone (4 bytes per weight, gradient, Adam moment and teacher weight); the rest "
        "of the peak is activations, the objective's temporaries and the allocator. See the notes at the top of "
        "`benchmarks/finetune_cost.py`.",
    ]
    return "\n".join(lines) + "\n"


# ---- the benchmark ----------------------------------------------------------------------------------


def measure(options: Options, runs: list[Setting], rounds: int, log=print) -> list[Row]:
    """Every configuration once per round, in turns; each run a fresh process."""
    probes: dict[Setting, list[dict]] = {setting: [] for setting in runs}
    for number in range(rounds):
        for setting in runs:
            result = run_probe(setting, options)
            probes[setting].append(result)
            shown = result.get("error") or f"{result['seconds_per_step']:.3f} s/step, {result['peak_memory_mb']:,.0f} MB"
            log(f"round {number + 1}/{rounds}: {setting.method} {setting.mode} teacher {setting.teacher}: {shown}")
    return add_ratios([summarise(setting, probes[setting]) for setting in runs])


def options_from_config(arguments: argparse.Namespace, device: torch.device) -> tuple[Options, float]:
    """The probes' options (training keys from the config, sizes from the flags) and the EMA decay."""
    from twinflow.train.config import load_config
    from twinflow.train.lora import lora_options

    config = load_config(arguments.config)
    training = config["training"]
    size = SIZES[arguments.size]
    precision = arguments.precision or (config["precision"] if device.type == "cuda" else "fp32")
    checkpointing = training["gradient_checkpointing"] if arguments.checkpointing is None else arguments.checkpointing
    options = Options(
        device=str(device), size=arguments.size, precision=precision,
        gradient_checkpointing=checkpointing,
        lora=training["lora"] or lora_options({}),  # a full-parameter config: the LoRA defaults
        optimizer=training["optimizer"], learning_rate=float(training["learning_rate"]), betas=list(training["betas"]),
        weight_decay=float(training["weight_decay"]), grad_clip=float(training["grad_clip"]),
        batch_size=arguments.batch_size or size.batch_size, latent_size=arguments.latent_size or size.latent_size,
        caption_tokens=size.caption_tokens, steps=arguments.steps, threads=arguments.threads,
    )
    return options, float(training["ema_decay"])


def describe(options: Options, rows: list[Row], device: torch.device) -> tuple[str, str]:
    """``(label, details)``: which device and model size produced the numbers."""
    size = SIZES[options.size]
    parameters = next((row.parameters for row in rows if row.mode == "full" and row.parameters), 0)
    where = "on CPU" if device.type == "cpu" else f"on {torch.cuda.get_device_name(device)}"
    label = f"{size.description[0].upper()}{size.description[1:]} ({parameters / 1e6:,.1f}M parameters) {where}"
    if device.type == "cpu":
        threads = f"{options.threads} torch thread{'s' if options.threads > 1 else ''}"
        label += f", {threads}: relative costs only, not real-model step times"
    lora = options.lora
    details = (
        f"Batch {options.batch_size} of {options.latent_size}x{options.latent_size} latents "
        f"with {options.caption_tokens}-token prompts; "
        f"{options.precision}{' autocast' if options.precision == 'bf16' else ''}, gradient checkpointing "
        f"{'on' if options.gradient_checkpointing else 'off'}, {options.optimizer} (lr {options.learning_rate:g}), "
        f"gradient clipping {options.grad_clip:g}. LoRA: rank {lora['rank']}, alpha {lora['alpha']}, on "
        f"{', '.join(lora['target_modules'])}{', emb_2 trained in full' if lora['train_second_embedding'] else ''}."
    )
    return label, details


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for finetune_cost.md and finetune_cost.json (default: print only)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="training options: checkpointing, LoRA, optimizer, EMA decay")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: tiny on the CPU, medium on CUDA)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: the config's on CUDA, fp32 on the CPU")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="gradient checkpointing (default: the config's training.gradient_checkpointing)")
    parser.add_argument("--batch-size", type=int, help="default: the size's (4)")
    parser.add_argument("--latent-size", type=int, help="latent side (default: the size's)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fastest time, median memory)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    if arguments.probe:
        request = json.loads(arguments.probe)
        _import_everything()
        print(json.dumps(probe(Setting(**request["setting"]), Options(**request["options"]))))
        return 0

    from machine import machine_description
    from twinflow.devices import resolve_device

    device = resolve_device(arguments.device)
    arguments.size = arguments.size or ("tiny" if device.type == "cpu" else "medium")
    if device.type == "cpu" and arguments.size != "tiny":
        raise SystemExit(f"--size {arguments.size} on the CPU would need many GB and hours per step; use --device cuda")
    if min(arguments.steps, arguments.rounds, arguments.threads) < 1:
        raise SystemExit("--steps, --rounds and --threads must be positive")
    options, ema_decay = options_from_config(arguments, device)
    if device.type == "cuda":
        print("CUDA path: written for GPUs but never run on this project's machine (no GPU there).", file=sys.stderr)
    started = time.time()
    rows = measure(options, settings(ema_decay), arguments.rounds, log=lambda line: print(line, file=sys.stderr))
    label, details = describe(options, rows, device)
    torch.set_num_threads(options.threads)  # as the probes ran
    report = {
        "label": label, "details": details, "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.time() - started) / 60, "command": " ".join(["python", *sys.argv]),
        "memory_kind": memory_kind(device),
        "device": str(device), "settings": {**asdict(options), "rounds": arguments.rounds, "config": arguments.config},
        "memory_target": MEMORY_TARGET,
        "rows": [asdict(row) for row in rows],
        "verdicts": [{"mode": mode, "met": met, "measured": measured} for mode, met, measured in verdicts(rows)],
    }
    text = markdown(report)
    print(text)
    if arguments.out:
        out = Path(arguments.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_cost.md").write_text(text)
        (out / "finetune_cost.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'finetune_cost.md'} and {out / 'finetune_cost.json'}", file=sys.stderr)
    return 0


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA allocator peak after the warm-up and timed steps, reset before the model is built"
    return ("peak resident set (VmHWM) minus the resident set before the model is built (torch, diffusers, "
            "PEFT and twinflow imported)")


if __name__ == "__main__":
    sys.exit(main())
