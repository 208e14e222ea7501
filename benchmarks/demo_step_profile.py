"""Where a step of the MNIST demo spends its time, and what the CPU knobs give (issue 18).

The demo (``configs/mnist_twinflow.yaml``) has under 10 minutes on 2 cores for 2800 optimizer steps.
This measures, on the demo's model and batch, one optimizer step of each of its two phases
(flow matching, then TwinFlow) split into network calls with and without gradient, the backward
pass, the optimizer and the rest (the objective's own tensor work), then the whole step under
each knob, each against the plain step measured in the same run (interleaved rounds):

* ``channels_last`` memory format for the U-Net's convolutions;
* bf16 autocast (this CPU has AVX512-BF16 and AMX; the loop's ``precision: bf16``, which the
  demo's ``precision: auto`` picks on such a CPU), with the RCGM targets in bf16 as the demo
  computes them (``objective.target_precision: compute``) and in float32 (``auto``, one more
  forward pass);
* one intra-op thread instead of the default;
* AdamW ``foreach=False`` (the per-tensor loop) against the default;
* ``torch.compile`` of the network (inductor, C++ on the CPU). Its compile time is reported
  apart: the extra seconds of its warm-up steps over the plain warm-up, which a demo run would
  have to win back.

``python benchmarks/demo_step_profile.py [--steps 8] [--out benchmarks/results]`` prints a table
and writes ``demo_step_profile.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from machine import machine_description

from twinflow.data import DataConfig, load_dataset
from twinflow.models import build_model
from twinflow.objective import TwinFlowObjective
from twinflow.teacher import EMATeacher
from twinflow.train.config import load_config, model_arguments, phase_objective

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist_twinflow.yaml"


class TimedNetwork(torch.nn.Module):
    """The network, with the seconds of its calls summed by whether they record gradients."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.seconds = {"forward with gradient": 0.0, "forward without gradient": 0.0}
        self.calls = 0

    def forward(self, *args):
        start = time.perf_counter()
        output = self.network(*args)
        key = "forward with gradient" if torch.is_grad_enabled() else "forward without gradient"
        self.seconds[key] += time.perf_counter() - start
        self.calls += 1
        return output


def build(config: dict, channels_last: bool, foreach: bool | None, compiled: bool = False):
    images, labels = load_dataset(DataConfig(**config["data"]))[torch.arange(config["training"]["batch_size"])]
    name, arguments = model_arguments(config)
    model = build_model(name, **arguments)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=foreach)
    if compiled:
        # Static shapes, one graph per call size (the slices give several): dynamic=True stops in
        # inductor on torch 2.13 ("cannot determine truth value of Relational"), so give the
        # graph cache room for every size instead.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._inductor.config.force_disable_caches = True  # time a cold compile, as a fresh clone pays it
        model = torch.compile(model, dynamic=False)
    return model, images, labels, optimizer


WARM_UP = 3  # steps before the clock starts (a compiled network compiles in these)


PHASES = {"flow_matching": 0, "twinflow": 1}  # the demo's phase of each objective


def step_seconds(config, preset: str, *, channels_last=False, bf16=False, targets="compute", threads=None, foreach=None,
                 compiled=False, steps=8, parts=False):
    """Mean seconds per optimizer step (after the warm-up steps) and the warm-up's seconds, with
    the step's parts when ``parts``. ``preset`` names the demo phase whose objective (slices,
    guidance) is timed; ``targets`` is its ``target_precision`` under bf16 autocast."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, images, labels, optimizer = build(config, channels_last, foreach, compiled)
        timed = TimedNetwork(model)
        teacher = EMATeacher(timed, decay=0.99)
        phase = PHASES[preset]
        objective_settings = phase_objective(config["phases"][phase], f"phases.{phase}")
        objective = TwinFlowObjective(dataclasses.replace(objective_settings, target_precision=targets))
        generator = torch.Generator().manual_seed(0)
        null = torch.full_like(labels, 10)
        totals = {"backward": 0.0, "optimizer": 0.0, "step": 0.0}
        warm_up_start = time.perf_counter()
        for index in range(steps + WARM_UP):
            if index == WARM_UP:
                warm_up = time.perf_counter() - warm_up_start
                for network in (timed, teacher.network):  # the EMA teacher is a timed copy too
                    network.seconds = dict.fromkeys(network.seconds, 0.0)
                totals = dict.fromkeys(totals, 0.0)
            start = time.perf_counter()
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                result = objective(timed, images, labels, null, teacher=teacher.network, generator=generator)
            middle = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            after_backward = time.perf_counter()
            optimizer.step()
            teacher.update(timed)
            end = time.perf_counter()
            totals["backward"] += after_backward - middle
            totals["optimizer"] += end - after_backward
            totals["step"] += end - start
        calls = {key: timed.seconds[key] + (teacher.network.seconds[key] if teacher.network is not timed else 0.0) for key in timed.seconds}
        mean = {key: value / steps for key, value in {**calls, **totals}.items()}
        mean["objective's own work"] = mean["step"] - sum(mean[key] for key in ("forward with gradient", "forward without gradient", "backward", "optimizer"))
        return mean if parts else {"step": mean["step"], "warm-up": warm_up}
    finally:
        torch.set_num_threads(previous)


KNOBS = {
    "channels_last": {"channels_last": True},
    "bf16 autocast, bf16 targets (the demo's)": {"bf16": True, "targets": "compute"},
    "bf16 autocast, float32 targets": {"bf16": True, "targets": "auto"},
    "1 thread": {"threads": 1},
    "AdamW foreach=False": {"foreach": False},
    "torch.compile": {"compiled": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    config = load_config(CONFIG)
    report = {"machine": machine_description(), "threads": torch.get_num_threads(), "parts": {}, "knobs": {}}
    for preset in ("flow_matching", "twinflow"):
        report["parts"][preset] = step_seconds(config, preset, steps=options.steps, parts=True)
        for knob, settings in KNOBS.items():  # each knob beside a fresh plain measurement
            plain = step_seconds(config, preset, steps=options.steps)
            changed = step_seconds(config, preset, steps=options.steps, **settings)
            report["knobs"].setdefault(preset, {})[knob] = {
                "plain": plain["step"], "with": changed["step"], "ratio": changed["step"] / plain["step"],
                "extra_warm_up_seconds": changed["warm-up"] - plain["warm-up"],  # torch.compile: its compile time
            }
    lines = [f"Machine: {report['machine']}", "", "| phase | part | s / step | share |", "|---|---|---:|---:|"]
    for preset, parts in report["parts"].items():
        for part, seconds in parts.items():
            if part != "step":
                lines.append(f"| {preset} | {part} | {seconds:.3f} | {seconds / parts['step']:.0%} |")
        lines.append(f"| {preset} | **whole step** | {parts['step']:.3f} | |")
    lines += ["", "| phase | knob | plain s / step | with s / step | ratio |", "|---|---|---:|---:|---:|"]
    for preset, knobs in report["knobs"].items():
        for knob, numbers in knobs.items():
            lines.append(f"| {preset} | {knob} | {numbers['plain']:.3f} | {numbers['with']:.3f} | {numbers['ratio']:.2f} |")
    compiled = {preset: knobs["torch.compile"] for preset, knobs in report["knobs"].items()}
    lines.append("")
    for preset, numbers in compiled.items():
        saved = numbers["plain"] - numbers["with"]
        payback = f"pays back after {numbers['extra_warm_up_seconds'] / saved:.0f} steps" if saved > 0 else "never pays back"
        lines.append(f"- torch.compile, {preset}: {numbers['extra_warm_up_seconds']:.0f} s of compilation; {payback}.")
    text = "\n".join(lines)
    print(text)
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "demo_step_profile.json").write_text(json.dumps(report, indent=1))
        (options.out / "demo_step_profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
