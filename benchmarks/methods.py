"""Method comparison: TwinFlow, RCGM and flow matching trained for the same wall-clock budget.

How the budget is shared (why): all three methods start from one flow-matching warm start
(spec section 7: TwinFlow is meant to start from a flow-matching model), trained once and
copied, so they differ only in what they do with the rest of the budget. The budget is turned
into optimizer steps with the seconds per step measured at the start of the same benchmark run
(:mod:`costs`), so a busy machine changes the measured times, not the amount of training each
method gets; the report shows the budgeted and the measured seconds side by side.

Each method's phase is trained in ``chunks`` resumed pieces so that its quality can be plotted
against training time (a resumed run continues exactly, see the training loop's tests).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twinflow.eval.evaluate import evaluate_checkpoint
from twinflow.train import load_config, train
from twinflow.train.checkpoint import list_checkpoints, read_state

METHODS = ("twinflow", "rcgm", "flow_matching")
WARM_START = "warm_start"

# What each method is sampled with. A flow-matching model only ever saw r = t, so its few-step
# samples are plain Euler steps of the ODE ("multi" with fewer steps), not the r = 0 jumps of "1nfe".
FINAL_SPECS = {
    "twinflow": ("1nfe", "2nfe", "4nfe"),
    "rcgm": ("1nfe", "2nfe", "4nfe"),
    "flow_matching": ("multi:steps=1", "multi:steps=2", "multi:steps=4", "multi:steps=50"),
}
CURVE_SPECS = {  # evaluated at every intermediate checkpoint, for the quality-against-time plot
    "twinflow": ("1nfe",),
    "rcgm": ("1nfe",),
    "flow_matching": ("multi:steps=1", "multi:steps=50"),
}
WARM_START_SPECS = ("1nfe", "multi:steps=1", "multi:steps=50")


@dataclass
class MethodPlan:
    """Steps of one method: the shared warm start, then ``method_steps`` of its own objective."""

    method: str
    warm_start_steps: int
    method_steps: int
    seconds_per_step: float  # of the method's objective, measured in this run
    budget_seconds: float


def plan_methods(
    budget_seconds: float, seconds_per_step: dict[str, float], warm_start_fraction: float = 0.3
) -> dict[str, MethodPlan]:
    """Steps that spend ``budget_seconds`` per method at the measured cost of each objective.

    ``seconds_per_step`` maps objective presets (``flow_matching`` included: the warm start)
    to seconds per optimizer step. The warm start takes ``warm_start_fraction`` of the budget.
    """
    if budget_seconds <= 0 or not 0 <= warm_start_fraction < 1:
        raise ValueError(f"need budget_seconds > 0 and 0 <= warm_start_fraction < 1, got {budget_seconds}, {warm_start_fraction}")
    missing = [name for name in (*METHODS,) if name not in seconds_per_step]
    if missing:
        raise ValueError(f"no measured seconds per step for {missing}")
    warm_start_steps = max(1, round(warm_start_fraction * budget_seconds / seconds_per_step["flow_matching"]))
    remaining = budget_seconds - warm_start_steps * seconds_per_step["flow_matching"]
    return {
        method: MethodPlan(
            method, warm_start_steps, max(1, round(remaining / seconds_per_step[method])),
            seconds_per_step[method], budget_seconds,
        )
        for method in METHODS
    }


@dataclass
class CheckpointScores:
    """Scores of one checkpoint of one method (rows as ``PresetScores.to_dict()``)."""

    method: str
    step: int
    training_seconds: float
    rows: list[dict] = field(default_factory=list)

    def row(self, spec: str) -> dict | None:
        return next((row for row in self.rows if row["preset"] == spec), None)


def recipe(config_path: str, phases: list[dict], batch_size: int) -> dict:
    """The benchmark's training config: ``config_path`` with its phases replaced, quiet and cheap.

    It trains as :mod:`costs` times a step, so that the budget plan holds: at ``batch_size`` and
    in float32 (the demo file's ``precision: auto`` would compute in bf16 on a CPU with native
    bf16, at other costs per step; float32 also gives the same comparison on every CPU).
    """
    overrides = [
        f"training.batch_size={batch_size}", "precision=fp32",
        "training.checkpoint_every=0", "training.sample_every=0", "training.keep_checkpoints=1000",
        "training.tensorboard=false", "sampling.presets=[1nfe]", "sampling.per_class=10",
    ]
    config = load_config(config_path, overrides)
    config["phases"] = copy.deepcopy(phases)
    return config


def _phase(config: dict, index: int, preset: str, steps: int) -> dict:
    """Phase ``index`` of the recipe file (its learning rate) with another preset and length."""
    source = config["phases"][min(index, len(config["phases"]) - 1)]
    phase = {"steps": steps, "objective": {"preset": preset}}
    if "learning_rate" in source:
        phase["learning_rate"] = source["learning_rate"]
    return phase


def train_methods(
    plans: dict[str, MethodPlan], config_path: str, out: Path, batch_size: int, chunks: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, list[Path]]:
    """Train the warm start once, then each method from a copy of it; checkpoints per method.
    ``batch_size`` is the batch the step costs were measured with."""
    base = load_config(config_path)
    warm_steps = next(iter(plans.values())).warm_start_steps
    warm_phase = _phase(base, 0, "flow_matching", warm_steps)
    warm_directory = out / WARM_START
    log(f"warm start: {warm_steps} flow-matching steps")
    train(recipe(config_path, [warm_phase], batch_size), warm_directory)
    checkpoints = {}
    for method, plan in plans.items():
        directory = out / method
        if directory.exists():
            shutil.rmtree(directory)
        shutil.copytree(warm_directory, directory)
        folders = []
        for chunk in range(1, chunks + 1):
            steps = max(1, round(plan.method_steps * chunk / chunks))
            log(f"{method}: training to {steps}/{plan.method_steps} steps of its own objective")
            # Each chunk extends the method's phase: an allowed change of the resumed config.
            result = train(recipe(config_path, [warm_phase, _phase(base, 1, method, steps)], batch_size), directory, resume=True,
                           allow_changes=("phases.1",))
            folders.append(result.final_checkpoint)
        checkpoints[method] = folders
    checkpoints[WARM_START] = [list_checkpoints(warm_directory)[-1]]
    return checkpoints


def evaluate_methods(
    checkpoints: dict[str, list[Path]], num: int, classifier, device: str = "cpu", log: Callable[[str], None] = print,
) -> tuple[list[CheckpointScores], dict]:
    """Score every checkpoint (intermediate ones with the curve specs only); also the real-data row."""
    results, real = [], None
    for method, folders in checkpoints.items():
        for index, folder in enumerate(folders):
            if method == WARM_START:
                specs = WARM_START_SPECS
            else:
                specs = FINAL_SPECS[method] if index == len(folders) - 1 else CURVE_SPECS[method]
            log(f"evaluating {method} {folder.name}: {', '.join(specs)}")
            report = evaluate_checkpoint(folder, presets=specs, num=num, classifier=classifier, device=device)
            _, state = read_state(folder)
            results.append(CheckpointScores(method, report.step, float(state.get("training_seconds", 0.0)),
                                            [row.to_dict() for row in report.presets]))
            real = report.real_data.to_dict() if report.real_data is not None else real
    return results, real
