"""The training loop: set-up, then one linear loop over optimizer steps.

Reproducibility: every random draw of the loop comes from two explicit sources, the data
order (:class:`~twinflow.data.ShuffledBatches`, seeded) and one ``torch.Generator`` for the
objective's noise and times (one per process in a distributed run). Both are saved in every
checkpoint, so ``resume`` continues exactly where the run stopped: N + N steps give the same
weights as 2N uninterrupted steps. Distributed runs (DDP, FSDP2 under torchrun) go through the
same loop; :mod:`twinflow.train.distributed` holds what differs.

What is trained on what data is not the loop's business either: :mod:`twinflow.train.data`
gives ``(data, condition, null condition)`` batches (labelled images or a latent cache of
text-to-image embeddings), :mod:`twinflow.train.backbone` builds the network (a U-Net, or a
diffusers transformer behind its TwinFlow adapter, optionally with LoRA), and
:func:`twinflow.train.lora.teacher_for` picks the EMA teacher (a copy, or a LoRA adapter).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from twinflow.conditions import Condition
from twinflow.data import BucketBatches, ShuffledBatches
from twinflow.devices import resolve_precision
from twinflow.eval.grid import save_grid
from twinflow.eval.plots import plot_training_curves
from twinflow.models import count_parameters
from twinflow.objective import ObjectiveResult, TwinFlowObjective
from twinflow.objective.partition import stream_position
from twinflow.path import Path as ProbabilityPath
from twinflow.path import get_path
from twinflow.pipeline import ClassConditionalGenerator
from twinflow.teacher import EMATeacher
from twinflow.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from twinflow.train.backbone import build_backbone
from twinflow.train.config import ConfigError, check_world_size, peak_learning_rate, phase_at, phase_objective, phase_start, total_steps
from twinflow.train.data import TrainingData, load_training_data, other_class_labels
from twinflow.train.distributed import (
    DistributedContext,
    clip_gradients,
    gathered_weights,
    gradient_sync,
    objective_seed,
    setup_distributed,
    unwrap,
    wrap_model,
    wrap_teacher,
)
from twinflow.train.lora import load_model_weights, teacher_for
from twinflow.train.resume import check_resumed_config, record_changes, refuse_existing_run
from twinflow.train.logging import MetricsLogger, read_metrics


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainResult:
    run_directory: Path
    steps: int
    final_checkpoint: Path
    grids: dict[str, Path]  # empty on every process but rank 0
    parameters: int
    rank: int = 0  # of this process in a distributed run; rank 0 wrote the logs and grids


def train(
    config: dict, run_directory: str | Path, resume: bool = False, allow_changes: tuple[str, ...] = ()
) -> TrainResult:
    """Train from a validated config (see :func:`twinflow.train.config.load_config`).

    ``resume`` continues the run in ``run_directory`` from its newest checkpoint; ``config`` must
    then be the checkpoint's, except for the keys (or sections) named in ``allow_changes``
    (see :mod:`twinflow.train.resume`). Under ``torchrun`` every process calls this with the same
    arguments; the processes share the work as :mod:`twinflow.train.distributed` describes.
    """
    # Before any process can write (the process group's rendezvous waits for every process's check).
    run_directory = Path(run_directory)
    refuse_existing_run(run_directory, resume)
    changes = check_resumed_config(run_directory, config, allow_changes) if resume else {}
    context = setup_distributed(config["distributed"]["strategy"], config["device"])
    try:
        return _train(config, run_directory, resume, context, changes)
    finally:
        context.close()


@dataclass(frozen=True)
class TrainingRun:
    """What the loop trains, on what, and from where: built once by :func:`_setup`."""

    config: dict
    run_directory: Path
    context: DistributedContext
    precision: str  # fp32 | bf16: the config's precision, ``auto`` resolved for this device
    data: TrainingData
    architecture: dict  # stored in every checkpoint: how to rebuild the network
    parameters: int
    model: nn.Module  # wrapped for the strategy (DDP, FSDP2); unwrap() gives the network
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer
    path: ProbabilityPath
    objectives: list[TwinFlowObjective]  # one per phase
    batches: ShuffledBatches | BucketBatches  # the seeded order of global batches, saved in checkpoints
    generator: torch.Generator  # this process's objective noise and times, saved in checkpoints
    logger: MetricsLogger
    steps: int  # optimizer steps of the whole run
    start_step: int  # 0, or the step of the checkpoint resumed from
    elapsed_before: float  # training seconds of earlier runs of this run directory (resume)
    resumed_from: Path | None  # the checkpoint resumed from


@dataclass
class TrainingClock:
    """The run's training time: this loop's wall time plus earlier runs', less the sampling grids'."""

    elapsed_before: float  # training seconds of earlier runs of this run directory (resume)
    started: float  # time.perf_counter() as the loop starts
    grid_seconds: float = 0.0  # spent sampling grids, which is not training
    timed_steps: int = 0  # optimizer steps of this loop

    def training_seconds(self) -> float:
        """Wall time spent in the loop so far, over all resumes (sampling grids excluded)."""
        return self.elapsed_before + time.perf_counter() - self.started - self.grid_seconds

    def seconds_per_step(self) -> float:
        """This loop's wall time per optimizer step so far (grids included)."""
        return (time.perf_counter() - self.started) / self.timed_steps


