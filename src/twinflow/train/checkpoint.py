"""Checkpoints: safetensors weights, atomic writes, keep the last k, exact resume.

Layout of one checkpoint folder ``<run>/checkpoints/step_0000500/``:

* ``model.safetensors``  the trained weights (what ``twinflow sample`` loads);
* ``ema.safetensors``    the EMA teacher's weights (absent when the teacher is the model);
* ``optimizer.pt``       the optimizer state (tensors and numbers only: loaded with
  ``torch.load(weights_only=True)``, so a tampered file cannot run code);
* ``random.safetensors`` the states of the run's random generators;
* ``state.json``         step, data position, EMA warm-up, model architecture and resolved config;
* ``sharded/``           only in FSDP runs: the sharded model, EMA and optimizer state written
  by every process with ``torch.distributed.checkpoint`` (see :mod:`twinflow.train.distributed`);
  read back through :mod:`twinflow.train.safe_dcp` (``.metadata`` by an unpickler that finds
  only DCP's metadata classes, non-tensor entries with ``weights_only=True``), so a tampered
  file cannot run code there either.

A checkpoint is written into a hidden temporary folder and renamed into place, so a run
killed mid-write leaves the previous checkpoints intact and never a half-written one. A
distributed run lets every process write into the temporary folder
(:func:`start_checkpoint`) before one process completes and renames it
(:func:`finish_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.json"
SHARDED_FOLDER = "sharded"  # torch.distributed.checkpoint files of an FSDP run


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, in memory."""

    step: int
    model: dict[str, Tensor] | None  # None: only sharded weights (an FSDP run without consolidation)
    state: dict[str, Any]  # JSON-serialisable: config, architecture, data position, EMA warm-up
    ema: dict[str, Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    random: dict[str, Tensor] | None = None


def checkpoint_folder(run_directory: str | Path, step: int) -> Path:
    return Path(run_directory) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_directory: str | Path, checkpoint: Checkpoint, keep_last: int) -> Path:
    """Write atomically, then delete all but the newest ``keep_last`` checkpoints."""
    temporary = start_checkpoint(run_directory, checkpoint.step)
    return finish_checkpoint(run_directory, temporary, checkpoint, keep_last)


def temporary_folder(run_directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    final = checkpoint_folder(run_directory, step)
    return final.parent / f".{final.name}.partial"


def start_checkpoint(run_directory: str | Path, step: int) -> Path:
    """A fresh, empty temporary folder for the checkpoint of ``step`` (a stale one is removed)."""
    temporary = temporary_folder(run_directory, step)
    temporary.parent.mkdir(parents=True, exist_ok=True)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    return temporary


def finish_checkpoint(run_directory: str | Path, temporary: Path, checkpoint: Checkpoint, keep_last: int) -> Path:
    """Write ``checkpoint`` into ``temporary`` (next to what is already there), rename it into
    place, then delete all but the newest ``keep_last`` checkpoints."""
    final = checkpoint_folder(run_directory, checkpoint.step)
    try:
        _write_parts(temporary, checkpoint)
    except Exception as error:  # a full disk, a lost mount: the earlier checkpoints are untouched
        shutil.rmtree(temporary, ignore_errors=True)
        kept = ", ".join(path.name for path in list_checkpoints(run_directory)) or "none"
        raise OSError(
            f"could not write checkpoint {final} ({type(error).__name__}: {error}); the earlier checkpoints "
            f"are intact ({kept}): free space and resume with --resume"
        ) from error
    if final.exists():  # re-saving the same step: replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in list_checkpoints(run_directory)[:-keep_last]:
        shutil.rmtree(old)
    return final


def _write_parts(temporary: Path, checkpoint: Checkpoint) -> None:
    if checkpoint.model is not None:
        save_file(_contiguous(checkpoint.model), str(temporary / "model.safetensors"))
    if checkpoint.ema is not None:
        save_file(_contiguous(checkpoint.ema), str(temporary / "ema.safetensors"))
    if checkpoint.optimizer is not None:
        torch.save(checkpoint.optimizer, temporary / "optimizer.pt")
    if checkpoint.random is not None:
        save_file(_contiguous(checkpoint.random), str(temporary / "random.safetensors"))
    state = {"step": checkpoint.step, **checkpoint.state}
    (temporary / STATE_FILE).write_text(json.dumps(state, indent=2))
    _fsync_folder(temporary)


def list_checkpoints(run_directory: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_directory) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {STATE_FILE} or checkpoints/step_*/)")
    return found[-1]


def read_state(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder (``path`` or a run's newest) and its parsed ``state.json``."""
    folder = resolve_checkpoint(path)
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint state file {state_path} is not valid JSON: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint state file {state_path} must hold a JSON object, got {type(state).__name__}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint state file {state_path}: 'step' must be a non-negative integer, got {step!r}")
    return folder, state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", full: bool = True) -> Checkpoint:
    """Read a checkpoint (a checkpoint folder or a run folder: its newest one).

    ``full=False`` reads only the weights and the state (enough for sampling).
    """
    folder, state = read_state(path)
    device = str(map_location)
    if not (folder / "model.safetensors").is_file() and (folder / SHARDED_FOLDER).is_dir():
        raise FileNotFoundError(
            f"checkpoint {folder} holds only sharded weights (an FSDP run with distributed.consolidate=false); "
            "write model.safetensors with twinflow.train.distributed.export_consolidated"
        )
    model = _load_tensors(folder / "model.safetensors", device)
    ema_path = folder / "ema.safetensors"
    ema = _load_tensors(ema_path, device) if ema_path.exists() else None
    optimizer = random = None
    if full:
        optimizer_path = folder / "optimizer.pt"
        if optimizer_path.exists():
            try:
                optimizer = torch.load(optimizer_path, map_location=map_location, weights_only=True)
            except Exception as error:  # a corrupt or non-tensor pickle
                raise ValueError(f"cannot read optimizer state {optimizer_path}: {error}") from error
        random_path = folder / "random.safetensors"
        random = _load_tensors(random_path, "cpu") if random_path.exists() else None
    return Checkpoint(step=int(state.pop("step")), model=model, state=state, ema=ema, optimizer=optimizer, random=random)


def _load_tensors(path: Path, device: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path), device=device)
    except Exception as error:
        raise ValueError(f"cannot read safetensors file {path}: {error}") from error


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_folder(path)
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
