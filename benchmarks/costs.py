"""Training and sampling cost of the MNIST backbone, each measured against a baseline in the same run.

* Training cost: seconds per optimizer step and network calls per step of each objective preset
  on the same model and batch (presets timed in interleaved rounds, so drift of the machine's
  speed hits all of them alike), and peak memory, each as a ratio to flow matching. Peak memory
  is measured in a fresh process per preset (``--memory-probe``): on CUDA the allocator's peak,
  on the CPU the growth of the process's peak resident set over its set-up (model, optimizer,
  batch), i.e. what the training step itself adds.
* Sampling cost: images per second at 1 NFE and at 50 NFE, and the sampler's overhead over bare
  forward passes of the same network on the same batch (``NFE x forward``).

Run through ``benchmarks/report.py`` (float32, as its method comparison trains); alone:
``python benchmarks/costs.py [--precision bf16]`` prints both tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from machine import call_seconds, synchronise  # noqa: F401  (synchronise: for the other benchmarks)

from twinflow.models import build_model
from twinflow.objective import TwinFlowObjective, objective_config
from twinflow.sampler import sample, sampler_from_spec
from twinflow.teacher import EMATeacher
from twinflow.train.config import load_config, model_arguments

PRESETS = ("flow_matching", "rcgm", "twinflow")
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


@dataclass
class StepCost:
    objective: str
    seconds_per_step: float
    network_calls: int
    peak_memory_mb: float | None = None
    memory_kind: str = ""


@dataclass
class SamplingCost:
    sampler: str
    network_calls: int
    batch_size: int
    sampler_seconds: float
    forward_seconds: float  # network_calls bare forward passes on the same batch

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.sampler_seconds

    @property
    def overhead(self) -> float:
        """Sampler time over bare forward time, minus one (0.05 = 5 % overhead)."""
        return self.sampler_seconds / self.forward_seconds - 1.0


def build_backbone(config_path: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The benchmark's network: the architecture of ``config_path`` for 28x28 digits."""
    name, model_config = model_arguments(load_config(config_path))
    torch.manual_seed(seed)
    model_config = {"image_channels": 1, "image_size": 28, "num_classes": NUM_CLASSES, **model_config}
    return build_model(name, **model_config).to(device)


class _Stepper:
    """One optimizer step of an objective on a fixed random batch (what a training step costs)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, device: torch.device, ema_decay: float = 0.99,
                 precision: str = "fp32"):
        self.model = model
        self.precision = precision
        self.teacher = EMATeacher(model, ema_decay)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.generator = torch.Generator(device).manual_seed(0)
        self.images = torch.rand(batch_size, *IMAGE_SHAPE, generator=self.generator, device=device) * 2 - 1
        self.labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=self.generator, device=device)
        self.null = torch.full_like(self.labels, NUM_CLASSES)

    def step(self, objective: TwinFlowObjective) -> int:
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            result = objective(self.model, self.images, self.labels, self.null, teacher=self.teacher.network, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        self.teacher.update(self.model)
        return result.network_calls


WARM_UP_STEPS = 30


def measure_step_costs(
    config_path: str, batch_size: int = 64, steps: int = 5, rounds: int = 3, device: torch.device = torch.device("cpu"),
    warm_up: int = WARM_UP_STEPS, precision: str = "fp32",
) -> dict[str, StepCost]:
    """Seconds per optimizer step of each preset in a long run: the fastest of interleaved rounds.

    The minimum, not the median: other work on the machine only ever adds time, so the fastest
    round is the best estimate of the step's own cost (and the budget plan depends on it).
    Each preset first runs ``warm_up`` untimed steps. The CPU's convolution library builds its
    kernels once per input shape (about 15 ms per new batch size for this U-Net on an Intel
    Xeon), and the RCGM target's teacher calls take the long jumps, a random subset of the
    batch (33 to 45 of 64 samples, the common sizes all seen within 30 steps), so a short
    warm-up would time kernel builds that a training run of thousands of steps pays once.
    """
    stepper = _Stepper(build_backbone(config_path, device), batch_size, device, precision=precision)
    objectives = {preset: TwinFlowObjective(objective_config(preset)) for preset in PRESETS}
    calls = {}
    for preset, objective in objectives.items():
        for _ in range(max(1, warm_up)):
            calls[preset] = stepper.step(objective)
    times: dict[str, list[float]] = {preset: [] for preset in PRESETS}
    for _ in range(rounds):
        for preset, objective in objectives.items():
            synchronise(device)
            start = time.perf_counter()
            for _ in range(steps):
                stepper.step(objective)
            synchronise(device)
            times[preset].append((time.perf_counter() - start) / steps)
    return {preset: StepCost(preset, min(times[preset]), calls[preset]) for preset in PRESETS}


def peak_memory_mb(config_path: str, preset: str, batch_size: int, device: str, precision: str = "fp32") -> tuple[float, str]:
    """Peak memory of training steps of ``preset``, measured in a fresh Python process."""
    command = [sys.executable, __file__, "--memory-probe", preset, "--config", config_path,
               "--batch-size", str(batch_size), "--device", device, "--precision", precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    probe = json.loads(output.strip().splitlines()[-1])
    return probe["peak_mb"], probe["kind"]


def _memory_probe(config_path: str, preset: str, batch_size: int, device: torch.device, steps: int = 3,
                  precision: str = "fp32") -> dict:
    stepper = _Stepper(build_backbone(config_path, device), batch_size, device, precision=precision)
    objective = TwinFlowObjective(objective_config(preset))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            stepper.step(objective)
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "CUDA allocator peak"}
    before = peak_resident_kib()
    for _ in range(steps):
        stepper.step(objective)
    return {"peak_mb": (peak_resident_kib() - before) / 1024, "kind": "peak RSS growth over set-up"}


def peak_resident_kib() -> int:
    """This process's peak resident set. ``VmHWM`` first: ``ru_maxrss`` survives ``exec`` on Linux,
    so a child started by a big parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def training_costs(
    config_path: str, batch_size: int = 64, steps: int = 4, rounds: int = 5, device: str = "cpu", precision: str = "fp32",
) -> dict[str, StepCost]:
    """Step cost and peak memory of each preset; ``precision: bf16`` runs the objective under bf16
    autocast as the training loop does (each preset's own ``target_precision``)."""
    costs = measure_step_costs(config_path, batch_size, steps, rounds, torch.device(device), precision=precision)
    for preset, cost in costs.items():
        cost.peak_memory_mb, cost.memory_kind = peak_memory_mb(config_path, preset, batch_size, device, precision)
    return costs


