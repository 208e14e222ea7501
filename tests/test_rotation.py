"""Per-process batches smaller than the objective's four slices (spec 2.1): rotation in the loop.

At 20B scale a GPU holds one or two samples. The loop then gives each micro-batch the slices of
its positions in the run's sample stream, so the ``twinflow`` preset trains with any batch >= 1;
the slices keep their proportions over every optimizer step's window (and across steps when a
window is shorter than the pattern), and a resumed run continues the rotation exactly.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twinflow.objective import TwinFlowObjective
from twinflow.train.checkpoint import checkpoint_folder
from twinflow.train.config import load_config
from twinflow.train.logging import read_metrics
from twinflow.train.loop import train

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
SLICES = ("one_step", "multi_step", "any_step", "fake")


def _config(batch: int, accumulation: int, steps: int) -> dict:
    return load_config(TINY, [
        "data.limit=32", "device=cpu", f"training.batch_size={batch}", f"training.grad_accumulation={accumulation}",
        f"phases=[{{steps: {steps}, objective: {{preset: twinflow}}}}]", "training.checkpoint_every=3",
        "training.keep_checkpoints=5", "training.log_every=1", "sampling.presets=[1nfe]", "sampling.per_class=1",
    ])


class Recorder:
    """Wraps TwinFlowObjective.__call__: the slice sizes and stream position of every micro-batch."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, dict[str, int]]] = []
        self.results = []
        original = TwinFlowObjective.__call__
        recorder = self

        def recording(objective, *args, **kwargs):
            result = original(objective, *args, **kwargs)
            recorder.calls.append((kwargs.get("stream_position", 0), dict(result.plan.sizes)))
            recorder.results.append(result)
            return result

        monkeypatch.setattr(TwinFlowObjective, "__call__", recording)


@pytest.mark.parametrize("batch", [1, 2])
def test_per_process_batches_of_one_and_two_train_the_twinflow_preset(batch, tmp_path, monkeypatch, single_thread):
    recorder = Recorder(monkeypatch)
    steps = 8 // batch  # 8 samples: two whole periods of the 1:1:1:1 pattern
    result = train(_config(batch, 1, steps), tmp_path / "run")
    assert result.steps == steps
    assert [position for position, _ in recorder.calls] == [step * batch for step in range(steps)]
    seen = Counter()
    for _, sizes in recorder.calls:
        assert sum(sizes.values()) == batch
        seen.update(sizes)
    assert dict(seen) == dict.fromkeys(SLICES, 2)  # every slice trained, in proportion
    # the rotation moved the weights on every step; the terms of the slices show in the log
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == steps
    weights = load_file(str(checkpoint_folder(tmp_path / "run", steps) / "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_slices_keep_their_proportions_over_each_accumulation_window(tmp_path, monkeypatch, single_thread):
    """batch 1, accumulation 4: each optimizer step's four micro-batches hold one slice each."""
    recorder = Recorder(monkeypatch)
    train(_config(1, 4, 3), tmp_path / "run")
    assert len(recorder.calls) == 12
    for step in range(3):
        window = recorder.calls[4 * step : 4 * step + 4]
        assert [position for position, _ in window] == [4 * step + micro for micro in range(4)]
        totals = Counter()
        for _, sizes in window:
            totals.update(sizes)
        assert dict(totals) == dict.fromkeys(SLICES, 1)
    # the log averages each term over the samples that carry it, not over the micro-batches
    logged = read_metrics(tmp_path / "run")
    for step, line in enumerate(logged):
        window = recorder.results[4 * step : 4 * step + 4]
        fake = next(result for result in window if result.plan.sizes["fake"])
        one_step = next(result for result in window if result.plan.sizes["one_step"])
        assert line["loss_adversarial"] == pytest.approx(float(fake.adversarial), rel=1e-6)
        assert line["loss_rectify"] == pytest.approx(float(one_step.rectify), rel=1e-6)
    assert logged[-1]["loss_rectify"] > 0 and logged[-1]["loss_adversarial"] > 0  # (the U-Net starts at F = 0)


def test_resume_is_exact_with_rotation(tmp_path, single_thread):
    """batch 1, accumulation 2: a window of 2 samples, so the 4-slice pattern spans two steps and
    the checkpoint at step 3 lies in the middle of a period; the resumed run still ends bitwise
    where the uninterrupted one does."""
    config = _config(1, 2, 6)
    train(config, tmp_path / "whole")
    train(config, tmp_path / "stopped")
    shutil.rmtree(checkpoint_folder(tmp_path / "stopped", 6))
    train(config, tmp_path / "stopped", resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        whole = load_file(str(checkpoint_folder(tmp_path / "whole", 6) / name))
        stopped = load_file(str(checkpoint_folder(tmp_path / "stopped", 6) / name))
        assert whole.keys() == stopped.keys()
        assert all(torch.equal(whole[key], stopped[key]) for key in whole), name
