"""What the benchmarks share about the machine: its description and synchronised wall-clock timing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, synchronised before and after (warm up first).
    Take the minimum where other work only adds time, the median where a call varies itself."""
    seconds = []
    for _ in range(repeats):
        synchronise(device)
        started = time.perf_counter()
        function()
        synchronise(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def machine_description() -> str:
    """Processor, CPU count, torch threads, GPU; Python and torch versions."""
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{processor}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")
