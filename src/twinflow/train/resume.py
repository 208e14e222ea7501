"""What may start or continue a run in a run folder: the checks made before anything is written.

A fresh run starts only in a new or empty folder (:func:`refuse_existing_run`), and a resumed run
continues the run its checkpoint holds (:func:`check_resumed_config`): the config given to
``--resume`` is compared key by key with the config stored in the newest checkpoint.

* An architecture change (``model.*``, ``training.lora``, the data that decides the network's
  inputs and classes) is always refused: the stored weights would not fit, or would silently
  mean something else.
* Any other change to what is trained (seed, batch size, objective, phases, learning rate, ...)
  is refused unless it is allowed by name (``--allow-change KEY``); an allowed change is printed
  and appended to ``config_changes.jsonl`` in the run folder, with the step it applies from, and
  ``config.yaml`` becomes the changed config.
* Keys that only say where and how visibly the run goes (:data:`RUNTIME_KEYS`) may change freely;
  their changes are printed too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from twinflow.train.checkpoint import list_checkpoints, read_state
from twinflow.train.config import ConfigError

ARCHITECTURE_KEYS = ("model", "training.lora", "data.source", "data.channels", "data.image_size")
"""Sections and keys that decide the network's shapes and what its inputs mean."""
RUNTIME_KEYS = ("device", "training.progress", "training.tensorboard")
"""Keys that do not change what is trained: the device (moving a run to another machine) and
the progress display."""
CHANGES_FILE = "config_changes.jsonl"


def refuse_existing_run(run_directory: Path, resume: bool) -> None:
    """A fresh run starts only in a new or empty folder: training into an old run without
    ``resume`` would overwrite and prune its checkpoints, mix its logs and leave its newest
    checkpoint to be loaded as the new run's. Nothing is written before this check."""
    if resume:
        return
    if run_directory.exists() and not run_directory.is_dir():
        raise FileExistsError(f"--out {run_directory} is a file, not a run folder")
    if run_directory.is_dir() and any(run_directory.iterdir()):
        raise FileExistsError(
            f"--out {run_directory} is not empty (an earlier run?): pass --resume to continue it, "
            "or choose a new or empty folder; nothing was changed"
        )


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training.batch_size": 64, "phases.0.steps": 1000, ...}``: one entry per leaf value."""
    if isinstance(config, dict):
        items: Iterable[tuple[str, Any]] = config.items()
    elif isinstance(config, (list, tuple)) and prefix.startswith("phases"):
        items = ((str(index), value) for index, value in enumerate(config))  # phases.N.*: per phase
    else:
        return {prefix.rstrip("."): config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat or {prefix.rstrip("."): config}


def config_differences(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, given value)}`` of every leaf that differs (JSON-normalised:
    the stored config went through ``state.json``)."""
    before = flatten(json.loads(json.dumps(stored)))
    after = flatten(json.loads(json.dumps(given)))
    missing = object()
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key, missing) != after.get(key, missing)
    }


def _under(key: str, names: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``names`` or lies in a section named there."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def check_resumed_config(run_directory: Path, config: dict, allow: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Compare ``config`` with the run's; raise :class:`ConfigError` naming the keys of a refused
    change (nothing is written then). Returns the changes that go ahead; the caller logs them
    (:func:`record_changes`) once the run folder is its to write.

    The architecture is compared with the newest checkpoint's config (what its weights are); the
    rest with the run's ``config.yaml``, the config it last started under: an allowed change
    made at an earlier resume stays allowed, even before a checkpoint has stored it.
    """
    found = list_checkpoints(run_directory)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_directory} (expected checkpoints/step_*/)")
    folder, state = read_state(found[-1])
    stored = state.get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"checkpoint state file {folder / 'state.json'} holds no config to resume with")
    current = _run_config(run_directory) or stored

    def listed(changes: dict, keys: list[str]) -> str:
        return "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in keys)

    weights = config_differences(stored, config)
    architecture = [key for key in weights if _under(key, ARCHITECTURE_KEYS)]
    if architecture:
        raise ConfigError(
            f"--resume: the config changes the architecture of the run in {run_directory} "
            f"({listed(weights, architecture)}); its checkpoints cannot continue under it. Resume with the run's "
            "config.yaml, or start a new run (training.init_from to start from these weights)"
        )
    changes = config_differences(current, config)
    refused = [key for key in changes if not _under(key, RUNTIME_KEYS) and not _under(key, allow)]
    if refused:
        flags = " ".join(f"--allow-change {key}" for key in refused)
        raise ConfigError(
            f"--resume: the config differs from the one the run in {run_directory} was trained with "
            f"({listed(changes, refused)}); resume with the run's config.yaml (no --config), or allow the change: {flags}"
        )
    return changes


def _run_config(run_directory: Path) -> dict | None:
    """The run's ``config.yaml`` (None when absent or unreadable: the checkpoint's config counts)."""
    path = run_directory / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def record_changes(run_directory: Path, step: int, changes: dict[str, tuple[Any, Any]], say=print) -> None:
    """Print the changes a resume goes ahead with and append them to ``config_changes.jsonl``."""
    if not changes:
        return
    for key, (before, after) in changes.items():
        say(f"resume at step {step}: {key} changed from {before!r} to {after!r}")
    entry = {"step": step, "changes": {key: {"from": before, "to": after} for key, (before, after) in changes.items()}}
    with open(run_directory / CHANGES_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
