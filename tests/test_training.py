"""End-to-end tests of twinflow.train.loop on configs/tiny.yaml (a few steps over a few digits)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twinflow.objective import TwinFlowObjective
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints
from twinflow.train.config import load_config
from twinflow.train.logging import read_metrics
from twinflow.train.loop import TrainingDiverged, train

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
# 6 steps (3 flow matching + 3 TwinFlow) over 64 digits, one small grid at the end.
OVERRIDES = [
    "data.limit=64",
    "device=cpu",
    "training.checkpoint_every=3",
    "training.keep_checkpoints=3",
    "training.log_every=2",
    "sampling.presets=[1nfe]",
    "sampling.per_class=1",
]


@pytest.fixture(scope="module")
def config(single_thread) -> dict:
    return load_config(TINY, OVERRIDES)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run_a")
    result = train(config, run)
    assert result.steps == 6
    assert result.final_checkpoint == checkpoint_folder(run, 6)
    return run


@pytest.fixture(scope="module")
def resumed(config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run_b")
    train(config, run)
    # Lose the final checkpoint: the run must continue from step 3.
    shutil.rmtree(checkpoint_folder(run, 6))
    assert list_checkpoints(run)[-1] == checkpoint_folder(run, 3)
    result = train(config, run, resume=True)
    assert result.final_checkpoint == checkpoint_folder(run, 6)
    return run


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_resume_equals_uninterrupted(uninterrupted, resumed, name):
    expected = _tensors(checkpoint_folder(uninterrupted, 6) / name)
    got = _tensors(checkpoint_folder(resumed, 6) / name)
    assert expected.keys() == got.keys() and expected
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{name}: resumed weights differ from the uninterrupted run in {different[:5]}"
    # ... and training did move the weights away from the step-3 state.
    at_three = _tensors(checkpoint_folder(uninterrupted, 3) / name)
    assert any(not torch.equal(at_three[key], expected[key]) for key in expected)


def test_resumed_metrics_have_no_duplicated_steps(uninterrupted, resumed):
    first, second = read_metrics(uninterrupted), read_metrics(resumed)
    steps = [line["step"] for line in second]
    assert steps == sorted(set(steps)) == [2, 4, 6]
    assert [line["step"] for line in first] == steps
    # The same losses, step for step (timings aside).
    timings = {"seconds_per_step", "training_seconds"}
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
    # Training time accumulates over the resume instead of restarting from zero.
    clock = [line["training_seconds"] for line in second]
    assert all(later > earlier > 0 for earlier, later in zip(clock, clock[1:]))


def test_run_folder_contents(uninterrupted):
    assert (uninterrupted / "config.yaml").is_file()
    assert (uninterrupted / "summary.json").is_file()
    assert (uninterrupted / "samples_1nfe.png").is_file()
    assert list_checkpoints(uninterrupted) == [checkpoint_folder(uninterrupted, 3), checkpoint_folder(uninterrupted, 6)]


def test_metrics_carry_loss_terms_and_network_calls(uninterrupted):
    lines = read_metrics(uninterrupted)
    assert [line["step"] for line in lines] == [2, 4, 6]
    for line in lines:
        for key in ("loss", "loss_base", "loss_adversarial", "loss_rectify", "network_calls", "phase",
                    "learning_rate", "gradient_norm"):
            assert key in line, f"metrics line {line['step']} lacks {key}"
        assert torch.isfinite(torch.tensor(line["loss"]))
    flow_matching, twinflow = lines[0], lines[1:]
    assert flow_matching["phase"] == 0
    assert flow_matching["network_calls"] == 1  # plain flow matching: the gradient call only
    assert flow_matching["loss_adversarial"] == 0.0 and flow_matching["loss_rectify"] == 0.0
    for line in twinflow:
        assert line["phase"] == 1
        assert line["network_calls"] > 1
        assert line["loss_adversarial"] > 0.0


def _nan_from_call(monkeypatch, bad_call: int) -> None:
    """Make the objective's loss NaN on its ``bad_call``-th call (1-based; one call per step here)."""
    original = TwinFlowObjective.__call__
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == bad_call:
            return dataclasses.replace(result, loss=result.loss * float("nan"))
        return result

    monkeypatch.setattr(TwinFlowObjective, "__call__", patched)


