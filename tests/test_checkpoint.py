"""Tests for twinflow.train.checkpoint: round trip, rotation, crash safety and refusal of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from twinflow.train.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _marker_written(path: str) -> None:  # what a malicious pickle would run on load
    Path(path).write_text("code ran")


class Payload:
    """An arbitrary object whose unpickling calls a function: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_marker_written, (self.marker,))


def _trained_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
    ema = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()  # the optimizer now holds exp_avg / exp_avg_sq / step tensors
    generator = torch.Generator().manual_seed(123)
    torch.randn(7, generator=generator)  # move it off its seed state
    return model, ema, optimizer, generator


def _checkpoint(step: int, model=None, **extra) -> Checkpoint:
    if model is None:
        model = nn.Linear(2, 2)
    return Checkpoint(step=step, model=model.state_dict(), state={"note": f"step {step}"}, **extra)


def test_round_trip(tmp_path):
    model, ema, optimizer, generator = _trained_parts()
    state = {"architecture": {"name": "mlp", "config": {"width": 4}}, "data_order": {"epoch": 2, "position": 5}}
    folder = save_checkpoint(
        tmp_path,
        Checkpoint(
            step=12, model=model.state_dict(), state=state, ema=ema.state_dict(),
            optimizer=optimizer.state_dict(), random={"objective_generator": generator.get_state()},
        ),
        keep_last=3,
    )
    assert folder == checkpoint_folder(tmp_path, 12) == tmp_path / "checkpoints" / "step_0000012"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.pt", "random.safetensors", "state.json",
    ]

    loaded = load_checkpoint(tmp_path)  # a run folder resolves to its newest checkpoint
    assert loaded.step == 12
    assert loaded.state == state  # "step" is popped back out of the JSON
    assert json.loads((folder / "state.json").read_text())["step"] == 12
    for expected, got in ((model.state_dict(), loaded.model), (ema.state_dict(), loaded.ema)):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)

    # Optimizer: a fresh optimizer loaded from the file takes exactly the same next step.
    twin = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
    twin.load_state_dict(loaded.model)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(loaded.optimizer)
    original = optimizer.state_dict()["state"]
    restored = twin_optimizer.state_dict()["state"]
    assert original.keys() == restored.keys()
    for index in original:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(original[index][name], restored[index][name])
    batch = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    for network, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        network(batch).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))

    # Random generator: the restored one continues the same stream.
    restored_generator = torch.Generator()
    restored_generator.set_state(loaded.random["objective_generator"])
    assert torch.equal(torch.randn(10, generator=generator), torch.randn(10, generator=restored_generator))


def test_weights_only_load_skips_optimizer_and_random(tmp_path):
    model, ema, optimizer, generator = _trained_parts()
    save_checkpoint(
        tmp_path,
        Checkpoint(step=1, model=model.state_dict(), state={}, ema=None,
                   optimizer=optimizer.state_dict(), random={"g": generator.get_state()}),
        keep_last=1,
    )
    loaded = load_checkpoint(tmp_path, full=False)
    assert loaded.optimizer is None and loaded.random is None and loaded.ema is None
    assert torch.equal(loaded.model["0.weight"], model.state_dict()["0.weight"])


def test_keep_last_deletes_older(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _checkpoint(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(5), keep_last=3)
    other = nn.Linear(2, 2)
    save_checkpoint(tmp_path, _checkpoint(5, model=other), keep_last=3)
    assert len(list_checkpoints(tmp_path)) == 1
    assert torch.equal(load_checkpoint(tmp_path).model["weight"], other.weight.detach())


def test_partial_folder_from_a_crash_is_ignored(tmp_path):
    good = nn.Linear(2, 2)
    save_checkpoint(tmp_path, _checkpoint(3, model=good), keep_last=3)
    # A run killed while writing step 6 leaves its hidden temporary folder behind,
    # possibly with a state.json already written and a truncated weights file.
    partial = tmp_path / "checkpoints" / ".step_0000006.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"step": 6}))
    (partial / "model.safetensors").write_bytes(b"\x00\x01truncated")
    assert list_checkpoints(tmp_path) == [checkpoint_folder(tmp_path, 3)]
    assert resolve_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 3)
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 3
    assert torch.equal(loaded.model["weight"], good.weight.detach())
    # The next save of that step clears the leftover and lands atomically.
    save_checkpoint(tmp_path, _checkpoint(6), keep_last=3)
    assert not partial.exists()
    assert load_checkpoint(tmp_path).step == 6


def test_folder_without_state_json_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(2), keep_last=3)
    (tmp_path / "checkpoints" / "step_0000009").mkdir()  # no state.json: incomplete
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert resolve_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 2)


def test_resolve_picks_the_newest_by_step_number(tmp_path):
    for step in (9, 100, 10, 2):
        save_checkpoint(tmp_path, _checkpoint(step), keep_last=10)
    assert [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path)] == [2, 9, 10, 100]
    assert resolve_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 100)
    # a checkpoint folder resolves to itself
    assert resolve_checkpoint(checkpoint_folder(tmp_path, 9)) == checkpoint_folder(tmp_path, 9)
    assert load_checkpoint(checkpoint_folder(tmp_path, 9)).state["note"] == "step 9"


def test_resolve_without_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path)


def test_missing_model_file_is_named(tmp_path):
    folder = save_checkpoint(tmp_path, _checkpoint(1), keep_last=1)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(folder)
    assert str(folder / "model.safetensors") in str(error.value)


def test_corrupt_safetensors_is_named(tmp_path):
    folder = save_checkpoint(tmp_path, _checkpoint(1), keep_last=1)
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 3)
    with pytest.raises(ValueError) as error:
        load_checkpoint(folder)
    assert str(folder / "model.safetensors") in str(error.value)


def test_corrupt_state_json(tmp_path):
    folder = save_checkpoint(tmp_path, _checkpoint(1), keep_last=1)
    (folder / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json"):
        load_checkpoint(folder)


def test_pickled_object_in_optimizer_file_is_refused(tmp_path):
    folder = save_checkpoint(tmp_path, _checkpoint(1), keep_last=1)
    marker = tmp_path / "marker.txt"
    torch.save({"state": {}, "payload": Payload(marker)}, folder / "optimizer.pt")
    assert not marker.exists()
    with pytest.raises(ValueError) as error:
        load_checkpoint(folder)
    assert str(folder / "optimizer.pt") in str(error.value)
    assert not marker.exists(), "weights_only loading ran code from the pickle"
    # Sampling needs no optimizer: a weights-only read still works.
    assert load_checkpoint(folder, full=False).step == 1
