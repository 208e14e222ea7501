"""The sampling loop of the unified sampler: the time grid, the target time of each style, the
re-noising and :func:`sample` (the steps are described in :mod:`twinflow.sampler`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from twinflow.conditions import check_batch, concatenate
from twinflow.path import Endpoints, LinearPath, Path
from twinflow.randomness import Generators, randn_like
from twinflow.regimes import sampler_style
from twinflow.sampler.config import AUTO, SamplerConfig

Model = Callable[[Tensor, Tensor, Tensor, Any], Tensor]


def time_grid(config: SamplerConfig) -> Tensor:
    """The decreasing float64 time grid, from about 1 down to exactly 0.

    ``n`` = ``config.intervals``; ``s = linspace(g0, 1 - g1, n)`` (when ``g1 == 0``:
    ``linspace(g0, 1, n + 1)`` without its last point, so the last time is not 0 twice),
    warped by ``s -> (1 - (1 - s^a)^b)^c``, then ``t = 1 - s`` and a final 0 is appended.
    The result has ``n + 1`` points; with ``n = 1`` it is ``[1 - warp(g0), 0]``.
    """
    config.validate()
    count = config.intervals
    start_gap, end_gap = config.gaps
    if end_gap == 0.0:
        progress = torch.linspace(start_gap, 1.0, count + 1, dtype=torch.float64)[:-1]
    else:
        progress = torch.linspace(start_gap, 1.0 - end_gap, count, dtype=torch.float64)
    a, b, c = config.time_warp
    progress = (1 - (1 - progress**a) ** b) ** c
    times = torch.cat([1 - progress, torch.zeros(1, dtype=torch.float64)])
    if not bool((times[1:] < times[:-1]).all()):
        # Only reachable with extreme warps that collapse neighbouring points in float64.
        raise ValueError(
            f"time_warp {config.time_warp!r} with gaps {config.gaps!r} gives a time grid that is "
            f"not strictly decreasing: {times.tolist()}"
        )
    return times


def target_time(style: str, t_cur: float, t_next: float) -> float:
    """The target time ``r`` of a call at ``t_cur`` (step to ``t_next``) for a style
    (:data:`twinflow.regimes.REGIMES` lists them)."""
    style = sampler_style(style)
    if style == "few":
        return 0.0
    if style == "any":
        return t_next
    return t_cur  # "mul"


def step_stochastic_ratio(
    stochastic_ratio: float | str, t_cur: float, t_next: float, path: Path | None = None
) -> float:
    """rho for one step ``t_cur -> t_next``.

    A number is returned as is. ``"auto"`` gives
    ``clamp(2 |t_next - t_cur| alpha(t_cur) / alpha(t_next)^2, 0, 1)`` (1 when
    ``alpha(t_next) = 0``), which on the linear path (``alpha(t) = t``) is the spec's
    ``clamp(2 |t_next - t_cur| t_cur / t_next^2, 0, 1)``.
    """
    if not isinstance(stochastic_ratio, str):
        return float(stochastic_ratio)
    if stochastic_ratio != AUTO:
        raise ValueError(
            f"stochastic_ratio must be in [0, 1] or {AUTO!r}, got {stochastic_ratio!r}"
        )
    path = LinearPath() if path is None else path
    alpha_cur = float(path.alpha(torch.tensor(abs(t_cur), dtype=torch.float64)))
    alpha_next = float(path.alpha(torch.tensor(abs(t_next), dtype=torch.float64)))
    if alpha_next == 0.0:
        return 1.0
    return min(max(2.0 * abs(t_next - t_cur) * alpha_cur / alpha_next**2, 0.0), 1.0)


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    Attributes:
        sample: the generated batch, same shape and dtype as the noise.
        trajectory: when requested, ``x`` at every grid time (``len(times)`` tensors, the first
            the noise, the last equal to ``sample``); otherwise ``None``.
        network_calls: network evaluations per sample (the NFE). A guided call runs the
            conditional and unconditional halves in one batched forward but counts as 2.
        times: the time grid that was used (float64, decreasing to 0).
    """

    sample: Tensor
    trajectory: list[Tensor] | None
    network_calls: int
    times: Tensor


# -- the sampler -------------------------------------------------------------------------------


EXTRAPOLATION_FIRST_STEP = 2
"""Index (from 0) of the first step whose endpoints are extrapolated: the reference's ``i > 1``."""