@dataclass
class StepOutcome:
    """What one optimizer step leaves for the logs."""

    phase: int
    learning_rate: float
    terms: dict[str, float]  # each term summed with its sample count, and its count ("<term> samples")
    result: ObjectiveResult  # the last micro-batch's: the term names and the network calls
    gradient_norm: Tensor  # before clipping, the same on every process


def _train(config: dict, run_directory: Path, resume: bool, context: DistributedContext, changes: dict) -> TrainResult:
    """Set up, run the optimizer steps left, finish: one process's share of :func:`train`."""
    run = _setup(config, run_directory, resume, context, changes)
    training = config["training"]

    # ---- the loop ------------------------------------------------------------------------
    last_checkpoint = run.resumed_from  # the one a divergence message names
    run.model.train()
    progress = tqdm(
        total=run.steps, initial=run.start_step, disable=not (training["progress"] and context.is_main),
        desc="train", unit="step",
    )
    clock = TrainingClock(run.elapsed_before, started=time.perf_counter())
    for step in range(run.start_step, run.steps):
        outcome = _optimizer_step(run, step, last_checkpoint)
        done = step + 1
        clock.timed_steps += 1

        # ---- bookkeeping: logs, checkpoints, grids -----------------------------------------
        progress.update(1)
        if done % training["log_every"] == 0 or done == run.steps:
            terms = _log_step(run, done, outcome, clock)
            progress.set_postfix(loss=f"{terms['loss']:.4f}", phase=outcome.phase)
        if training["checkpoint_every"] and done % training["checkpoint_every"] == 0 and done != run.steps:
            last_checkpoint = _make_checkpoint(run, done, clock)
        if training["sample_every"] and done % training["sample_every"] == 0 and done != run.steps:
            grid_started = time.perf_counter()
            _save_grids(run, done)
            clock.grid_seconds += time.perf_counter() - grid_started
    progress.close()
    return _finish(run, last_checkpoint, clock)


