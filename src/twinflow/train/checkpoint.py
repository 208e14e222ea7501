"""Checkpoints: safetensors weights, atomic writes, keep the last k, exact resume, every strategy.

Layout of one checkpoint folder ``<run>/checkpoints/step_0000500/``:

* ``model.safetensors``  the trained weights (what ``twinflow sample`` loads);
* ``ema.safetensors``    the EMA teacher's weights (absent when the teacher is the model);
* ``optimizer.pt``       the optimizer state (tensors and numbers only: loaded with
  ``torch.load(weights_only=True)``, so a tampered file cannot run code);
* ``random.safetensors`` the states of the run's random generators;
* ``state.json``         step, data position, EMA warm-up, model architecture and resolved config;
* ``sharded/``           only in FSDP runs: the sharded model, EMA and optimizer state written
  by every process with ``torch.distributed.checkpoint`` (DCP); read back through
  :mod:`twinflow.train.safe_dcp` (``.metadata`` by an unpickler that finds only DCP's metadata
  classes, non-tensor entries with ``weights_only=True``), so a tampered file cannot run code
  there either.

A checkpoint is written into a hidden temporary folder and renamed into place, so a run
killed mid-write leaves the previous checkpoints intact and never a half-written one. A
distributed run lets every process write into the temporary folder
(:func:`start_checkpoint`) before one process completes and renames it
(:func:`finish_checkpoint`).

A training run saves and resumes through :func:`save_training_checkpoint` and
:func:`load_training_checkpoint`, whatever its ``distributed.strategy`` (the runtime they need,
the process group and the wrapped model, is :mod:`twinflow.train.distributed`'s):

* ``none`` and ``ddp``: the ordinary checkpoint (rank 0 writes it; the model and optimizer are
  replicated).
* ``fsdp``: every process writes its shards of model, EMA and optimizer with DCP into
  ``sharded/`` of the checkpoint's temporary folder; after a barrier rank 0 adds ``state.json``
  and ``random.safetensors`` and renames the folder into place, then prunes to the newest
  ``training.keep_checkpoints``. With ``distributed.consolidate: true`` (the default) rank 0 also
  gathers the full weights into ``model.safetensors`` / ``ema.safetensors`` (a LoRA run: the
  adapters only, gathered without the base), so ``twinflow sample``, ``twinflow.load`` and
  ``export_diffusers`` read the checkpoint like any other (this holds one full copy in rank 0's
  CPU memory: fine for small models; switch it off for large ones and use
  :func:`export_consolidated` later, on one process). The checkpoint folder must be on a file
  system all processes share.

Every process's objective generator is saved (``random.safetensors``, one entry per rank:
:func:`generator_key`), so a resume continues every random stream; it needs the same number
of processes and the same strategy. A LoRA run's checkpoints hold the adapters only
(:func:`stored_names`), sharded and consolidated alike; the base comes from ``model.path`` again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from twinflow.checks import is_integer
from twinflow.teacher import EMATeacher
from twinflow.train.distributed import DistributedContext, unwrap
from twinflow.train.lora import is_lora, load_model_weights, model_weights

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
    if not is_integer(step) or step < 0:
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
            "write model.safetensors with twinflow.train.checkpoint.export_consolidated"
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


# ---- training runs under every strategy ------------------------------------------------------


def generator_key(rank: int, world_size: int) -> str:
    """Name of a rank's generator state in ``random.safetensors`` (one process: the old name)."""
    return "objective_generator" if world_size == 1 else f"objective_generator.rank{rank}"


def save_training_checkpoint(
    context: DistributedContext,
    run_directory: str | Path,
    step: int,
    model: nn.Module,
    teacher: EMATeacher,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict,
    keep_last: int,
    consolidate: bool = True,
) -> Path:
    """Save a training checkpoint under any strategy (every process must call this); see the module notes."""
    states = context.gather(generator.get_state())
    random = {generator_key(rank, context.world_size): value for rank, value in enumerate(states)}
    state = {**state, "distributed": {"strategy": context.strategy, "world_size": context.world_size}}
    temporary = temporary_folder(run_directory, step)
    if context.is_main:
        temporary = start_checkpoint(run_directory, step)
    context.barrier()  # the temporary folder exists before anyone writes into it
    if context.strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, teacher, optimizer), checkpoint_id=temporary / SHARDED_FOLDER)
        weights = _full_state(model, stored_names(model)) if consolidate else None
        ema = _full_state(teacher.network) if consolidate and teacher.owns_weights else None
        checkpoint = Checkpoint(step=step, model=weights, state=state, ema=ema, random=random)
    else:
        checkpoint = Checkpoint(
            step=step, model=model_weights(unwrap(model)), state=state,
            ema=teacher.network.state_dict() if teacher.owns_weights else None,
            optimizer=optimizer.state_dict(), random=random,
        )
    final = checkpoint_folder(run_directory, step)
    if context.is_main:
        final = finish_checkpoint(run_directory, temporary, checkpoint, keep_last)
    context.barrier()  # nobody goes on (or prunes) before the checkpoint is in place
    return final


