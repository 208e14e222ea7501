"""The training loop: set-up, then one linear loop over optimizer steps.

Reproducibility: every random draw of the loop comes from two explicit sources, the data
order (:class:`~twinflow.data.ShuffledBatches`, seeded) and one ``torch.Generator`` for the
objective's noise and times. Both are saved in every checkpoint, so ``resume`` continues
exactly where the run stopped: N + N steps give the same weights as 2N uninterrupted steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from twinflow.data import DataConfig, ShuffledBatches, load_dataset
from twinflow.eval.grid import save_grid
from twinflow.eval.plots import plot_training_curves
from twinflow.models import build_model, count_parameters
from twinflow.objective import TwinFlowObjective
from twinflow.path import get_path
from twinflow.pipeline import ClassConditionalGenerator, resolve_device
from twinflow.teacher import EMATeacher
from twinflow.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from twinflow.train.config import model_arguments, phase_at, phase_objective, total_steps
from twinflow.train.logging import MetricsLogger, read_metrics


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainResult:
    run_directory: Path
    steps: int
    final_checkpoint: Path
    grids: dict[str, Path]
    parameters: int


def train(config: dict, run_directory: str | Path, resume: bool = False) -> TrainResult:
    """Train from a validated config (see :func:`twinflow.train.config.load_config`)."""
    run_directory = Path(run_directory)
    training = config["training"]
    device = resolve_device(config["device"])
    torch.manual_seed(config["seed"])  # weight initialisation only

    # ---- data, model, optimizer, teacher -------------------------------------------------
    dataset = load_dataset(DataConfig(**config["data"]))
    name, model_config = model_arguments(config)
    channels, height, width = dataset.image_shape
    if height != width:
        raise ValueError(f"the backbone needs square images, the data set has {height}x{width}")
    # The data decides the image geometry and the class count unless the config fixes them.
    model_config = {"image_channels": channels, "image_size": height, "num_classes": dataset.num_classes, **model_config}
    model = build_model(name, **model_config).to(device)
    architecture = {"name": name, "config": model.config.to_dict()}
    optimizer_class = torch.optim.AdamW if training["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(
        model.parameters(), lr=float(training["learning_rate"]), betas=tuple(training["betas"]),
        weight_decay=float(training["weight_decay"]),
    )
    teacher = EMATeacher(model, float(training["ema_decay"]))
    path = get_path("linear")
    objectives = [TwinFlowObjective(phase_objective(phase, f"phases.{n}"), path) for n, phase in enumerate(config["phases"])]
    batches = ShuffledBatches(len(dataset), training["batch_size"], seed=config["seed"])
    generator = torch.Generator().manual_seed(config["seed"] + 1)  # objective noise and times
    steps = total_steps(config)

    # ---- start: resume, initialise from another run, or fresh ----------------------------
    start_step = 0
    elapsed_before = 0.0  # training seconds of earlier runs of this run directory (resume)
    logger = MetricsLogger(run_directory, tensorboard=training["tensorboard"])
    if resume:
        stored = load_checkpoint(run_directory, map_location=device)
        model.load_state_dict(stored.model)
        if teacher.is_copy:
            if stored.ema is None:
                raise ValueError(f"checkpoint in {run_directory} has no EMA weights but training.ema_decay > 0")
            teacher.network.load_state_dict(stored.ema)
        teacher.load_state_dict(stored.state["teacher"])
        optimizer.load_state_dict(stored.optimizer)
        batches.load_state_dict(stored.state["data_order"])
        generator.set_state(stored.random["objective_generator"])
        start_step = stored.step
        elapsed_before = float(stored.state.get("training_seconds", 0.0))
        logger.truncate_after(start_step)
        print(f"resumed from {list_checkpoints(run_directory)[-1]} at step {start_step}")
    elif training["init_from"]:
        stored = load_checkpoint(training["init_from"], map_location=device, full=False)
        model.load_state_dict(stored.model)
        if teacher.is_copy:
            teacher.network.load_state_dict(model.state_dict())
        print(f"initialised the model from {training['init_from']} (step {stored.step})")
    run_directory.mkdir(parents=True, exist_ok=True)
    (run_directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    parameters = count_parameters(model)

    def training_seconds() -> float:
        """Wall time spent in the loop so far, over all resumes (sampling grids excluded)."""
        return elapsed_before + time.perf_counter() - started - grid_seconds

    def make_checkpoint(step: int) -> Path:
        state = {
            "training_seconds": training_seconds(),
            "architecture": architecture,
            "config": config,
            "path": "linear",
            "teacher": teacher.state_dict(),
            "data_order": batches.state_dict(),
            "dataset": {"class_names": dataset.class_names, "image_shape": list(dataset.image_shape)},
        }
        return save_checkpoint(
            run_directory,
            Checkpoint(
                step=step, model=model.state_dict(), state=state,
                ema=teacher.network.state_dict() if teacher.is_copy else None,
                optimizer=optimizer.state_dict(), random={"objective_generator": generator.get_state()},
            ),
            keep_last=training["keep_checkpoints"],
        )

    def save_grids(step: int, final: bool = False) -> dict[str, Path]:
        sampling = config["sampling"]
        network = teacher.network if sampling["use_ema"] else model
        was_training = network.training
        generator_model = ClassConditionalGenerator(
            network, dataset.num_classes, dataset.image_shape, dataset.class_names, path, device, config["precision"]
        )
        grids = {}
        for preset in sampling["presets"]:
            samples = generator_model.sample(per_class=sampling["per_class"], preset=preset, seed=sampling["seed"])
            name = f"samples_{preset}.png" if final else f"samples/step_{step:07d}_{preset}.png"
            grids[preset] = save_grid(samples.images, run_directory / name, rows=dataset.num_classes)
        network.train(was_training)
        return grids

    # ---- the loop ------------------------------------------------------------------------
    null_label = dataset.num_classes
    last_checkpoint: Path | None = list_checkpoints(run_directory)[-1] if resume else None
    model.train()
    progress = tqdm(total=steps, initial=start_step, disable=not training["progress"], desc="train", unit="step")
    started, timed_steps, grid_seconds = time.perf_counter(), 0, 0.0
    for step in range(start_step, steps):
        phase = phase_at(config, step)
        objective = objectives[phase]
        peak = config["phases"][phase].get("learning_rate", training["learning_rate"])
        learning_rate = learning_rate_at(step, float(peak), training["warmup_steps"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        # Gradient accumulation: one optimizer step = grad_accumulation micro-batches.
        terms: dict[str, float] = {}
        for _ in range(training["grad_accumulation"]):
            images, labels = dataset[batches.next_indices()]
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16"):
                result = objective(
                    model, images, labels, torch.full_like(labels, null_label),
                    teacher=teacher.network, generator=generator,
                )
            if not torch.isfinite(result.loss):
                raise TrainingDiverged(_diverged_message("loss", float(result.loss.detach()), step + 1, last_checkpoint))
            (result.loss / training["grad_accumulation"]).backward()
            for key, value in result.terms().items():
                terms[key] = terms.get(key, 0.0) + value / training["grad_accumulation"]

        clip = float(training["grad_clip"])
        gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
        if not torch.isfinite(gradient_norm):
            raise TrainingDiverged(_diverged_message("gradient norm", float(gradient_norm), step + 1, last_checkpoint))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(model)
        done = step + 1
        timed_steps += 1

        # ---- bookkeeping: logs, checkpoints, grids -----------------------------------------
        progress.update(1)
        if done % training["log_every"] == 0 or done == steps:
            seconds = (time.perf_counter() - started) / timed_steps
            logger.log(done, {
                **terms, "phase": phase, "learning_rate": learning_rate, "gradient_norm": float(gradient_norm),
                "network_calls": result.network_calls, "seconds_per_step": seconds,
                "training_seconds": training_seconds(),
            })
            progress.set_postfix(loss=f"{terms['loss']:.4f}", phase=phase)
        if training["checkpoint_every"] and done % training["checkpoint_every"] == 0 and done != steps:
            last_checkpoint = make_checkpoint(done)
        if training["sample_every"] and done % training["sample_every"] == 0 and done != steps:
            grid_started = time.perf_counter()
            save_grids(done)
            grid_seconds += time.perf_counter() - grid_started
    progress.close()

    final_checkpoint = make_checkpoint(steps) if start_step < steps or last_checkpoint is None else last_checkpoint
    grids = save_grids(steps, final=True)
    logger.close()
    plot_training_curves(read_metrics(run_directory), run_directory / "training_curves.png")
    summary = {"steps": steps, "parameters": parameters, "final_checkpoint": str(final_checkpoint),
               "grids": {k: str(v) for k, v in grids.items()}}
    (run_directory / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(run_directory, steps, final_checkpoint, grids, parameters)


def learning_rate_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then constant."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak


def _diverged_message(what: str, value: float, step: int, checkpoint: Path | None) -> str:
    where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
    return (
        f"training diverged: the {what} is {value} at step {step}; {where}. "
        "Lower training.learning_rate, keep training.grad_clip on, or resume from that checkpoint."
    )
