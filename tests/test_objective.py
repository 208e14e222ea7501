"""The TwinFlow objective against a slow, per-sample reference of the spec's formulas.

A probe network answers every ``no_grad`` call with a known analytic function and the one
call with gradient with a free leaf tensor ``P``. The gradient that reaches ``P`` is then
compared with what spec section 2 prescribes, sample by sample: if a target were not
detached, if a term reached the wrong slice, or if the rectify term flowed anywhere but
through the one-step prediction, the gradients would differ.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from twinflow.objective import TwinFlowObjective, objective_config, plan_batch, slice_sizes
from twinflow.objective.partition import SliceSchedule, stream_position
from twinflow.objective.losses import per_sample_loss, time_weight
from twinflow.objective.targets import rcgm_target
from twinflow.path import LinearPath
from twinflow.regimes import SLICE_NAMES

NULL = 10
SHAPE = (12, 1, 4, 4)


def analytic(x, t, r, labels):
    """A smooth network whose output depends on x, the signed times and the label."""
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    label = labels.float().view(-1, 1, 1, 1)
    return 0.3 * x + 0.5 * t4 - 0.25 * r4 + 0.2 * r4 * x + 0.05 * label + 0.1 * torch.sin(3 * x)


class Probe(torch.nn.Module):
    """``no_grad`` calls: :func:`analytic`. The call with gradient: the leaf ``output``."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.output = None

    def forward(self, x, t, r, labels):
        record = {"x": x.clone(), "t": t.clone(), "r": r.clone(), "labels": labels.clone(), "grad": torch.is_grad_enabled()}
        self.calls.append(record)
        if torch.is_grad_enabled():
            self.output = (analytic(x, t, r, labels) + 0.1).detach().requires_grad_(True)
            return self.output
        return analytic(x, t, r, labels)


def reference_rcgm_residual(x_t, t, r, v, prediction, labels, order, dt=0.01):
    """Spec 2.3 written per sample with Python floats for the times."""
    residual = prediction - v
    if order == 0 or t - r < dt:
        return residual
    x_current, t_current = x_t - dt * v, t - dt
    start, displacement = t_current, torch.zeros_like(x_t)
    for step in range(1, order + 1):
        t_next = start + (r - start) * step / order
        velocity = analytic(x_current[None], torch.tensor([t_current]), torch.tensor([t_next]), labels[None])[0]
        x_current = x_current - (t_current - t_next) * velocity
        displacement = displacement + (t_current - t_next) * velocity
        t_current = t_next
    return (100 * (t - r) * prediction - 100 * displacement) - v


def run(preset, seed=0, batch=SHAPE[0], stream_position=0, **overrides):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn((batch, *SHAPE[1:]), generator=generator).clamp(-1, 1)
    labels = torch.arange(batch) % 10
    probe = Probe()
    objective = TwinFlowObjective(objective_config(preset, **overrides))
    result = objective(probe, data, labels, torch.full_like(labels, NULL), generator=generator, stream_position=stream_position)
    result.loss.backward()
    return probe, result, data, labels


def reference_loss_gradient(difference, config):
    """d loss / d prediction of one sample whose ``prediction - target`` is ``difference``.

    L2: ``2 d / n``. Barron, as the reference's ``barron_reweighting_loss`` writes it (alpha 1):
    ``loss = mse * w / c`` with ``w = (mse / (c**2 + 1e-8) + 1) ** -0.5`` detached.
    """
    gradient = 2 * difference / difference.numel()
    if config.loss == "barron":
        c = config.barron_constant
        mse = float(difference.square().mean())
        gradient = gradient * (mse / (c**2 + 1e-8) + 1.0) ** -0.5 / c
    return gradient