def _setup(config: dict, run_directory: Path, resume: bool, context: DistributedContext, changes: dict) -> TrainingRun:
    """Data, model, teacher, optimizer, objectives and random sources, then the start: a resumed
    checkpoint's state, or a fresh run directory. Rank 0 writes config.yaml (and the changes)."""
    training = config["training"]
    device, strategy = context.device, context.strategy
    check_world_size(config, context.world_size)
    say = print if context.is_main else _silent
    precision = resolve_precision(config["precision"], device)
    if config["precision"] == "auto":
        say(f"precision auto: {'bf16 autocast (this device computes bfloat16 natively)' if precision == 'bf16' else 'fp32'}")
    torch.manual_seed(config["seed"])  # weight initialisation only (the same on every process)

    # ---- data, model, optimizer, teacher -------------------------------------------------
    data = load_training_data(config["data"])
    model, architecture = build_backbone(config, data)
    model = model.to(device)
    parameters = count_parameters(model)
    if training["init_from"] and not resume:
        stored = load_checkpoint(training["init_from"], map_location=device, full=False)
        load_model_weights(model, stored.model)
        say(f"initialised the model from {training['init_from']} (step {stored.step})")
    # The teacher copies the plain model, then follows its sharding; the optimizer comes after
    # the wrapping because FSDP replaces the parameters by sharded ones.
    teacher = wrap_teacher(teacher_for(model, float(training["ema_decay"])), strategy, precision, device)
    model = wrap_model(model, strategy, precision, device, config["distributed"]["find_unused_parameters"])
    optimizer_class = torch.optim.AdamW if training["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(
        [parameter for parameter in model.parameters() if parameter.requires_grad],  # LoRA: the adapter only
        lr=float(training["learning_rate"]), betas=tuple(training["betas"]), weight_decay=float(training["weight_decay"]),
    )
    path = get_path("linear")
    objectives = [TwinFlowObjective(phase_objective(phase, f"phases.{n}"), path) for n, phase in enumerate(config["phases"])]
    # Global batches in one seeded order on every process; each takes its slice (local_slice).
    # A bucketed latent cache gives batches of one latent shape at a time.
    batches = data.batch_order(training["batch_size"], config["seed"])
    # Objective noise and times: one stream per process (rank 0's is the one-process stream).
    generator = torch.Generator().manual_seed(objective_seed(config["seed"], context.rank))

    # ---- start: resume or fresh -----------------------------------------------------------
    start_step, elapsed_before, resumed_from = 0, 0.0, None
    logger = MetricsLogger(run_directory, tensorboard=training["tensorboard"], enabled=context.is_main)
    if resume:
        start_step, state = load_training_checkpoint(context, run_directory, model, teacher, optimizer, generator)
        batches.load_state_dict(state["data_order"])
        elapsed_before = float(state.get("training_seconds", 0.0))
        logger.truncate_after(start_step)
        resumed_from = list_checkpoints(run_directory)[-1]
        say(f"resumed from {resumed_from} at step {start_step}")
    if context.is_main:
        run_directory.mkdir(parents=True, exist_ok=True)
        record_changes(run_directory, start_step, changes, say)
        (run_directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if context.enabled:
        share = training["batch_size"] // context.world_size
        say(f"{strategy}: {context.world_size} processes, {share} sample{'s' if share != 1 else ''} each per micro-step")
    return TrainingRun(
        config, run_directory, context, precision, data, architecture, parameters, model, teacher, optimizer, path, objectives,
        batches, generator, logger, total_steps(config), start_step, elapsed_before, resumed_from,
    )


def _optimizer_step(run: TrainingRun, step: int, last_checkpoint: Path | None) -> StepOutcome:
    """Optimizer step ``step`` (from 0): its phase's objective over the accumulated micro-batches,
    clipping, the update and the teacher's EMA. Raises :class:`TrainingDiverged`, naming
    ``last_checkpoint``, when the loss or the gradient norm is not finite."""
    config, context, model = run.config, run.context, run.model
    training = config["training"]
    phase = phase_at(config, step)
    objective = run.objectives[phase]
    peak = peak_learning_rate(config, phase)  # what a divergence message tells the user to lower
    learning_rate = learning_rate_at(config, step)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate

    # Gradient accumulation: one optimizer step = grad_accumulation micro-batches; the
    # processes synchronise their gradients on the last one.
    # Which objective slices a micro-batch holds follows its place in the run's sample
    # stream, so per-process batches smaller than the four slices rotate them (spec 2.1).
    accumulation = training["grad_accumulation"]
    terms: dict[str, float] = {}
    for micro in range(accumulation):
        images, condition, null_condition = run.data.batch(context.local_slice(run.batches.next_indices()), context.device)
        if training["unconditional_label"] == "other_class":  # class labels (the config checks)
            null_condition = other_class_labels(condition, run.data.num_classes, run.generator)
        position = stream_position(step, micro, accumulation, context.rank, context.world_size, images.shape[0])
        with gradient_sync(model, micro == accumulation - 1), _unused_parameters_named(context.strategy):
            result = objective_loss(
                objective, model, run.teacher.network, images, condition, null_condition, run.generator,
                run.precision, position,
            )
            if not context.all_true(torch.isfinite(result.loss)):
                loss = context.mean({"loss": float(result.loss.detach())})["loss"]
                raise TrainingDiverged(_diverged_message("loss", loss, step + 1, last_checkpoint, peak))
            (result.loss / accumulation).backward()
        # Each term summed with its sample count: a micro-batch without a slice adds nothing.
        samples = result.term_samples()
        for key, value in result.terms().items():
            terms[key] = terms.get(key, 0.0) + value * samples[key]
            terms[f"{key} samples"] = terms.get(f"{key} samples", 0.0) + samples[key]

    clip = float(training["grad_clip"])
    gradient_norm = clip_gradients(model, clip if clip > 0 else math.inf)  # the same on every process
    if not torch.isfinite(gradient_norm):
        raise TrainingDiverged(_diverged_message("gradient norm", float(gradient_norm), step + 1, last_checkpoint, peak))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.teacher.update(unwrap(model))
    return StepOutcome(phase, learning_rate, terms, result, gradient_norm)


def _log_step(run: TrainingRun, done: int, outcome: StepOutcome, clock: TrainingClock) -> dict[str, float]:
    """Log the step's terms, each its mean over its samples on every process; returns those means."""
    totals = run.context.mean(outcome.terms)  # a collective: every process logs at the same steps
    terms = {key: totals[key] / max(totals[f"{key} samples"], 1e-12) for key in outcome.result.terms()}
    seconds = clock.seconds_per_step()
    run.logger.log(done, {
        **terms, "phase": outcome.phase, "learning_rate": outcome.learning_rate,
        "gradient_norm": float(outcome.gradient_norm), "network_calls": outcome.result.network_calls,
        "seconds_per_step": seconds, "training_seconds": clock.training_seconds(),
    })
    return terms


def _make_checkpoint(run: TrainingRun, step: int, clock: TrainingClock) -> Path:
    """Save the training state at ``step`` (every process joins); returns the checkpoint folder."""
    state = {
        "training_seconds": clock.training_seconds(),
        "architecture": run.architecture,
        "config": run.config,
        "path": "linear",
        "teacher": run.teacher.state_dict(),
        "data_order": run.batches.state_dict(),
        "dataset": run.data.description(),
    }
    return save_training_checkpoint(
        run.context, run.run_directory, step, run.model, run.teacher, run.optimizer, run.generator, state,
        keep_last=run.config["training"]["keep_checkpoints"], consolidate=run.config["distributed"]["consolidate"],
    )


def _save_grids(run: TrainingRun, step: int, final: bool = False) -> dict[str, Path]:
    """One class grid per sampling preset at ``step``; the written files on rank 0, else empty."""
    # Rank 0 samples and writes; under FSDP every process joins the (collective) forwards.
    # Grids are class grids: text-to-image runs are sampled with `twinflow generate` instead.
    data, context = run.data, run.context
    if not data.class_conditional or not (context.is_main or context.strategy == "fsdp"):
        return {}
    sampling = run.config["sampling"]
    network = run.teacher.network if sampling["use_ema"] else unwrap(run.model)
    was_training = network.training
    generator_model = ClassConditionalGenerator(
        network, data.num_classes, data.image_shape, data.class_names, run.path, context.device, run.precision
    )
    grids = {}
    with gathered_weights(network):
        for preset in sampling["presets"]:
            samples = generator_model.sample(per_class=sampling["per_class"], preset=preset, seed=sampling["seed"])
            name = f"samples_{preset}.png" if final else f"samples/step_{step:07d}_{preset}.png"
            if context.is_main:
                grids[preset] = save_grid(samples.images, run.run_directory / name, rows=data.num_classes)
    network.train(was_training)
    return grids


def _finish(run: TrainingRun, last_checkpoint: Path | None, clock: TrainingClock) -> TrainResult:
    """The final checkpoint (a resumed run with nothing left to train keeps its newest one), the final
    grids, the training curves and summary.json; every process returns once rank 0 wrote them."""
    context, run_directory, steps = run.context, run.run_directory, run.steps
    final_checkpoint = (
        _make_checkpoint(run, steps, clock) if run.start_step < steps or last_checkpoint is None else last_checkpoint
    )
    grids = _save_grids(run, steps, final=True)
    run.logger.close()
    if context.is_main:
        plot_training_curves(read_metrics(run_directory), run_directory / "training_curves.png")
        summary = {"steps": steps, "parameters": run.parameters, "final_checkpoint": str(final_checkpoint),
                   "grids": {k: str(v) for k, v in grids.items()}}
        (run_directory / "summary.json").write_text(json.dumps(summary, indent=2))
    context.barrier()  # every process returns once rank 0's files are written
    return TrainResult(run_directory, steps, final_checkpoint, grids, run.parameters, context.rank)


def objective_loss(
    objective: TwinFlowObjective,
    model: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    condition: Condition,
    null_condition: Condition | int,
    generator: torch.Generator,
    precision: str = "fp32",
    stream_position: int = 0,
) -> ObjectiveResult:
    """One micro-batch through the objective, under bf16 autocast when asked.

    ``null_condition`` is the batch's null condition, or an int: the null class of class labels.
    ``stream_position``: the micro-batch's first sample in the run's sample stream
    (:func:`twinflow.objective.partition.stream_position`), which decides its slices.

    FSDP-sharded networks are gathered for the whole objective (every process enters together;
    the objective's number of calls may then differ between processes): see
    :func:`twinflow.train.distributed.gathered_weights`.
    """
    with gathered_weights(model, teacher), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if isinstance(null_condition, int):
            null_condition = torch.full_like(condition, null_condition)
        return objective(
            model, images, condition, null_condition, teacher=teacher, generator=generator, stream_position=stream_position
        )


def learning_rate_at(config: dict, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Within each phase a half cosine from the phase's ``learning_rate`` (default
    ``training.learning_rate``) at its first step down to its ``final_learning_rate`` at its last
    (constant when that is unset); the first ``training.warmup_steps`` of the run scale it by a
    linear warm-up. Why decay: a short run's last weights still carry the noise of a large step,
    and sampled images show it (issue 18 measured it on the MNIST demo).
    """
    phase = phase_at(config, step)
    settings = config["phases"][phase]
    peak = peak_learning_rate(config, phase)
    final = float(settings.get("final_learning_rate", peak))
    progress = (step - phase_start(config, phase)) / max(settings["steps"] - 1, 1)
    learning_rate = final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))
    warmup_steps = config["training"]["warmup_steps"]
    if warmup_steps and step < warmup_steps:
        learning_rate *= (step + 1) / warmup_steps
    return learning_rate


@contextlib.contextmanager
def _unused_parameters_named(strategy: str) -> Iterator[None]:
    """DDP's error for parameters that got no gradient, as one line that says what to set."""
    try:
        yield
    except RuntimeError as error:
        if strategy != "ddp" or "find_unused_parameters" not in str(error):
            raise
        raise ConfigError(
            "DDP: some trainable parameters received no gradient in the previous step (their outputs "
            "do not reach the loss); set distributed.find_unused_parameters: true, or freeze them "
            "(training.lora.target_modules without them)"
        ) from None


def _silent(*args, **kwargs) -> None:
    """``print`` of the processes other than rank 0."""


def _diverged_message(what: str, value: float, step: int, checkpoint: Path | None, learning_rate: float) -> str:
    """What diverged and where, which checkpoint is left and what to change before resuming it:
    the newest checkpoint is only the last one written before the failure (finite, not
    necessarily healthy), so resuming it unchanged may diverge again."""
    lower = f"{learning_rate / 10:g}"
    if checkpoint is None:
        return (f"training diverged: the {what} is {value} at step {step}; no checkpoint was saved yet. "
                f"Start again with a lower training.learning_rate (it was {learning_rate:g}; e.g. {lower}) "
                "and training.grad_clip on.")
    return (
        f"training diverged: the {what} is {value} at step {step}; the newest checkpoint, {checkpoint}, is the last "
        "one written before it (finite weights, possibly already unstable). Resume it with a lower learning rate "
        f"(it was {learning_rate:g}): --resume --set training.learning_rate={lower}, training.grad_clip on; "
        "if it diverges again, go back to an earlier checkpoint or start again."
    )
