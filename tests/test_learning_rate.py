"""The learning-rate schedule: a linear warm-up over the run's first steps and, within each
phase, a half cosine from the phase's learning_rate to its final_learning_rate (issue 18)."""

from __future__ import annotations

import math

import pytest

from twinflow.train.config import ConfigError, load_config
from twinflow.train.loop import learning_rate_at


def _config(*overrides: str) -> dict:
    return load_config(None, [
        "phases=[{steps: 4, learning_rate: 0.001, objective: {preset: flow_matching}}, "
        "{steps: 5, learning_rate: 0.0008, final_learning_rate: 0.0001}]",
        *overrides,
    ])


def test_constant_phase_without_final_rate():
    config = _config()
    assert [learning_rate_at(config, step) for step in range(4)] == [0.001] * 4


def test_cosine_phase_closed_form():
    config = _config()
    # Phase 1 runs steps 4..8: peak at its first step, the final rate at its last, the cosine between.
    rates = [learning_rate_at(config, step) for step in range(4, 9)]
    expected = [0.0001 + 0.0007 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(0.0008) and rates[-1] == pytest.approx(0.0001)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_warmup_scales_the_schedule():
    config = _config("training.warmup_steps=6")
    plain = _config()
    for step in range(9):
        scale = (step + 1) / 6 if step < 6 else 1.0
        assert learning_rate_at(config, step) == pytest.approx(scale * learning_rate_at(plain, step), rel=1e-12)


def test_one_step_phase_uses_its_peak():
    config = load_config(None, ["phases=[{steps: 1, learning_rate: 0.002, final_learning_rate: 0.0}]"])
    assert learning_rate_at(config, 0) == pytest.approx(0.002)


def test_training_learning_rate_is_the_default_peak():
    config = load_config(None, ["training.learning_rate=0.0005", "phases=[{steps: 3, final_learning_rate: 0.0}]"])
    assert [learning_rate_at(config, step) for step in range(3)] == pytest.approx([0.0005, 0.00025, 0.0])


@pytest.mark.parametrize("value", ["-0.1", "abc"])
def test_bad_final_rate_is_named(value):
    with pytest.raises(ConfigError, match=r"phases\.0\.final_learning_rate"):
        load_config(None, [f"phases=[{{steps: 3, final_learning_rate: {value}}}]"])


def test_unknown_phase_key_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="final_learning_rate"):
        load_config(None, ["phases=[{steps: 3, final_lr: 0.0}]"])