def expected_gradient(probe, result, data, labels, config):
    """Slow reference of dLoss/dP from the recorded calls."""
    grad_calls = [call for call in probe.calls if call["grad"]]
    assert len(grad_calls) == 1, "exactly one network call may carry gradient"
    main = grad_calls[0]
    count = data.shape[0]
    plan = result.plan
    prediction = probe.output.detach()
    expected = torch.zeros_like(prediction)
    fake = plan.slice("fake")
    fake_calls = [c for c in probe.calls if not c["grad"] and bool((c["t"] == 1).all()) and bool((c["r"] == 0).all())]
    x_fake = None
    if fake.stop > fake.start:
        noise = fake_calls[0]["x"]
        x_fake = noise - analytic(noise, fake_calls[0]["t"], fake_calls[0]["r"], fake_calls[0]["labels"])
    for i in range(count):
        t, r = float(main["t"][i]), float(main["r"][i])
        x_t = main["x"][i]
        if fake.start <= i < fake.stop:
            assert t <= 0 and r == t
            clean = x_fake[i - fake.start]
            noise = (x_t - (1 - abs(t)) * clean) / abs(t)
            target = noise - clean
            expected[i] = reference_loss_gradient(prediction[i] - target, config) / count
            continue
        noise = (x_t - (1 - t) * data[i]) / t
        v = noise - data[i]
        low, high = config.guidance_time_range
        sample_slice = next(name for name in SLICE_NAMES if plan.slice(name).start <= i < plan.slice(name).stop)
        if config.guidance_ratio and low < t < high and sample_slice in config.guidance_slices:
            tt = torch.tensor([t])
            conditional = analytic(x_t[None], tt, tt, labels[i : i + 1])[0]
            unconditional = analytic(x_t[None], tt, tt, torch.tensor([NULL]))[0]
            v = v + config.guidance_ratio * (conditional - unconditional)
        residual = reference_rcgm_residual(x_t, t, r, v, prediction[i], labels[i], config.estimate_order)
        weight = math.tan((1 - (t - r)) * math.pi / 2.5) + 1 if config.time_weighting else 1.0
        expected[i] = weight * reference_loss_gradient(residual.clamp(-1, 1), config) / count
    one_step = plan.slice("one_step")
    if config.rectify_coefficient and one_step.stop > one_step.start:
        rectify_call = [c for c in probe.calls if not c["grad"] and c["x"].shape[0] == 2 * (one_step.stop - one_step.start)][-1]
        n = one_step.stop - one_step.start
        out = analytic(rectify_call["x"], rectify_call["t"], rectify_call["r"], rectify_call["labels"])
        assert torch.allclose(rectify_call["t"][:n], -rectify_call["t"][n:]), "fake half at -t, real half at +t"
        delta = (out[:n] - out[n:]).clamp(-1, 1)
        # the reference: k * loss(F, F - Delta_v).mean() over the one-step samples; here the
        # mean is over their expected number, count * share, equal to n when the batch is whole periods
        share = config.proportions.one_step / sum(config.proportions.as_dict().values())
        shape = config if config.rectify_loss is None else dataclasses.replace(config, loss=config.rectify_loss)
        for j in range(n):
            expected[one_step.start + j] += config.rectify_coefficient * reference_loss_gradient(delta[j], shape) / (count * share)
    return expected


@pytest.mark.parametrize("preset", ["twinflow", "rcgm", "flow_matching"])
def test_gradient_matches_slow_reference(preset):
    probe, result, data, labels = run(preset)
    config = objective_config(preset)
    expected = expected_gradient(probe, result, data, labels, config)
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", ["twinflow", "rcgm"])
def test_gradient_matches_reference_with_barron_loss(preset):
    """loss: barron reweights L_base, L_adv and L_rectify alike (the reference sends all three
    through its loss function)."""
    probe, result, data, labels = run(preset, seed=2, loss="barron")
    expected = expected_gradient(probe, result, data, labels, objective_config(preset, loss="barron"))
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss, rectify_loss", [("barron", "l2"), ("l2", "barron")])
def test_rectify_loss_can_differ_from_the_base_loss(loss, rectify_loss):
    probe, result, data, labels = run("twinflow", seed=5, loss=loss, rectify_loss=rectify_loss)
    expected = expected_gradient(probe, result, data, labels, objective_config("twinflow", loss=loss, rectify_loss=rectify_loss))
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)
    same = run("twinflow", seed=5, loss=loss)[0].output.grad
    one_step = result.plan.slice("one_step")
    assert not torch.allclose(same[one_step], probe.output.grad[one_step])  # only the one-step rows differ
    torch.testing.assert_close(same[one_step.stop:], probe.output.grad[one_step.stop:])


