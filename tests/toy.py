"""A Gaussian toy problem with exact (closed-form) velocities, for tests of samplers and objectives.

Data ``x ~ N(mean, std^2 I)`` in ``dim`` dimensions, noise ``z ~ N(0, I)`` independent of it, and
the linear path of the project (``x_t = t z + (1 - t) x``, ``t = 1`` noise, ``t = 0`` data).
Everything is Gaussian, so per dimension:

* marginal of ``x_t``: mean ``m_t = (1 - t) mean``, std ``sigma_t = sqrt(t^2 + (1 - t)^2 std^2)``;
* ``Cov(z, x_t) = t`` and ``Cov(x, x_t) = (1 - t) std^2``, hence
  ``E[z | x_t] = t (x_t - m_t) / sigma_t^2`` and
  ``E[x | x_t] = mean + (1 - t) std^2 (x_t - m_t) / sigma_t^2``;
* instantaneous velocity ``v(x_t, t) = E[z - x | x_t]
  = (t - (1 - t) std^2) (x_t - m_t) / sigma_t^2 - mean``;
* the probability-flow ODE ``dx/dt = v`` maps the marginal at ``t`` to the one at ``r`` by the
  affine map ``x_r = m_r + (sigma_r / sigma_t) (x_t - m_t)`` (indeed
  ``d sigma_t / dt / sigma_t = (t - (1 - t) std^2) / sigma_t^2``);
* the exact average velocity from ``t`` to ``r`` is ``(x_t - x_r) / (t - r)``.

Every time argument may be a Python float, a 0-d tensor or a per-sample tensor of shape (B,);
it broadcasts over the feature dimension. Import it in tests with ``from toy import GaussianToy``
(pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from twinflow.path import broadcast_time

OracleModel = Callable[[Tensor, Tensor, Tensor, object], Tensor]

ORACLE_KINDS = ("instantaneous", "average")


@dataclass
class GaussianToy:
    """Gaussian data ``N(mean, std^2 I)`` in ``dim`` dimensions with exact flow quantities.

    Attributes:
        mean: data mean, a float or a tensor of shape (dim,).
        std: data standard deviation (> 0), shared by all dimensions.
        dim: number of features; samples have shape (B, dim).
    """

    mean: float | Tensor
    std: float
    dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        if not (isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be a positive finite number, got {self.std!r}")
        if isinstance(self.mean, Tensor) and self.mean.shape not in ((), (self.dim,)):
            raise ValueError(
                f"mean must be a float or have shape ({self.dim},), got {tuple(self.mean.shape)}"
            )

    # -- helpers -------------------------------------------------------------------------------

    def _mean_like(self, like: Tensor) -> Tensor:
        return torch.as_tensor(self.mean, dtype=like.dtype, device=like.device)

    def _time(self, t: Tensor | float, like: Tensor) -> Tensor:
        return broadcast_time(t, like)

    # -- closed forms --------------------------------------------------------------------------

    def marginal_mean(self, t: Tensor | float, like: Tensor) -> Tensor:
        """``m_t = (1 - t) mean``, broadcast like ``like`` (shape (B, dim))."""
        return (1 - self._time(t, like)) * self._mean_like(like)

    def marginal_std(self, t: Tensor | float, like: Tensor) -> Tensor:
        """``sigma_t = sqrt(t^2 + (1 - t)^2 std^2)``, broadcast like ``like``."""
        t = self._time(t, like)
        return torch.sqrt(t**2 + (1 - t) ** 2 * self.std**2)

    def posterior_data(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``E[x | x_t]`` (the ideal ``x_hat``)."""
        time = self._time(t, x_t)
        centred = x_t - self.marginal_mean(t, x_t)
        variance = self.marginal_std(t, x_t) ** 2
        return self._mean_like(x_t) + (1 - time) * self.std**2 * centred / variance

    def posterior_noise(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``E[z | x_t]`` (the ideal ``z_hat``)."""
        time = self._time(t, x_t)
        centred = x_t - self.marginal_mean(t, x_t)
        variance = self.marginal_std(t, x_t) ** 2
        return time * centred / variance

    def velocity(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Instantaneous velocity ``v(x_t, t) = E[z - x | x_t]``
        ``= (t - (1 - t) std^2) (x_t - m_t) / sigma_t^2 - mean``."""
        time = self._time(t, x_t)
        mean = self._mean_like(x_t)
        centred = x_t - (1 - time) * mean
        variance = time**2 + (1 - time) ** 2 * self.std**2
        return (time - (1 - time) * self.std**2) * centred / variance - mean

    def flow_map(self, x_t: Tensor, t: Tensor | float, r: Tensor | float) -> Tensor:
        """Exact ODE flow from ``t`` to ``r``: ``x_r = m_r + (sigma_r / sigma_t)(x_t - m_t)``."""
        ratio = self.marginal_std(r, x_t) / self.marginal_std(t, x_t)
        return self.marginal_mean(r, x_t) + ratio * (x_t - self.marginal_mean(t, x_t))

    def average_velocity(self, x_t: Tensor, t: Tensor | float, r: Tensor | float) -> Tensor:
        """Exact average velocity ``(x_t - x_r) / (t - r)``; the velocity where ``t == r``."""
        time, target = self._time(t, x_t), self._time(r, x_t)
        gap = time - target
        same = gap == 0
        safe_gap = torch.where(same, torch.ones_like(gap), gap)
        average = (x_t - self.flow_map(x_t, t, r)) / safe_gap
        return torch.where(same, self.velocity(x_t, t), average)

    # -- sampling and models -------------------------------------------------------------------

    def sample_data(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """``n`` data samples of shape (n, dim)."""
        noise = self.sample_noise(n, generator, dtype)
        return self._mean_like(noise) + self.std * noise

    def sample_noise(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """``n`` standard normal noise samples of shape (n, dim)."""
        return torch.randn(n, self.dim, generator=generator, dtype=dtype)

    def oracle(self, kind: str = "instantaneous") -> OracleModel:
        """A model following the project's contract ``model(x_t, t, r, cond) -> F``.

        ``"instantaneous"`` ignores ``r`` and returns ``v(x_t, t)`` (a perfect flow-matching
        model); ``"average"`` returns the exact average velocity from ``t`` to ``r`` (a perfect
        any-step model).
        """
        if kind not in ORACLE_KINDS:
            raise ValueError(f"kind must be one of {ORACLE_KINDS}, got {kind!r}")

        def instantaneous(x_t: Tensor, t: Tensor, r: Tensor, cond: object = None) -> Tensor:
            return self.velocity(x_t, t)

        def average(x_t: Tensor, t: Tensor, r: Tensor, cond: object = None) -> Tensor:
            return self.average_velocity(x_t, t, r)

        return instantaneous if kind == "instantaneous" else average