def _fastest_seconds(function, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls (warm up before calling this): other work only adds time."""
    return min(call_seconds(function, repeats, device))


@torch.no_grad()
def sampling_costs(
    model: torch.nn.Module, specs: tuple[str, ...] = ("1nfe", "multi:steps=50"), batch_size: int = 500,
    repeats: int = 9, device: torch.device = torch.device("cpu"),
) -> list[SamplingCost]:
    """Sampler time against ``NFE`` bare forward passes of ``model`` on the same batch (fastest of rounds)."""
    model = model.eval()
    generator = torch.Generator(device)
    noise = torch.randn(batch_size, *IMAGE_SHAPE, generator=generator.manual_seed(0), device=device)
    labels = torch.arange(batch_size, device=device) % NUM_CLASSES
    time_one = torch.ones(batch_size, device=device)
    model(noise, time_one, time_one * 0.5, labels)  # warm-up
    results = []
    for spec in specs:
        config = sampler_from_spec(spec)
        calls = sample(model, noise, labels, config, generator=generator.manual_seed(1)).network_calls  # and warm-up

        def bare() -> None:  # the same number of forward passes, nothing else
            for _ in range(calls):
                model(noise, time_one, time_one * 0.5, labels)

        def sampler() -> None:
            sample(model, noise, labels, config, generator=generator.manual_seed(1))

        # Alternate the two so that drift of the machine's speed hits both alike; long runs twice.
        rounds = repeats if calls < 10 else 2
        forward_times, sampler_times = [], []
        for _ in range(rounds):
            forward_times.append(_fastest_seconds(bare, 1, device))
            sampler_times.append(_fastest_seconds(sampler, 1, device))
        results.append(SamplingCost(spec, calls, batch_size, min(sampler_times), min(forward_times)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_twinflow.yaml", help="the architecture comes from here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="training steps in float32 (as make bench trains) or under bf16 autocast")
    parser.add_argument("--memory-probe", choices=PRESETS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.memory_probe:
        print(json.dumps(_memory_probe(arguments.config, arguments.memory_probe, arguments.batch_size, torch.device(arguments.device),
                                       precision=arguments.precision)))
        return
    costs = training_costs(arguments.config, arguments.batch_size, device=arguments.device, precision=arguments.precision)
    for cost in costs.values():
        print(asdict(cost), f"{cost.seconds_per_step / costs['flow_matching'].seconds_per_step:.3f}x flow matching")
    model = build_backbone(arguments.config, torch.device(arguments.device))
    for cost in sampling_costs(model, device=torch.device(arguments.device)):
        print(asdict(cost), f"{cost.images_per_second:.1f} images/s, overhead {cost.overhead:+.1%}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