@pytest.mark.parametrize("batch, position", [(1, 0), (1, 3), (2, 2), (3, 1), (5, 6)])
def test_gradient_matches_reference_for_small_rotated_batches(batch, position):
    """Batches smaller than the four slices train: they hold the slices of their stream positions."""
    probe, result, data, labels = run("twinflow", seed=4, batch=batch, stream_position=position)
    pattern = ("one_step", "multi_step", "any_step", "fake")
    held = [pattern[(position + i) % 4] for i in range(batch)]
    assert result.plan.sizes == {name: held.count(name) for name in pattern}
    expected = expected_gradient(probe, result, data, labels, objective_config("twinflow"))
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("slices", [("any_step",), ("multi_step",), ("one_step", "any_step")])
def test_guidance_target_only_on_the_chosen_slices(slices):
    """objective.guidance_slices: the other real slices keep the plain velocity v as the
    target's true step (and the whole batch still matches the slow reference)."""
    probe, result, data, labels = run("twinflow", seed=6, guidance_slices=list(slices))
    expected = expected_gradient(probe, result, data, labels, objective_config("twinflow", guidance_slices=list(slices)))
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)
    spec = run("twinflow", seed=6)[0].output.grad
    for name in ("multi_step", "any_step"):
        rows = result.plan.slice(name)
        assert torch.equal(spec[rows], probe.output.grad[rows]) == (name in slices), name


@pytest.mark.parametrize("order", [0, 1, 3])
def test_gradient_matches_reference_for_other_orders(order):
    probe, result, data, labels = run("twinflow", seed=3, estimate_order=order)
    expected = expected_gradient(probe, result, data, labels, objective_config("twinflow", estimate_order=order))
    torch.testing.assert_close(probe.output.grad, expected, rtol=1e-4, atol=1e-7)


def test_rectify_flows_only_through_one_step_prediction():
    with_rectify = run("twinflow", seed=1)
    without = run("twinflow", seed=1, rectify_coefficient=0.0)
    difference = with_rectify[0].output.grad - without[0].output.grad
    one_step = with_rectify[1].plan.slice("one_step")
    assert difference[one_step].abs().sum() > 0
    assert difference[one_step.stop :].abs().sum() == 0


def test_network_calls_and_slices_per_preset():
    twinflow = run("twinflow")[1]
    # fake samples, guidance (batched), the gradient call, 2 RCGM sub-steps, Delta_v (batched)
    assert twinflow.network_calls == 6
    assert all(size > 0 for size in twinflow.plan.sizes.values())
    rcgm = run("rcgm")[1]
    assert rcgm.plan.sizes["fake"] == 0 and float(rcgm.rectify) == 0 and float(rcgm.adversarial) == 0
    assert rcgm.network_calls == 4
    probe, flow, data, labels = run("flow_matching")
    assert flow.network_calls == 1 and len(probe.calls) == 1
    assert flow.plan.sizes == {"one_step": 0, "multi_step": SHAPE[0], "any_step": 0, "fake": 0}
    assert torch.equal(flow.plan.time, flow.plan.target_time)


def test_flow_matching_loss_value_is_weighted_mse():
    probe, result, data, labels = run("flow_matching")
    main = probe.calls[0]
    t = main["t"].view(-1, 1, 1, 1)
    noise = (main["x"] - (1 - t) * data) / t
    # order 0: target = F - clamp(F - v), so the loss is the mean of the clamped residual squared
    mse = (probe.output.detach() - (noise - data)).clamp(-1, 1).square().flatten(1).mean(1)
    expected = (mse * time_weight(main["t"], main["r"])).mean()
    torch.testing.assert_close(result.loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_plan_times_follow_the_spec():
    config = objective_config("twinflow")
    plan = plan_batch(400, config, torch.Generator().manual_seed(0))
    one, multi, anyway, fake = (plan.slice(name) for name in ("one_step", "multi_step", "any_step", "fake"))
    assert torch.all(plan.time[one] == 1) and torch.all(plan.target_time[one] == 0)
    t, r = plan.time[multi], plan.target_time[multi]
    assert torch.all(r <= t) and torch.all(r >= t - 0.05 * t - 1e-7) and (t - r).max() > 0
    t, r = plan.time[anyway], plan.target_time[anyway]
    assert torch.all(r <= t) and torch.all(r >= 0) and (t - r).max() > 0.5
    assert torch.all(plan.time[fake] <= 0) and torch.equal(plan.time[fake], plan.target_time[fake])


def test_time_distribution_beta_is_used_and_reproducible():
    config = objective_config("flow_matching", time_distribution=(4.0, 1.0, 1.0))
    first = plan_batch(2000, config, torch.Generator().manual_seed(5)).time
    again = plan_batch(2000, config, torch.Generator().manual_seed(5)).time
    assert torch.equal(first, again)
    assert abs(float(first.mean()) - 0.8) < 0.02  # Beta(4, 1) has mean 4/5


def test_slice_sizes_and_small_batches():
    config = objective_config("twinflow")
    assert slice_sizes(8, config) == {"one_step": 2, "multi_step": 2, "any_step": 2, "fake": 2}
    # 6 samples: two of the first two slices here, two of the last two in the next batch
    assert slice_sizes(6, config) == {"one_step": 2, "multi_step": 2, "any_step": 1, "fake": 1}
    assert slice_sizes(6, config, start=6) == {"one_step": 1, "multi_step": 1, "any_step": 2, "fake": 2}
    custom = objective_config("twinflow", proportions={"fake": 2.0})
    assert slice_sizes(10, custom)["fake"] == 4
    assert slice_sizes(3, config) == {"one_step": 1, "multi_step": 1, "any_step": 1, "fake": 0}
    assert slice_sizes(1, config, start=3) == {"one_step": 0, "multi_step": 0, "any_step": 0, "fake": 1}
    assert slice_sizes(1, objective_config("flow_matching")) == {"one_step": 0, "multi_step": 1, "any_step": 0, "fake": 0}
    with pytest.raises(ValueError, match="at least one sample"):
        slice_sizes(0, config)


@pytest.mark.parametrize("proportions", [
    {"one_step": 1, "multi_step": 1, "any_step": 1, "fake": 1},
    {"one_step": 2, "multi_step": 1, "any_step": 1, "fake": 0},
    {"one_step": 0.5, "multi_step": 1, "any_step": 0.25, "fake": 3},
    {"one_step": 3, "multi_step": 7, "any_step": 0, "fake": 5},
])
def test_slice_schedule_keeps_proportions_over_every_window(proportions):
    """Closed form: a period of sum(w) samples holds w_i of slice i, and every run of n
    consecutive samples holds each slice within one sample of n times its share."""
    schedule = SliceSchedule(objective_config("twinflow", proportions=proportions).proportions)
    total = sum(proportions.values())
    expected = {name: round(schedule.period * value / total) for name, value in proportions.items()}
    assert schedule.counts(0, schedule.period) == expected
    for start in range(0, 2 * schedule.period, 3):
        for count in (1, 2, 5, schedule.period, 3 * schedule.period + 1):
            counts = schedule.counts(start, count)
            assert sum(counts.values()) == count
            for name, value in proportions.items():
                assert abs(counts[name] - count * value / total) < 2, (start, count, name)
    # a window is the sum of its parts, whatever the split (micro-steps, ranks)
    parts = [schedule.counts(start, 3) for start in range(5, 5 + 3 * 7, 3)]
    assert schedule.counts(5, 21) == {name: sum(part[name] for part in parts) for name in expected}


def test_stream_positions_cover_each_step_window_once():
    """Steps, micro-steps, ranks and positions tile the sample stream: one optimizer step of
    accumulation 2 over 2 processes with 1 sample each is the window of 4 stream positions."""
    positions = [stream_position(step, micro, 2, rank, 2, 1) for step in range(3) for micro in range(2) for rank in range(2)]
    assert positions == list(range(12))
    assert stream_position(5, 1, 4, 3, 8, 2) == ((5 * 4 + 1) * 8 + 3) * 2
    schedule = SliceSchedule(objective_config("twinflow").proportions)
    for step in range(3):  # each step's window holds one sample of each slice
        window = [schedule.counts(stream_position(step, m, 2, r, 2, 1), 1) for m in range(2) for r in range(2)]
        assert {name: sum(counts[name] for counts in window) for name in window[0]} == dict.fromkeys(window[0], 1)


def test_complicated_proportions_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="objective.proportions"):
        objective_config("twinflow", proportions={"one_step": 1 / 97, "multi_step": 1 / 89, "any_step": 1 / 83})


def test_time_weight_closed_form():
    t = torch.tensor([1.0, 0.5, 0.7, -0.3])
    r = torch.tensor([0.0, 0.5, 0.2, -0.3])
    expected = torch.tensor([1.0, math.tan(math.pi / 2.5) + 1, math.tan(0.5 * math.pi / 2.5) + 1, math.tan(math.pi / 2.5) + 1])
    torch.testing.assert_close(time_weight(t, r), expected)


def test_barron_loss_value_and_gradient():
    """The reference's barron_reweighting_loss (alpha 1, c 1e-3), written as it writes it."""
    prediction = (torch.randn(5, 3) * torch.tensor([[1.0], [1e-2], [1e-3], [1e-4], [3.0]])).requires_grad_(True)
    target = torch.zeros(5, 3)
    loss = per_sample_loss(prediction, target, "barron", 1e-3)
    c = 1e-3
    mse = torch.mean((prediction - target) ** 2, dim=1)
    rmse_sq_norm = mse / (c**2 + 1e-8)
    weight = (rmse_sq_norm / abs(1.0 - 2.0) + 1.0).pow((1.0 - 2.0) / 2.0)
    torch.testing.assert_close(loss, mse * weight.detach() / c, rtol=1e-6, atol=0)
    loss.sum().backward()
    torch.testing.assert_close(prediction.grad, (2 * prediction / 3 * weight[:, None] / c).detach(), rtol=1e-6, atol=0)
    # about mse / sqrt(mse + c^2): the spec's approximate form, 1 % apart where mse ~ c^2
    torch.testing.assert_close(loss, (mse / torch.sqrt(mse + c**2)).detach(), rtol=1e-2, atol=0)


def test_rcgm_target_with_exact_teacher_is_a_fixed_point():
    """If the model already predicts the exact average velocity of the teacher's flow, R = 0."""

    def linear_flow(x, t, r, labels):  # all data at the origin: the exact velocity is x_t / t
        return x / t.view(-1, 1)

    x_t = torch.randn(6, 3)
    t = torch.tensor([0.9, 0.8, 0.5, 0.3, 0.6, 1.0])
    r = torch.tensor([0.1, 0.0, 0.25, 0.295, 0.6, 0.0])
    velocity = x_t / t.view(-1, 1)  # true instantaneous velocity, also the exact average one
    target, calls = rcgm_target(linear_flow, LinearPath(), x_t, t, r, velocity, velocity.clone(), None, 2, 0.01, 1.0)
    torch.testing.assert_close(target, velocity, atol=1e-4, rtol=1e-4)
    assert calls == 2


def test_guidance_needs_null_condition_and_batch_sizes_must_agree():
    objective = TwinFlowObjective(objective_config("twinflow"))
    data, labels = torch.zeros(SHAPE), torch.zeros(SHAPE[0], dtype=torch.long)
    with pytest.raises(ValueError, match="null_cond"):
        objective(Probe(), data, labels, None)
    with pytest.raises(ValueError, match="cond must have batch size 12"):
        objective(Probe(), data, labels[:3], labels[:3])


def test_image_free_mode_ignores_the_data():
    objective = TwinFlowObjective(objective_config("twinflow", image_free=True))
    labels = torch.arange(SHAPE[0]) % 10
    losses = []
    for data in (torch.zeros(SHAPE), torch.ones(SHAPE)):
        probe = Probe()
        result = objective(probe, data, labels, torch.full_like(labels, NULL), generator=torch.Generator().manual_seed(0))
        losses.append(result.loss.detach())
    assert torch.equal(losses[0], losses[1])
    objective = TwinFlowObjective(objective_config("twinflow"))
    real = [objective(Probe(), d, labels, torch.full_like(labels, NULL), generator=torch.Generator().manual_seed(0)).loss.detach()
            for d in (torch.zeros(SHAPE), torch.ones(SHAPE))]
    assert not torch.equal(real[0], real[1])