def test_nan_loss_stops_and_names_step_and_last_checkpoint(config, tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, bad_call=4)
    with pytest.raises(TrainingDiverged) as error:
        train(config, tmp_path)
    message = str(error.value)
    assert re.search(r"\bstep 4\b", message), message
    assert str(checkpoint_folder(tmp_path, 3)) in message
    # what to change before resuming it (issue 14, item 4): the learning rate, named with its value
    learning_rate = float(config["training"]["learning_rate"])
    assert f"it was {learning_rate:g}" in message and f"--set training.learning_rate={learning_rate / 10:g}" in message
    # The named checkpoint is there and nothing later was written.
    assert list_checkpoints(tmp_path) == [checkpoint_folder(tmp_path, 3)]


def test_nan_before_any_checkpoint_says_so(config, tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, bad_call=1)
    with pytest.raises(TrainingDiverged, match=r"step 1\b.*no checkpoint was saved yet"):
        train(config, tmp_path)
    assert list_checkpoints(tmp_path) == []


def test_training_curves_picture_is_written(uninterrupted):
    from PIL import Image

    picture = uninterrupted / "training_curves.png"
    assert picture.is_file()
    with Image.open(picture) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_other_class_labels_are_uniform_over_the_other_classes():
    from twinflow.train.data import other_class_labels

    labels = torch.arange(10).repeat(9000)
    other = other_class_labels(labels, 10, torch.Generator().manual_seed(0))
    assert not (other == labels).any() and other.min() >= 0 and other.max() <= 9
    # closed form: each of the 9 other classes with probability 1/9 (binomial sd about 0.001 here)
    counts = torch.zeros(10, 10)
    counts.index_put_((labels, other), torch.ones(len(labels)), accumulate=True)
    shares = counts / counts.sum(dim=1, keepdim=True)
    off_diagonal = shares[~torch.eye(10, dtype=torch.bool)]
    assert (off_diagonal - 1 / 9).abs().max() < 0.012
    again = other_class_labels(labels, 10, torch.Generator().manual_seed(0))
    assert torch.equal(other, again)  # drawn from the run's generator only: resumable


@pytest.mark.parametrize("choice", ["null_class", "other_class"])
def test_the_loop_gives_the_guidance_target_its_unconditional_labels(config, tmp_path, monkeypatch, choice):
    seen = []
    original = TwinFlowObjective.__call__

    def recording(self, model, data, cond=None, null_cond=None, **kwargs):
        seen.append((cond.clone(), null_cond.clone()))
        return original(self, model, data, cond, null_cond, **kwargs)

    monkeypatch.setattr(TwinFlowObjective, "__call__", recording)
    changed = load_config(TINY, OVERRIDES + [f"training.unconditional_label={choice}", "training.checkpoint_every=0"])
    train(changed, tmp_path)
    assert len(seen) == 6
    for labels, unconditional in seen:
        if choice == "null_class":
            assert (unconditional == 10).all()
        else:
            assert (unconditional != labels).all() and unconditional.max() < 10
    if choice == "other_class":  # a fresh draw every step
        assert not torch.equal(seen[0][1], seen[1][1])


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_autocasts_only_where_the_device_computes_bf16_natively(config, tmp_path, monkeypatch, native):
    """``precision: auto`` (the demo's) is bf16 autocast on a CPU with AVX512-BF16 or AMX and
    float32 elsewhere: every objective call of the run sees that one choice."""
    import twinflow.devices as devices

    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    seen = []
    original = TwinFlowObjective.__call__

    def recording(self, model, data, cond=None, null_cond=None, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(self, model, data, cond, null_cond, **kwargs)

    monkeypatch.setattr(TwinFlowObjective, "__call__", recording)
    changed = load_config(TINY, OVERRIDES + ["precision=auto", "training.checkpoint_every=0"])
    train(changed, tmp_path)
    assert seen == [native] * 6
    assert load_config(tmp_path / "config.yaml")["precision"] == "auto"  # stored as asked: a resume elsewhere re-decides


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    from twinflow.devices import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert native_bf16(cpu) is expected
        assert resolve_precision("auto", cpu) == ("bf16" if expected else "fp32")
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)