def renoise(
    ends: Endpoints,
    previous: Endpoints | None,
    t_cur: float,
    t_next: float,
    config: SamplerConfig,
    path: Path,
    generator: Generators,
    like: Tensor,
    step_index: int = EXTRAPOLATION_FIRST_STEP,
) -> Tensor:
    """The end of one sampler step: from this step's endpoints to ``x`` at ``t_next``.

    Extrapolates both endpoints from the previous step's (un-extrapolated) ones by kappa when
    ``step_index >= 2`` and ``t_next > 0`` (the last step returns its own ``x_hat``), then
    re-noises: ``x_next = interpolate(x_hat, sqrt(1 - rho) z_hat + sqrt(rho) eps, t_next)``.
    ``like`` gives the shape, dtype and device of the fresh noise ``eps``.
    Shared by :func:`sample` and the diffusers-style scheduler.
    """
    current = ends
    kappa = config.extrapolation_ratio  # kappa in the paper
    if kappa != 0.0 and previous is not None and step_index >= EXTRAPOLATION_FIRST_STEP and t_next > 0.0:
        current = Endpoints(
            data=ends.data + kappa * (ends.data - previous.data),
            noise=ends.noise + kappa * (ends.noise - previous.noise),
        )
    # "auto" rho is recomputed at every step; the reference overwrites the setting with
    # the first step's value and reuses it afterwards (a bug, not reproduced).
    rho = step_stochastic_ratio(config.stochastic_ratio, t_cur, t_next, path)
    noise_part = current.noise
    if rho > 0.0 and t_next > 0.0:
        fresh = randn_like(like, generator)  # drawn on the generator's device
        noise_part = math.sqrt(1.0 - rho) * current.noise + math.sqrt(rho) * fresh
    return path.interpolate(current.data, noise_part, t_next)



def _evaluate(
    model: Model,
    x: Tensor,
    t: float,
    r: float,
    cond: object,
    null_cond: object,
    config: SamplerConfig,
    model_dtype: torch.dtype,
    time_dtype: torch.dtype,
) -> tuple[Tensor, int]:
    """One (possibly guided) network evaluation at the scalar times ``t``, ``r``.

    Returns the prediction in ``x``'s dtype and the number of evaluations per sample it cost.
    """
    batch = x.shape[0]
    low, high = config.guidance_interval
    guided = config.guidance_scale != 0.0 and low <= t <= high
    copies = 2 if guided else 1
    inputs = x.to(model_dtype)
    time = torch.full((batch * copies,), t, dtype=time_dtype, device=x.device)
    target = torch.full((batch * copies,), r, dtype=time_dtype, device=x.device)
    if guided:
        # One batched forward for the conditional and the unconditional halves.
        both_conditions = concatenate([cond, null_cond])
        output = model(torch.cat([inputs, inputs], dim=0), time, target, both_conditions)
    else:
        output = model(inputs, time, target, cond)
    expected = (batch * copies, *x.shape[1:])
    if not isinstance(output, Tensor) or tuple(output.shape) != expected:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"model must return a tensor of shape {expected}, got {shape}")
    output = output.to(x.dtype)
    if guided:
        conditional, unconditional = output[:batch], output[batch:]
        output = unconditional + config.guidance_scale * (conditional - unconditional)
    return output, copies