def test_same_generator_same_loss():
    first = run("twinflow", seed=7)[1].loss.detach()
    second = run("twinflow", seed=7)[1].loss.detach()
    third = run("twinflow", seed=8)[1].loss.detach()
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="unknown objective preset 'twin'"):
        objective_config("twin")
    with pytest.raises(ValueError, match="objective.rectify_loss"):
        objective_config("twinflow", rectify_loss="l1")
    with pytest.raises(ValueError, match="estimate_ordr"):
        objective_config("twinflow", estimate_ordr=2)


@pytest.mark.parametrize("overrides, field", [
    ({"consistency_ratio": 1.5}, "consistency_ratio"),  # r could fall below 0: real samples in the fake half
    ({"consistency_ratio": -0.1}, "consistency_ratio"),
    ({"multi_step_max_gap": 2}, "multi_step_max_gap"),
    ({"residual_clamp": 0}, "residual_clamp"),  # would zero L_base
    ({"residual_clamp": -1.0}, "residual_clamp"),
    ({"estimate_order": -1}, "estimate_order"),
    ({"estimate_order": 1.5}, "estimate_order"),
    ({"estimate_order": True}, "estimate_order"),  # a bool is not a count
    ({"small_step": 0}, "small_step"),
    ({"guidance_ratio": -0.5}, "guidance_ratio"),
    ({"rectify_coefficient": -1}, "rectify_coefficient"),
    ({"barron_constant": 0}, "barron_constant"),
    ({"barron_constant": "tiny"}, "barron_constant"),
    ({"time_weighting": "yes"}, "time_weighting"),
    ({"image_free": 1}, "image_free"),
    ({"time_distribution": (1.0, 0.0, 1.0)}, "time_distribution"),
    ({"time_distribution": "abc"}, "time_distribution"),
    ({"guidance_time_range": (0.8, 0.2)}, "guidance_time_range"),
    ({"guidance_time_range": [0.5]}, "guidance_time_range"),
    ({"guidance_slices": ["fake"]}, "guidance_slices"),
    ({"guidance_slices": []}, "guidance_slices"),
    ({"guidance_slices": ["any_step", "any_step"]}, "guidance_slices"),
    ({"proportions": {"fake": -1.0}}, "proportions.fake"),
    ({"proportions": {"fake": "half"}}, "proportions.fake"),
    ({"proportions": 3}, "proportions"),
    ({"residual_clamp": float("nan")}, "residual_clamp"),
])
def test_objective_ranges_and_types_are_named(overrides, field):
    with pytest.raises(ValueError, match=rf"objective\.{field} "):
        objective_config("twinflow", **overrides)


def test_objective_range_checks_hold_for_the_dataclass_itself():
    from twinflow.objective import ObjectiveConfig

    with pytest.raises(ValueError, match=r"objective\.consistency_ratio"):
        ObjectiveConfig(consistency_ratio=2.0)
    with pytest.raises(ValueError, match=r"objective\.residual_clamp"):
        ObjectiveConfig(residual_clamp=0.0)


def test_objective_edge_values_and_presets_are_valid():
    from twinflow.objective import OBJECTIVE_PRESETS

    assert set(OBJECTIVE_PRESETS) >= {"twinflow", "rcgm", "flow_matching"}  # built at import: all pass the checks
    config = objective_config(
        "twinflow", consistency_ratio=1, multi_step_max_gap=0, estimate_order=0, guidance_ratio=0,
        rectify_coefficient=0, guidance_time_range=[0, 1], barron_constant="1e-3",
    )
    assert config.consistency_ratio == 1 and config.barron_constant == 1e-3  # YAML's "1e-3" string is a number
    assert objective_config("twinflow", consistency_ratio=0.0).consistency_ratio == 0.0
