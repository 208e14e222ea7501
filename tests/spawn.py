"""Run a test's distributed workers as torchrun would: WORLD processes on the CPU, one gloo group.

``spawn(worker, *args)`` starts the processes with ``torch.multiprocessing`` (the ``spawn``
start method: a fresh interpreter each, so no thread state is inherited), gives each process
torchrun's environment and a gloo group on a free port, and calls ``worker(rank, *args)`` in
every one. The worker and its arguments are pickled, so the worker must be a module-level
function. Workers report through files; the assertions run in the pytest process. Import it in
tests with ``from spawn import WORLD, free_port, spawn`` (pytest puts ``tests/`` on ``sys.path``).
``train_under_torchrun(config, out, overrides)`` launches ``torchrun -m twinflow.cli train`` as a
user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2  # processes per spawned group: the CI machine has 2 cores


def free_port() -> int:
    """A TCP port nobody listens on now (for the group's rendezvous or torchrun's master)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, port: int, worker, args: tuple) -> None:
    """One spawned process: torchrun's environment, a gloo group, the worker, then leave."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, *args, timeout: float = 300.0) -> None:
    """Run ``worker(rank, *args)`` in WORLD processes; a hang (a collective without its partner)
    fails after ``timeout`` seconds instead of blocking the test run."""
    processes = mp.start_processes(_entry, args=(free_port(), worker, args), nprocs=WORLD, join=False,
                                   start_method="spawn")
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=1.0):  # raises when a process failed
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {timeout:.0f} s (a hang?)")


def train_under_torchrun(config: Path, out: Path, overrides: list[str], timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node WORLD -m twinflow.cli train --config CONFIG --out OUT --set ...``
    on the CPU (one thread per process), from the repository root; fails the test on a non-zero exit."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "twinflow.cli", "train", "--config", str(config), "--out", str(out),
        *[item for override in overrides for item in ("--set", override)],
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=root)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished
