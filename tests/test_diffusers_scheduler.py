"""The diffusers-style scheduler: the same steps as twinflow.sample, diffusers' config round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

from toy import GaussianToy  # noqa: E402
from twinflow.diffusers_scheduler import TwinFlowScheduler  # noqa: E402
from twinflow.sampler import SAMPLER_PRESETS, sample  # noqa: E402


@pytest.fixture
def toy():
    return GaussianToy(mean=torch.tensor([0.5, -1.0, 2.0]), std=0.7, dim=3)


def _loop(scheduler: TwinFlowScheduler, model, noise: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = noise
    scale = scheduler.config.num_train_timesteps
    for timestep, target in zip(scheduler.timesteps, scheduler.target_timesteps):
        batch = x.shape[0]
        t = torch.full((batch,), float(timestep) / scale)
        r = torch.full((batch,), float(target) / scale)
        x = scheduler.step(model(x, t, r, None), timestep, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("preset", ["1nfe", "2nfe", "4nfe", "any", "multi"])
def test_a_scheduler_loop_is_the_sampler(toy, preset):
    model = toy.oracle("average")
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    scheduler = TwinFlowScheduler.from_preset(preset)
    expected = sample(model, noise, None, SAMPLER_PRESETS[preset], generator=torch.Generator().manual_seed(5)).sample
    got = _loop(scheduler, model, noise, seed=5)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()


def test_extrapolation_remembers_the_previous_step(toy):
    config = replace(SAMPLER_PRESETS["any"], extrapolation_ratio=0.3)
    scheduler = TwinFlowScheduler(num_inference_steps=4, style="any", stochastic_ratio=0.0, extrapolation_ratio=0.3,
                                  gaps=(0.001, 0.5))
    model = toy.oracle("instantaneous")  # not exact for "any": the extrapolation changes the result
    noise = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    expected = sample(model, noise, None, config).sample
    assert torch.allclose(_loop(scheduler, model, noise, seed=0), expected, atol=1e-6)
    assert not torch.allclose(expected, sample(model, noise, None, replace(config, extrapolation_ratio=0.0)).sample, atol=1e-3)


def test_target_timesteps_follow_the_style():
    for style, expected in [("few", lambda s: torch.zeros_like(s.timesteps)),
                            ("any", lambda s: s.sigmas[1:] * 1000),
                            ("mul", lambda s: s.timesteps)]:
        scheduler = TwinFlowScheduler(num_inference_steps=4, style=style, stochastic_ratio=0.0, gaps=(0.001, 0.5))
        assert scheduler.timesteps.shape == scheduler.target_timesteps.shape == (4,)
        assert torch.allclose(scheduler.target_timesteps, expected(scheduler), atol=1e-3)
        assert scheduler.target_timestep(scheduler.timesteps[2]) == pytest.approx(float(scheduler.target_timesteps[2]))
    scheduler = TwinFlowScheduler()
    assert scheduler.sigmas[0] == pytest.approx(0.999) and scheduler.sigmas[-1] == 0.0


def test_multi_step_without_noise_is_an_euler_step():
    scheduler = TwinFlowScheduler(num_inference_steps=3, style="mul", stochastic_ratio=0.0, gaps=(0.0, 0.0))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    velocity = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    t_cur, t_next = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    out = scheduler.step(velocity, scheduler.timesteps[0], x)
    assert torch.allclose(out.prev_sample, x - (t_cur - t_next) * velocity, atol=1e-6)
    assert torch.allclose(out.pred_original_sample, x - t_cur * velocity, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    scheduler = TwinFlowScheduler.from_preset("4nfe")
    scheduler.save_pretrained(tmp_path)
    loaded = TwinFlowScheduler.from_pretrained(tmp_path)
    def plain(config):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}

    assert plain(loaded.config) == plain(scheduler.config)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    assert loaded.sampler_config == SAMPLER_PRESETS["4nfe"]


def test_misuse_gets_clear_errors():
    scheduler = TwinFlowScheduler.from_preset("2nfe")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="out of order"):
        scheduler.step(x, scheduler.timesteps[1], x)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.step(x, 123.0, x)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.zeros(2, 4), scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="stochastic_ratio"):
        TwinFlowScheduler(stochastic_ratio=2.0)
    with pytest.raises(ValueError, match="unknown sampler preset"):
        TwinFlowScheduler.from_preset("fast")
