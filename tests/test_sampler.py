"""Tests for twinflow.sampler (the unified any-step sampler) against exact Gaussian answers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from toy import GaussianToy

from twinflow.path import CosinePath, LinearPath
from twinflow.sampler import (
    sampler_from_spec,
    split_specs,
    SAMPLER_PRESETS,
    SamplerConfig,
    sample,
    sampler_config,
    step_stochastic_ratio,
    time_grid,
)

MEAN = torch.tensor([2.0, -1.0], dtype=torch.float64)
STD = torch.full((2,), 0.5, dtype=torch.float64)


@pytest.fixture(scope="module")
def toy() -> GaussianToy:
    return GaussianToy(mean=MEAN, std=0.5, dim=2)


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    # 12000 x 2 stays under torch's parallel grain size: fast even on a busy 2-core machine.
    return torch.randn(12000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class Spy:
    """A model that records every call and returns ``F = x_t * factor``."""

    def __init__(self, factor: float = 0.0) -> None:
        self.factor = factor
        self.calls: list[dict] = []

    def __call__(self, x_t, t, r, cond):
        self.calls.append({"batch": x_t.shape[0], "t": t.clone(), "r": r.clone(), "cond": cond})
        return x_t * self.factor


# ---------------------------------------------------------------------------------------------
# The toy's closed forms
# ---------------------------------------------------------------------------------------------


def test_toy_velocity_is_derivative_of_flow_map(toy):
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)  # per-sample times
    step = 1e-5
    derivative = (toy.flow_map(x_t, t, t + step) - toy.flow_map(x_t, t, t - step)) / (2 * step)
    torch.testing.assert_close(toy.velocity(x_t, t), derivative, atol=1e-7, rtol=1e-6)


def test_toy_average_velocity_limits_and_jump(toy):
    x_t = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0.2, 1.0, 32, dtype=torch.float64)
    r = t * 0.3
    # One jump with the average velocity is the exact flow map.
    jump = x_t - (t - r)[:, None] * toy.average_velocity(x_t, t, r)
    torch.testing.assert_close(jump, toy.flow_map(x_t, t, r))
    # r -> t recovers the instantaneous velocity; r == t returns it exactly.
    close = toy.average_velocity(x_t, t, t - 1e-7)
    torch.testing.assert_close(close, toy.velocity(x_t, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(toy.average_velocity(x_t, t, t), toy.velocity(x_t, t))


def test_toy_marginals_match_interpolation(toy):
    generator = torch.Generator().manual_seed(3)
    data, noise = toy.sample_data(15000, generator), toy.sample_noise(15000, generator)
    for t in (0.0, 0.3, 0.7, 1.0):
        x_t = LinearPath().interpolate(data, noise, t)
        expected_mean = toy.marginal_mean(t, x_t).expand(2)
        expected_std = toy.marginal_std(t, x_t).expand(2)
        torch.testing.assert_close(x_t.mean(0), expected_mean, atol=0.02, rtol=0)
        torch.testing.assert_close(x_t.std(0), expected_std, atol=0.02, rtol=0)


# ---------------------------------------------------------------------------------------------
# Time grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"steps": 1}, [1.0, 0.0]),
        ({"steps": 4}, [1.0, 0.75, 0.5, 0.25, 0.0]),
        ({"steps": 3, "gaps": (0.1, 0.5)}, [0.9, 0.7, 0.5, 0.0]),
        ({"steps": 1, "gaps": (0.001, 0.6)}, [0.999, 0.0]),  # one linspace point: g0
        ({"steps": 2, "gaps": (0.001, 0.6)}, [0.999, 0.6, 0.0]),
        ({"steps": 2, "time_warp": (2.0, 1.0, 1.0)}, [1.0, 0.75, 0.0]),  # s = [0, .5] -> s^2
        ({"steps": 4, "order": 2}, [1.0, 0.5, 0.0]),  # (4 + 1) // 2 = 2 intervals
        ({"steps": 5, "order": 2}, [1.0, 2 / 3, 1 / 3, 0.0]),  # 3 intervals
    ],
)
def test_time_grid_values(options, expected):
    grid = time_grid(sampler_config(**options))
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SAMPLER_PRESETS))
def test_time_grid_presets_are_decreasing_to_zero(name):
    config = SAMPLER_PRESETS[name]
    grid = time_grid(config)
    assert len(grid) == config.intervals + 1
    assert grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    a, b, c = config.time_warp
    start = config.gaps[0]
    assert grid[0].item() == pytest.approx(1 - (1 - (1 - start**a) ** b) ** c)


# ---------------------------------------------------------------------------------------------
# Accuracy with exact models
# ---------------------------------------------------------------------------------------------


def test_multi_step_ode_reaches_the_data_distribution(toy, noise):
    config = sampler_config(steps=100, style="mul", stochastic_ratio=0.0)
    result = sample(toy.oracle("instantaneous"), noise, config=config)
    assert result.network_calls == 100
    torch.testing.assert_close(result.sample.mean(0), MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(result.sample.std(0), STD, atol=0.015, rtol=0)
    # Sample by sample it is close to the exact flow map (first-order error only).
    assert (result.sample - toy.flow_map(noise, 1.0, 0.0)).abs().max() < 0.05


def test_one_step_with_exact_average_model_is_exact(toy, noise):
    result = sample(toy.oracle("average"), noise.float(), config=sampler_config("1nfe"))
    assert result.network_calls == 1
    exact = toy.flow_map(noise, 1.0, 0.0).float()
    torch.testing.assert_close(result.sample, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("gaps", [(0.0, 0.0), (0.001, 0.5)])
def test_any_step_with_exact_average_model_is_the_flow_map(toy, noise, steps, gaps):
    config = sampler_config(steps=steps, style="any", gaps=gaps)
    result = sample(toy.oracle("average"), noise[:2000], config=config, return_trajectory=True)
    times = result.times.tolist()
    for x, t in zip(result.trajectory, times):  # every intermediate point is on the ODE path
        torch.testing.assert_close(x, toy.flow_map(noise[:2000], times[0], t), atol=1e-10, rtol=0)
    # The start time is 1 - g0: from there the flow map still lands on the data distribution.
    exact = toy.flow_map(noise[:2000], times[0], 0.0)
    torch.testing.assert_close(result.sample, exact, atol=1e-10, rtol=0)


def test_few_step_consistency_sampling_matches_the_data_distribution(toy, noise):
    # With rho = 1 every re-noised point is exactly distributed like x_t, so the exact
    # average model keeps producing data samples. (With rho = 0 a few-step "few" sampler is
    # not the flow map: it re-noises along straight lines, not along the ODE.)
    config = sampler_config("4nfe")
    generator = torch.Generator().manual_seed(5)
    result = sample(toy.oracle("average"), noise, config=config, generator=generator)
    assert result.network_calls == 4
    torch.testing.assert_close(result.sample.mean(0), MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(result.sample.std(0), STD, atol=0.02, rtol=0)


def test_second_order_beats_first_order_at_equal_nfe(toy, noise):
    noise = noise[:4000]
    exact = toy.flow_map(noise, 1.0, 0.0)
    model = toy.oracle("instantaneous")
    first = sample(model, noise, config=sampler_config(steps=17, style="mul", order=1))
    second = sample(model, noise, config=sampler_config(steps=17, style="mul", order=2))
    assert first.network_calls == second.network_calls == 17
    first_error = (first.sample - exact).abs().max()
    second_error = (second.sample - exact).abs().max()
    assert second_error < 0.5 * first_error
    assert (second.sample.std(0) - 0.5).abs().max() < 0.5 * (first.sample.std(0) - 0.5).abs().max()


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
@pytest.mark.parametrize(
    "options",
    [
        {"steps": 1},
        {"steps": 4, "stochastic_ratio": 1.0, "gaps": (0.001, 0.5)},
        {"steps": 5, "style": "mul", "order": 2, "stochastic_ratio": "auto"},
        {"steps": 4, "style": "any", "extrapolation_ratio": 0.5, "stochastic_ratio": 0.3},
    ],
)
def test_point_mass_data_is_recovered_on_any_path(path, options):
    # Data is a single point c: the exact velocity on any path recovers x_hat = c at every call.
    target = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)

    def model(x_t, t, r, cond):
        time = t[:, None]
        noise_estimate = (x_t - path.gamma(time) * target) / path.alpha(time)
        return path.alpha_derivative(time) * noise_estimate + path.gamma_derivative(time) * target

    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    result = sample(model, noise, config=sampler_config(**options), path=path, generator=generator)
    torch.testing.assert_close(result.sample, target.expand(16, 3), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------
# Step rules: auto rho, extrapolation, Heun's second call
# ---------------------------------------------------------------------------------------------


def test_step_stochastic_ratio_values():
    assert step_stochastic_ratio(0.25, 0.9, 0.7) == 0.25
    assert step_stochastic_ratio("auto", 0.9, 0.7) == pytest.approx(2 * 0.2 * 0.9 / 0.49)
    assert step_stochastic_ratio("auto", 0.7, 0.5) == 1.0  # 1.12 clamped
    assert step_stochastic_ratio("auto", 0.5, 0.0) == 1.0


def test_auto_stochastic_ratio_is_recomputed_every_step():
    # Grid [0.9, 0.7, 0.5, 0]: rho is 0.735 on the first step and 1 on the second (the reference
    # would keep 0.735). With F = 0 on the linear path, x_hat = z_hat = x, so by hand:
    # x_next = (1 - t_next) x + t_next (sqrt(1 - rho) x + sqrt(rho) eps).
    config = sampler_config(steps=3, gaps=(0.1, 0.5), stochastic_ratio="auto")
    start = torch.randn(8, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    result = sample(Spy(0.0), start, config=config, generator=torch.Generator().manual_seed(9))

    draws = torch.Generator().manual_seed(9)
    first_eps = torch.randn(start.shape, generator=draws, dtype=torch.float64)
    second_eps = torch.randn(start.shape, generator=draws, dtype=torch.float64)

    def by_hand(second_rho: float) -> torch.Tensor:
        first_rho = 2 * 0.2 * 0.9 / 0.7**2
        kept = math.sqrt(1 - first_rho) * start + math.sqrt(first_rho) * first_eps
        x = 0.3 * start + 0.7 * kept
        return 0.5 * x + 0.5 * (math.sqrt(1 - second_rho) * x + math.sqrt(second_rho) * second_eps)

    torch.testing.assert_close(result.sample, by_hand(1.0))
    assert not torch.allclose(result.sample, by_hand(2 * 0.2 * 0.9 / 0.7**2))


@pytest.mark.parametrize(("kappa", "expected"), [(0.0, 81 / 256), (0.5, 0.31640625 + 0.5 * 0.03515625)])
def test_extrapolation_from_the_third_step_and_not_on_the_last(kappa, expected):
    # F = x on the grid [1, 3/4, 1/2, 1/4, 0], style mul, rho 0: each step multiplies x by
    # 1 - (t - t_next) = 3/4, and x_hat = (1 - t) x. Steps 0 and 1 are never extrapolated (the
    # reference's i > 1); step 2 extrapolates from step 1's un-extrapolated endpoints:
    # x_hat = 0.28125 + 0.09375 k, z_hat = 0.84375 - 0.09375 k, x_3 = 0.421875 + 0.046875 k;
    # the last step returns its own x_hat = 3/4 x_3 = 0.31640625 + 0.03515625 k (times x0).
    start = torch.randn(4, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    config = sampler_config(steps=4, extrapolation_ratio=kappa, style="mul")
    result = sample(Spy(1.0), start, config=config)
    torch.testing.assert_close(result.sample, expected * start)


def reference_extrapolating_loop(model, noise, times, kappa, style):
    """The reference's ``sampling_loop`` (its unified_sampler.py) for order 1 and rho 0,
    written out: x_hat is recorded before extrapolation and the last record is the sample."""
    x, x_hats, z_hats, samples = noise.double(), [], [], []
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        target = {"few": 0.0, "any": t_next, "mul": t_cur}[style]
        batch = x.shape[0]
        velocity = model(x, torch.full((batch,), t_cur, dtype=x.dtype), torch.full((batch,), target, dtype=x.dtype), None)
        x_hat, z_hat = x - t_cur * velocity, x + (1 - t_cur) * velocity
        samples.append(x_hat)
        z_hats.append(z_hat)
        x_hats.append(x_hat)
        if i > 1:
            z_hat = z_hat + kappa * (z_hat - z_hats[-2])
            x_hat = x_hat + kappa * (x_hat - x_hats[-2])
            z_hats.pop(0), x_hats.pop(0)
        x = (1 - t_next) * x_hat + t_next * z_hat
    return samples[-1]


@pytest.mark.parametrize("style", ["any", "mul", "few"])
def test_extrapolation_matches_the_reference_loop(style):
    def model(x, t, r, cond):  # a smooth, non-exact average-velocity field
        return torch.sin(2 * x) * (1 + t[:, None]) - 0.3 * r[:, None] * x

    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    config = sampler_config(steps=6, extrapolation_ratio=0.4, style=style, gaps=(0.001, 0.2))
    expected = reference_extrapolating_loop(model, noise, time_grid(config).tolist(), 0.4, style)
    torch.testing.assert_close(sample(model, noise, None, config).sample, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sample(model, noise, None, replace(config, extrapolation_ratio=0.0)).sample, expected)


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_heun_step_by_hand(rho):
    # F = x, grid [1, 0.5, 0], style mul. First call: x_hat_1 = 0, z_hat_1 = x0; deterministic
    # x' = 0.5 x0; second call F_2 = 0.5 x0 gives x_hat_2 = 0.25 x0. Heun's point:
    # x0 - 0.5 (x0 + 0.5 x0) / 2 = 0.625 x0; data endpoint (0 + 0.25 x0) / 2 = 0.125 x0.
    # rho = 0: x_1 = 0.625 x0; rho = 1: x_1 = 0.5 * 0.125 x0 + 0.5 eps. Last step: x_hat = 0.5 x_1.
    start = torch.randn(4, 3, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    spy = Spy(1.0)
    config = sampler_config(steps=3, order=2, style="mul", stochastic_ratio=rho)
    result = sample(spy, start, config=config, generator=torch.Generator().manual_seed(16))
    eps = torch.randn(start.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    first = 0.625 * start if rho == 0.0 else 0.0625 * start + 0.5 * eps
    torch.testing.assert_close(result.sample, 0.5 * first)


@pytest.mark.parametrize("style", ["few", "any", "mul"])
def test_heun_second_call_gets_the_style_target_time(style):
    spy = Spy(0.1)
    config = sampler_config(steps=3, order=2, style=style)  # 2 intervals: grid [1, 0.5, 0]
    start = torch.randn(5, 2, generator=torch.Generator().manual_seed(11))
    result = sample(spy, start, config=config)
    assert result.network_calls == 3 == len(spy.calls)
    times = [(call["t"][0].item(), call["r"][0].item()) for call in spy.calls]
    first_target = {"few": 0.0, "any": 0.5, "mul": 1.0}[style]
    heun_target = {"few": 0.0, "any": 0.5, "mul": 0.5}[style]
    assert times[0] == (1.0, first_target)
    assert times[1] == (0.5, heun_target)  # the second (Heun) call at t_next
    assert times[2][0] == 0.5  # the last interval ends at 0: no second call
    for call in spy.calls:
        assert call["t"].shape == call["r"].shape == (5,)


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------


def label_model(calls: list[int]):
    """F is the label value everywhere; records the batch size of each call."""

    def model(x_t, t, r, cond):
        calls.append(x_t.shape[0])
        return cond.to(x_t.dtype)[:, None].expand_as(x_t).clone()

    return model


def test_guidance_combines_conditional_and_unconditional_in_one_call():
    calls: list[int] = []
    start = torch.randn(6, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    labels, null = torch.full((6,), 3), torch.full((6,), 10)
    config = sampler_config(steps=1, guidance_scale=1.5)
    result = sample(label_model(calls), start, labels, config, null_cond=null)
    assert calls == [12]  # one batched forward
    assert result.network_calls == 2  # counted as two evaluations per sample
    guided = 10 + 1.5 * (3 - 10)  # diffusers' and the reference's F_u + w (F_c - F_u)
    torch.testing.assert_close(result.sample, start - guided)  # x_hat = z - 1 * F


def test_guidance_only_inside_the_interval():
    calls: list[int] = []
    start = torch.randn(6, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    labels, null = torch.full((6,), 3), torch.full((6,), 10)
    # Grid [1, 0.5, 0], style mul: first call at t = 1 (outside [0, 0.6]), second at 0.5 (inside).
    config = sampler_config(steps=2, style="mul", guidance_scale=2.0, guidance_interval=(0.0, 0.6))
    result = sample(label_model(calls), start, labels, config, null_cond=null)
    assert calls == [6, 12]
    assert result.network_calls == 3
    guided = 10 + 2.0 * (3 - 10)
    torch.testing.assert_close(result.sample, start - 0.5 * 3 - 0.5 * guided)


def test_guidance_scale_one_is_the_conditional_model():
    start = torch.randn(6, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    labels, null = torch.full((6,), 3), torch.full((6,), 10)
    guided = sample(label_model([]), start, labels, sampler_config(steps=1, guidance_scale=1.0), null_cond=null)
    plain = sample(label_model([]), start, labels, sampler_config(steps=1), null_cond=null)
    torch.testing.assert_close(guided.sample, plain.sample)


def test_guidance_without_null_condition_raises():
    with pytest.raises(ValueError, match="null_cond"):
        sample(Spy(), torch.zeros(2, 2), torch.zeros(2), sampler_config(guidance_scale=1.0))


def test_input_validation():
    with pytest.raises(ValueError, match="cond"):
        sample(Spy(), torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="noise"):
        sample(Spy(), torch.zeros(()))
    with pytest.raises(ValueError, match="model"):
        sample(lambda x, t, r, c: x[:1], torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------
# Presets, config, determinism, trajectory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "calls"), [("1nfe", 1), ("2nfe", 2), ("4nfe", 4), ("any", 4), ("multi", 30)]
)
def test_presets_validate_and_use_their_nfe(name, calls):
    config = sampler_config(name)
    assert config == SAMPLER_PRESETS[name].validate()
    spy = Spy(0.1)
    generator = torch.Generator().manual_seed(0)
    result = sample(spy, torch.randn(3, 2), config=config, generator=generator)
    assert result.network_calls == calls == len(spy.calls)


def test_preset_values_follow_the_spec():
    expected = SamplerConfig(steps=2, stochastic_ratio=1.0, gaps=(0.001, 0.6))
    assert SAMPLER_PRESETS["2nfe"] == expected
    assert SAMPLER_PRESETS["multi"].time_warp == (1.17, 0.8, 1.1)
    assert SAMPLER_PRESETS["multi"].style == "mul"
    assert SAMPLER_PRESETS["any"].style == "any"


def test_sampler_config_errors_and_overrides():
    with pytest.raises(ValueError, match="4nfe"):  # the message lists the preset names
        sampler_config("fast")
    with pytest.raises(ValueError, match="sampling_steps"):
        sampler_config("4nfe", sampling_steps=3)
    config = sampler_config("4nfe", stochastic_ratio=0.5, gaps=[0.0, 0.5])
    assert config.stochastic_ratio == 0.5 and config.gaps == (0.0, 0.5) and config.steps == 4
    assert SAMPLER_PRESETS["4nfe"].stochastic_ratio == 1.0  # presets untouched


def test_sampler_specs():
    assert sampler_from_spec("1nfe") == SAMPLER_PRESETS["1nfe"]
    assert sampler_from_spec("multi:steps=50") == replace(SAMPLER_PRESETS["multi"], steps=50)
    config = sampler_from_spec(" 4nfe:stochastic_ratio=auto:gaps=[0.001,0.4] ")
    assert config.stochastic_ratio == "auto" and config.gaps == (0.001, 0.4)
    assert split_specs("1nfe, multi:steps=50,4nfe:gaps=[0.001,0.4],") == ["1nfe", "multi:steps=50", "4nfe:gaps=[0.001,0.4]"]
    with pytest.raises(ValueError, match="'steps50' must look like key=value"):
        sampler_from_spec("multi:steps50")
    with pytest.raises(ValueError, match="unknown sampler option 'step'"):
        sampler_from_spec("multi:step=5")


def test_config_round_trip_and_unknown_keys():
    config = sampler_config("multi", guidance_scale=1.5)
    values = config.to_dict()
    assert values["time_warp"] == [1.17, 0.8, 1.1]
    assert SamplerConfig.from_dict(values) == config
    with pytest.raises(ValueError, match="shift"):
        SamplerConfig.from_dict({**values, "shift": 3.0})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 2.0),
        ("style", "many"),
        ("order", 3),
        ("stochastic_ratio", 1.5),
        ("stochastic_ratio", "sde"),
        ("extrapolation_ratio", float("nan")),
        ("time_warp", (1.0, 0.0, 1.0)),
        ("time_warp", (1.0, 1.0)),
        ("gaps", (1.0, 0.0)),
        ("gaps", (0.5, 0.5)),
        ("gaps", (-0.1, 0.0)),
        ("guidance_interval", (0.8, 0.2)),
    ],
)
def test_bad_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace(SamplerConfig(), **{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        sampler_config(**{field: value})


def test_trajectory_covers_every_grid_time(toy, noise):
    config = sampler_config("multi")
    result = sample(toy.oracle("instantaneous"), noise[:100], config=config, return_trajectory=True)
    assert len(result.trajectory) == len(time_grid(config)) == len(result.times)
    assert torch.equal(result.trajectory[0], noise[:100])
    assert torch.equal(result.trajectory[-1], result.sample)
    assert sample(toy.oracle("instantaneous"), noise[:100], config=config).trajectory is None


def test_same_seed_same_result_and_different_seeds_differ(toy, noise):
    config = sampler_config("4nfe")
    model = toy.oracle("average")

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample(model, noise[:500], config=config, generator=generator).sample

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    # Deterministic settings draw nothing: the result does not depend on the generator.
    deterministic = replace(config, stochastic_ratio=0.0)  # 4 steps, no fresh noise
    seeds = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    first = sample(model, noise[:500], config=deterministic, generator=seeds[0])
    second = sample(model, noise[:500], config=deterministic, generator=seeds[1])
    assert torch.equal(first.sample, second.sample)


def test_low_precision_noise_keeps_its_dtype(toy):
    start = torch.randn(8, 2, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    seen: list[torch.dtype] = []

    def model(x_t, t, r, cond):
        seen.append(x_t.dtype)
        assert t.dtype == torch.float32
        return toy.velocity(x_t.double(), t.double()).to(x_t.dtype)

    result = sample(model, start, config=sampler_config(steps=4, style="mul"))
    assert result.sample.dtype == torch.bfloat16
    assert seen == [torch.bfloat16] * 4
