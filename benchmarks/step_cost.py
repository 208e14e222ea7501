"""Cost of one optimizer step per objective preset, on the same model and batch, in one run.

    python benchmarks/step_cost.py [--batch-size 64] [--steps 10] [--config configs/mnist_twinflow.yaml]

Prints a markdown table: seconds per optimizer step, network calls per step (a batched call
counts once), and the ratio to the flow-matching step measured in the same run. The presets
are measured in interleaved rounds so that drift of the machine's speed hits all of them alike.
Target (issue 4): a TwinFlow step costs at most 2.5x a flow-matching step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from twinflow.models import build_model, count_parameters
from twinflow.objective import TwinFlowObjective, objective_config
from twinflow.teacher import EMATeacher
from twinflow.train.config import load_config, model_arguments

PRESETS = ("flow_matching", "rcgm", "twinflow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_twinflow.yaml", help="model architecture comes from here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per preset and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    config = load_config(arguments.config)
    name, model_config = model_arguments(config)
    model_config = {"image_channels": 1, "image_size": 28, "num_classes": 10, **model_config}
    torch.manual_seed(0)
    model = build_model(name, **model_config)
    teacher = EMATeacher(model, float(config["training"]["ema_decay"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(arguments.batch_size, 1, 28, 28, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (arguments.batch_size,), generator=generator)
    null = torch.full_like(labels, 10)

    def step(objective: TwinFlowObjective) -> int:
        result = objective(model, images, labels, null, teacher=teacher.network, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        teacher.update(model)
        return result.network_calls

    def forward_backward() -> None:
        t = torch.rand(arguments.batch_size, generator=generator)
        model(images, t, t, labels).square().mean().backward()

    objectives = {preset: TwinFlowObjective(objective_config(preset)) for preset in PRESETS}
    times: dict[str, list[float]] = {preset: [] for preset in PRESETS}
    times["forward+backward"] = []
    calls = {}
    for preset, objective in objectives.items():  # warm-up
        calls[preset] = step(objective)
    for _ in range(arguments.rounds):
        for preset, objective in objectives.items():
            start = time.perf_counter()
            for _ in range(arguments.steps):
                step(objective)
            times[preset].append((time.perf_counter() - start) / arguments.steps)
        start = time.perf_counter()
        for _ in range(arguments.steps):
            forward_backward()
        times["forward+backward"].append((time.perf_counter() - start) / arguments.steps)

    baseline = statistics.median(times["flow_matching"])
    print(f"\nStep cost, batch {arguments.batch_size}, model {name} {count_parameters(model):,} parameters, "
          f"{arguments.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| what | seconds / step (median of rounds) | network calls / step | ratio to flow matching |")
    print("|---|---|---|---|")
    for key, values in times.items():
        seconds = statistics.median(values)
        print(f"| {key} | {seconds:.3f} | {calls.get(key, 1)} | {seconds / baseline:.2f}x |")
    ratio = statistics.median(times["twinflow"]) / baseline
    verdict = "meets" if ratio <= 2.5 else "misses"
    print(f"\nTwinFlow / flow matching = {ratio:.2f}x ({verdict} the 2.5x target)")


if __name__ == "__main__":
    main()
