"""The unified any-step sampler (UCGM-S with TwinFlow's step styles), spec section 3.

One loop covers one-step, few-step, any-step and ordinary multi-step sampling. The network
follows the project contract ``model(x_t, t, r, cond) -> F``: ``F`` is the average velocity
from ``t`` to the target time ``r <= t`` (``r = t``: instantaneous velocity). Time runs from
``t = 1`` (noise) to ``t = 0`` (data), and every recovery and re-noising goes through a
:class:`~twinflow.path.Path` (linear by default), ``x_t = alpha(t) z + gamma(t) x``.

Each step ``t_cur -> t_next`` of the grid (:func:`time_grid`):

1. call ``F = model(x, t_cur, r)`` with ``r`` given by the style: ``0`` (``few``), ``t_next``
   (``any``) or ``t_cur`` (``mul``);
2. recover both endpoints, ``x_hat`` and ``z_hat`` (``path.recover``);
3. optionally a Heun correction (order 2), see :func:`sample`;
4. optionally extrapolate both endpoints from the previous step's (kappa), from the third step
   on and never on the last one, as the reference does;
5. re-noise: ``x_next = gamma(t_next) x_hat + alpha(t_next) (sqrt(1 - rho) z_hat + sqrt(rho) eps)``.
   ``rho = 0`` is the deterministic ODE-like sampler, ``rho = 1`` consistency-style sampling.
"""

from twinflow.sampler.config import (
    AUTO,
    SAMPLER_PRESETS,
    STYLES,
    SamplerConfig,
    override_sampler,
    resolve_sampler,
    sampler_config,
    sampler_from_spec,
    split_specs,
)
from twinflow.sampler.sampling import SampleResult, renoise, sample, step_stochastic_ratio, target_time, time_grid

__all__ = [
    "AUTO",
    "SAMPLER_PRESETS",
    "STYLES",
    "SampleResult",
    "SamplerConfig",
    "override_sampler",
    "renoise",
    "resolve_sampler",
    "sample",
    "sampler_config",
    "sampler_from_spec",
    "split_specs",
    "step_stochastic_ratio",
    "target_time",
    "time_grid",
]