def load_training_checkpoint(
    context: DistributedContext,
    path: str | Path,
    model: nn.Module,
    teacher: EMATeacher,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, dict]:
    """Restore weights, EMA, optimizer and this process's generator from a checkpoint (a run
    folder: its newest); returns ``(step, state)`` for the rest (data order, clock)."""
    folder, state = read_state(path)
    stored = state.get("distributed", {"strategy": "none", "world_size": 1})
    if stored["world_size"] != context.world_size or stored["strategy"] != context.strategy:
        raise ValueError(
            f"checkpoint {folder} was written by {stored['world_size']} process(es) with distributed.strategy="
            f"{stored['strategy']!r}; this run has {context.world_size} with {context.strategy!r}. Resume with the "
            "same number of processes and strategy (the data slices and the per-process random streams depend on them)"
        )
    random = load_file(str(folder / "random.safetensors"))
    generator.set_state(random[generator_key(context.rank, context.world_size)])
    if context.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        from twinflow.train import safe_dcp

        sharded = _sharded_state(model, teacher, optimizer)
        safe_dcp.load(sharded, folder / SHARDED_FOLDER)  # refuses a tampered .metadata or entry
        # A LoRA checkpoint holds the adapters only (dcp.load has checked that it has them all):
        # the frozen base, already loaded from model.path, is "missing" on purpose.
        options = StateDictOptions(strict=stored_names(model) is None)
        set_state_dict(
            model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"], options=options
        )
        if teacher.owns_weights:
            set_model_state_dict(teacher.network, sharded["ema"])
    else:
        checkpoint = load_checkpoint(folder, map_location=context.device)
        load_model_weights(unwrap(model), checkpoint.model)
        if teacher.owns_weights:
            if checkpoint.ema is None:
                raise ValueError(f"checkpoint {folder} has no EMA weights but training.ema_decay > 0")
            teacher.network.load_state_dict(checkpoint.ema)
        optimizer.load_state_dict(checkpoint.optimizer)
    teacher.load_state_dict(state["teacher"])
    return int(state.pop("step")), state


def stored_names(model: nn.Module) -> set[str] | None:
    """The model's state-dict entries a checkpoint holds: ``None`` for all of them, or for a LoRA
    model the adapters (``default`` and ``ema``) and a trained ``emb_2`` (:func:`model_weights`).

    Under FSDP the names come from the local shards, so this communicates nothing.
    """
    model = unwrap(model)
    return set(model_weights(model)) if is_lora(model) else None


def _sharded_state(model: nn.Module, teacher: EMATeacher, optimizer: torch.optim.Optimizer) -> dict:
    """DCP state dict: this process's shards of model, optimizer and EMA (same keys on every process).

    A LoRA model's entry holds only the adapters: the frozen base would cost a copy of the
    pretrained weights in every checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    names = stored_names(model)
    if names is not None:
        weights = {name: value for name, value in weights.items() if name in names}
    state = {"model": weights, "optimizer": optimizer_state}
    if teacher.owns_weights:
        state["ema"] = get_model_state_dict(teacher.network)
    return state


def _full_state(network: nn.Module, names: set[str] | None = None) -> dict[str, Tensor]:
    """Full weights on rank 0's CPU (an empty dict elsewhere); a collective.

    ``names``: only these entries (a LoRA model's adapters), gathered one by one in state-dict
    order (the same on every process), so the frozen base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if names is None:
        return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {}
    for name, value in network.state_dict().items():
        if name not in names:
            continue
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if dist.get_rank() == 0:
            full[name] = value.detach().cpu().clone()
    return full


def _rebuilt_weights(architecture: dict) -> dict[str, Tensor]:
    """A fresh model of ``architecture`` (a LoRA model with its adapters), as a checkpoint holds it:
    the template that DCP loads the shards into."""
    from twinflow.train.backbone import model_from_architecture

    return model_weights(model_from_architecture(architecture))


def export_consolidated(checkpoint: str | Path) -> Path:
    """Write ``model.safetensors`` (and ``ema.safetensors``) of an FSDP checkpoint from its DCP shards.

    Runs in one process without a process group (DCP reshards into full tensors on load), for
    checkpoints saved with ``distributed.consolidate: false``. A LoRA checkpoint gives its
    adapters only, as a one-process LoRA checkpoint has them. Returns the checkpoint folder.
    """
    from twinflow.train import safe_dcp

    folder, state = read_state(checkpoint)
    sharded = folder / SHARDED_FOLDER
    if not sharded.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} has no {SHARDED_FOLDER}/ folder (not an FSDP checkpoint)")
    architecture = state["architecture"]
    stored_keys = safe_dcp.SafeFileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    template = {"model": _rebuilt_weights(architecture)}
    if any(key.startswith("ema.") for key in stored_keys):
        template["ema"] = _rebuilt_weights(architecture)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_dcp.load(template, sharded, no_dist=True)
    for name, weights in template.items():
        partial = folder / f".{name}.safetensors.partial"
        save_file({key: value.contiguous() for key, value in weights.items()}, str(partial))
        os.replace(partial, folder / f"{name}.safetensors")
    return folder