def sample(
    model: Model,
    noise: Tensor,
    cond: object = None,
    config: SamplerConfig | None = None,
    *,
    null_cond: object = None,
    path: Path | None = None,
    generator: Generators = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Generate a batch from ``noise`` with the unified sampler. Stateless, under ``no_grad``.

    Args:
        model: ``model(x_t, t, r, cond) -> F`` with ``t``, ``r`` float tensors of shape (B,)
            (float64 when the noise is float64, float32 otherwise).
        noise: the starting noise ``z`` at ``t = 1``, shape (B, ...).
        cond: the condition passed through to the model (labels, embeddings, a mapping or a
            tuple of tensors, ...); every tensor in it must have batch size B. May be ``None``.
        config: the sampler settings; ``None`` means ``SamplerConfig()`` (one step, ``few``).
        null_cond: the "empty" condition for classifier-free guidance, same structure as
            ``cond``; required when ``config.guidance_scale != 0``.
        path: the probability path used to recover and re-noise; default :class:`LinearPath`.
        generator: random source for the fresh noise of stochastic steps (on any device: the
            noise is drawn there and moved to the sample's device). ``None`` uses torch's
            global RNG. Deterministic steps (rho = 0) and the final step draw nothing; a
            stochastic step draws one noise-shaped tensor. A list of B generators draws row ``i``
            from generator ``i`` (a sample then does not depend on its batch).
        return_trajectory: keep ``x`` at every grid time in the result.

    The sampler state is kept in at least float32 (float64 stays float64); the model sees
    ``x`` in the noise's dtype, and the sample comes back in it.

    Order 2 (Heun). The first call gives ``F_1`` and the endpoints ``(x_hat_1, z_hat_1)``; the
    deterministic (rho = 0) re-noising gives ``x'`` at ``t_next``; unless ``t_next == 0`` the
    network is called again at ``(x', t_next)`` with the style's target time for that point
    (``few``: 0; ``any`` and ``mul``: ``t_next``), giving ``F_2`` and ``x_hat_2``. The step
    then lands, for rho = 0, on Heun's point ``x - (t_cur - t_next) (F_1 + F_2) / 2``; the data
    endpoint is the average ``(x_hat_1 + x_hat_2) / 2`` and the noise endpoint is the one
    that interpolates to Heun's point at ``t_next``, and rho, kappa and the re-noising act on
    this pair as in a first-order step. (Averaging both endpoints, each recovered from its
    own point, would land on ``x'`` again: both pairs interpolate to ``x'`` at ``t_next``, so
    the second call would be wasted.) The correction is meant for ``mul``; with ``any`` and an
    exact average-velocity model the first-order step is already exact and the average with
    an instantaneous velocity only spoils it.
    """
    config = SamplerConfig() if config is None else config
    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config must be a SamplerConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(noise, Tensor) or noise.ndim < 1 or noise.shape[0] < 1:
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor with a non-empty batch dimension, got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    batch = noise.shape[0]
    check_batch(cond, batch, "cond")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch}")
    if config.guidance_scale != 0.0:
        if null_cond is None:
            raise ValueError(
                f"guidance_scale={config.guidance_scale} needs null_cond (the empty condition)"
            )
        check_batch(null_cond, batch, "null_cond")
    path = LinearPath() if path is None else path

    model_dtype = noise.dtype
    work_dtype = torch.promote_types(noise.dtype, torch.float32)
    time_dtype = torch.float64 if work_dtype == torch.float64 else torch.float32
    times = time_grid(config)
    grid = times.tolist()

    with torch.no_grad():
        x = noise.to(work_dtype)
        trajectory = [noise] if return_trajectory else None
        network_calls = 0
        previous: Endpoints | None = None  # un-extrapolated endpoints of the previous step

        for index, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            prediction, calls = _evaluate(
                model, x, t_cur, target_time(config.style, t_cur, t_next),
                cond, null_cond, config, model_dtype, time_dtype,
            )
            network_calls += calls
            ends = path.recover(x, prediction, t_cur)

            if config.order == 2 and t_next > 0.0:
                # Deterministic (rho = 0) first-order point at t_next for the second call.
                x_first = path.interpolate(ends.data, ends.noise, t_next)
                # The reference calls the network here without a target time (a bug); the
                # style's target time for this point is passed instead.
                second, calls = _evaluate(
                    model, x_first, t_next, target_time(config.style, t_next, t_next),
                    cond, null_cond, config, model_dtype, time_dtype,
                )
                network_calls += calls
                # Heun's trapezoidal rule for dx/dt = F (F is the path velocity d x_t / dt at
                # each point), then endpoints that land exactly there when rho = 0. (The
                # reference instead averages z_hat around x / gamma(t_cur), which divides by
                # zero at t_cur = 1 and amplifies errors just below it.)
                x_heun = x - (t_cur - t_next) * 0.5 * (prediction + second)
                data = 0.5 * (ends.data + path.recover(x_first, second, t_next).data)
                time_next = torch.tensor(t_next, dtype=work_dtype, device=x.device)
                noise_end = (x_heun - path.gamma(time_next) * data) / path.alpha(time_next)
                ends = Endpoints(data=data, noise=noise_end)

            x = renoise(ends, previous, t_cur, t_next, config, path, generator, like=x, step_index=index)
            previous = ends
            if trajectory is not None:
                trajectory.append(x.to(model_dtype))

    result = x.to(model_dtype)
    if trajectory is not None:
        trajectory[-1] = result
    return SampleResult(
        sample=result, trajectory=trajectory, network_calls=network_calls, times=times
    )
