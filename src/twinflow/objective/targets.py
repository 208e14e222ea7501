"""Regression targets of the objective: guidance-enhanced velocity and the RCGM target.

Both run without gradient: targets are constants for the optimiser.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from twinflow.conditions import Condition, concatenate, select
from twinflow.path import Path
from twinflow.randomness import rand, randn_like

Network = Callable[[Tensor, Tensor, Tensor, Condition], Tensor]


@torch.no_grad()
def guidance_enhanced_velocity(
    teacher: Network,
    x_t: Tensor,
    time: Tensor,
    velocity: Tensor,
    cond: Condition,
    null_cond: Condition,
    ratio: float,
    time_range: tuple[float, float],
    eligible: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Training-time CFG (spec 2.2): ``v + w * (F_teacher(x_t, t, t, c) - F_teacher(x_t, t, t, e))``.

    Only samples with ``low < t < high`` (strict, as in the reference) are enhanced, so the
    one-step slice at ``t = 1`` keeps the plain target under the default range [0, 1].
    ``eligible`` (a boolean mask over the batch, or None for all) narrows that further.
    The conditional and unconditional calls share one batched call, hence one dropout / noise
    state. Returns the target and the number of network calls made (0 or 1).
    """
    low, high = time_range
    inside = (time > low) & (time < high)
    if eligible is not None:
        inside = inside & eligible
    chosen = inside.nonzero().squeeze(1)
    if ratio == 0 or chosen.numel() == 0:
        return velocity, 0
    count = chosen.numel()
    inputs = x_t[chosen].repeat(2, *([1] * (x_t.ndim - 1)))
    times = time[chosen].repeat(2)
    conditions = concatenate([select(cond, chosen), select(null_cond, chosen)])
    conditional, unconditional = teacher(inputs, times, times, conditions).split(count)
    enhanced = velocity.clone()
    enhanced[chosen] = velocity[chosen] + ratio * (conditional - unconditional)
    return enhanced, 1


@torch.no_grad()
def rcgm_target(
    teacher: Network,
    path: Path,
    x_t: Tensor,
    time: Tensor,
    target_time: Tensor,
    velocity: Tensor,
    prediction: Tensor,
    cond: Condition,
    order: int,
    small_step: float,
    clamp: float,
) -> tuple[Tensor, int]:
    """The N-th order recursive consistency target of RCGM (spec 2.3).

    ``velocity`` is the (guidance-enhanced) true velocity ``v``; ``prediction`` is ``F_theta``.
    For a sample with ``t - r >= dt``: take one true step ``x' = x_t - dt v`` to ``t' = t - dt``,
    jump from ``t'`` to ``r`` in ``order`` teacher sub-steps accumulating the displacement ``D``,
    and form the residual ``R = ((t - r) F_theta - D) / dt - v``. Shorter jumps (and order 0)
    use ``R = F_theta - v``, i.e. flow matching. The target is ``F_theta - clamp(R)``.
    Returns the target and the number of teacher calls made.
    """
    prediction = prediction.detach()
    residual = prediction - velocity
    calls = 0
    long_jump = long_jumps(time, target_time, small_step)
    if order > 0 and long_jump.numel() > 0:
        x_start, v = x_t[long_jump], velocity[long_jump]
        t, r = time[long_jump], target_time[long_jump]
        start_time = t - small_step  # t' = max(t - dt, r) = t - dt on these samples
        x_current = path.jump(x_start, v, t, start_time)  # x' = x_t - dt * v
        x_after_true_step, t_current = x_current, start_time
        sub_cond = select(cond, long_jump)
        for step in range(1, order + 1):
            t_next = start_time + (r - start_time) * step / order
            teacher_velocity = teacher(x_current, t_current, t_next, sub_cond)
            x_current = path.jump(x_current, teacher_velocity, t_current, t_next)
            t_current = t_next
            calls += 1
        teacher_displacement = x_after_true_step - x_current  # D
        model_displacement = x_start - path.jump(x_start, prediction[long_jump], t, r)  # (t - r) F
        residual[long_jump] = (model_displacement - teacher_displacement) / small_step - v
    return prediction - residual.clamp(-clamp, clamp), calls


def long_jumps(time: Tensor, target_time: Tensor, small_step: float) -> Tensor:
    """Indices of the samples whose RCGM residual is the teacher-consistency one (``t - r >= dt``),
    where the prediction enters scaled by ``(t - r) / dt``."""
    return ((time - target_time) >= small_step).nonzero().squeeze(1)


def in_float32(network: Network) -> Network:
    """``network`` called with autocast off: float32 inputs give float32 compute and outputs
    (its weights must be float32)."""

    def call(x: Tensor, time: Tensor, target_time: Tensor, cond: Condition) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return network(x.float(), time, target_time, cond).float()

    return call


def one_step_samples(model: Network, path: Path, noise: Tensor, cond: Condition) -> Tensor:
    """``x_hat`` of the jump from ``t = 1`` to ``r = 0``: the model's own one-step sample."""
    batch = noise.shape[0]
    ones = torch.ones(batch, device=noise.device, dtype=noise.dtype)
    prediction = model(noise, ones, torch.zeros_like(ones), cond)
    return path.recover(noise, prediction, ones).data


@torch.no_grad()
def velocity_difference(
    model: Network, path: Path, samples: Tensor, cond: Condition, generator: torch.Generator, clamp: float
) -> tuple[Tensor, int]:
    """``Delta_v = clamp(F(x_t, -t, -t) - F(x_t, t, t))`` at a random point between fresh noise and
    the model's own samples (spec 2.5): fake-flow velocity minus real-flow velocity.
    One batched call evaluates both halves.
    """
    batch = samples.shape[0]
    noise = randn_like(samples, generator)
    t = rand(batch, generator, samples)
    x_t = path.interpolate(samples, noise, t)
    times = torch.cat([-t, t])
    both = model(torch.cat([x_t, x_t]), times, times, concatenate([cond, cond]))
    fake_velocity, real_velocity = both.split(batch)
    return (fake_velocity - real_velocity).clamp(-clamp, clamp), 1


__all__ = ["guidance_enhanced_velocity", "in_float32", "long_jumps", "rcgm_target", "one_step_samples", "velocity_difference"]
