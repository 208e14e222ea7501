"""One vocabulary for the four regimes (twinflow.regimes) and one definition of a count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinflow.checks import is_finite_number, is_integer, is_number
from twinflow.objective import SLICE_NAMES, ObjectiveConfig, plan_batch
from twinflow.objective.config import SliceProportions
from twinflow.regimes import REGIMES, STYLES, sampler_style
from twinflow.sampler import SamplerConfig, sample, sampler_config, sampler_from_spec
from twinflow.sampler.sampling import target_time
from twinflow.train.lora import lora_options


def test_the_table_names_every_slice_field_and_every_style_once():
    # The objective's proportions, the batch layout and the sampler's styles all come from it.
    assert tuple(field for field in SliceProportions().as_dict()) == SLICE_NAMES
    assert [regime.spec_slice for regime in REGIMES] == ["e2e", "mul", "any", "adv"]
    assert sorted(r.sampler_style for r in REGIMES if r.sampler_style) == sorted(STYLES)


@pytest.mark.parametrize(
    "name, stored, expected_r",
    [("few", "few", 0.0), ("one_step", "few", 0.0), ("any", "any", 0.25), ("any_step", "any", 0.25),
     ("mul", "mul", 0.75), ("multi_step", "mul", 0.75)],
)
def test_a_regime_name_is_its_sampler_style(name, stored, expected_r):
    assert sampler_style(name) == stored
    assert SamplerConfig(style=name).validate().style == stored
    assert sampler_config(steps=2, style=name).style == stored
    assert target_time(name, 0.75, 0.25) == expected_r


def test_sampling_by_regime_name_equals_sampling_by_style():
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(x, t, r, cond):  # depends on t and r, so a wrong target time would show
        return x * (1.0 + t.view(-1, 1)) - r.view(-1, 1)

    for style, name in (("few", "one_step"), ("any", "any_step"), ("mul", "multi_step")):
        by_style = sample(model, noise, config=sampler_config(steps=3, style=style, stochastic_ratio=0.5),
                          generator=torch.Generator().manual_seed(1))
        by_name = sample(model, noise, config=sampler_config(steps=3, style=name, stochastic_ratio=0.5),
                         generator=torch.Generator().manual_seed(1))
        assert torch.equal(by_style.sample, by_name.sample)
    assert sampler_from_spec("4nfe:style=any_step").style == "any"


@pytest.mark.parametrize("bad", ["fake", "adv", "e2e", "", 1])
def test_other_style_names_are_refused_naming_both_vocabularies(bad):
    with pytest.raises(ValueError, match=r"style must be one of \('few', 'any', 'mul'\) \(or the regime names"):
        SamplerConfig(style=bad).validate()


def test_batch_layout_follows_the_table_order():
    plan = plan_batch(8, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    assert tuple(plan.sizes) == SLICE_NAMES and all(size == 2 for size in plan.sizes.values())
    one_step, fake = plan.slice("one_step"), plan.slice("fake")
    assert (one_step.start, fake.stop) == (0, 8)
    assert torch.equal(plan.time[one_step], torch.ones(2)) and torch.equal(plan.target_time[one_step], torch.zeros(2))
    assert bool((plan.time[fake] < 0).all()) and torch.equal(plan.time[fake], plan.target_time[fake])


def test_one_definition_of_an_integer_and_a_number():
    assert is_integer(3) and is_integer(np.int64(3)) and not is_integer(True) and not is_integer(3.0)
    assert not is_integer("3") and not is_integer(np.bool_(True))
    assert is_number(2.5) and is_number(np.float32(2.5)) and is_number(float("nan")) and not is_number(False)
    assert is_finite_number(1) and not is_finite_number(float("inf")) and not is_finite_number(float("nan"))


@pytest.mark.parametrize(
    "options, message",
    [({"rank": True}, "training.lora.rank must be a positive integer"),
     ({"alpha": float("nan")}, "training.lora.alpha must be a positive number"),
     ({"alpha": True}, "training.lora.alpha must be a positive number")],
)
def test_lora_counts_refuse_bools_and_nan(options, message):
    # rank: true used to pass (Python counts True as 1); nan used to pass the alpha check.
    with pytest.raises(ValueError, match=message):
        lora_options(options)
