"""Probability paths and the project's one time convention.

Convention (spec section 1), used by every module of the package:

* data ``x``, Gaussian noise ``z``, time ``t`` in [0, 1]; ``t = 1`` is pure noise, ``t = 0`` data;
* ``x_t = alpha(t) * z + gamma(t) * x``; the linear path has ``alpha = t``, ``gamma = 1 - t``,
  so ``x_t = t * z + (1 - t) * x`` and the instantaneous velocity is ``z - x``;
* a network ``F(x_t, t, r, cond)`` predicts the *average* velocity from ``t`` to the target
  time ``r <= t``; one jump is ``x_r = x_t - (t - r) * F`` on the linear path;
* negative time marks the fake (twin) trajectory. Path coefficients always use ``|t|``;
  the sign only reaches the network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


def broadcast_time(time: Tensor | float, like: Tensor) -> Tensor:
    """Turn a scalar or a per-sample time of shape (B,) into a tensor that broadcasts over ``like``."""
    time = torch.as_tensor(time, dtype=like.dtype, device=like.device)
    if time.ndim == 0:
        return time
    if time.ndim != 1 or time.shape[0] != like.shape[0]:
        raise ValueError(
            f"time must be a scalar or have shape ({like.shape[0]},), got {tuple(time.shape)}"
        )
    return time.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class Endpoints:
    """Both ends of the path recovered from one prediction at ``x_t``."""

    data: Tensor  # x_hat in the paper
    noise: Tensor  # z_hat in the paper


class Path(ABC):
    """``x_t = alpha(t) * z + gamma(t) * x`` with ``alpha(0) = 0, alpha(1) = 1, gamma = 1 - ...``.

    Subclasses give the two coefficients and their time derivatives; everything else
    (interpolation, target velocity, endpoint recovery, a jump between times) follows here.
    All methods take ``|t|``: a negative time means "the fake trajectory", not a new point.
    """

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Noise coefficient."""

    @abstractmethod
    def gamma(self, t: Tensor) -> Tensor:
        """Data coefficient."""

    @abstractmethod
    def alpha_derivative(self, t: Tensor) -> Tensor:
        """d alpha / dt."""

    @abstractmethod
    def gamma_derivative(self, t: Tensor) -> Tensor:
        """d gamma / dt."""

    def interpolate(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """``x_t`` for per-sample times ``t`` (shape (B,) or scalar)."""
        t = broadcast_time(t, data).abs()
        return self.alpha(t) * noise + self.gamma(t) * data

    def velocity(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Instantaneous velocity ``d x_t / dt`` (``z - x`` on the linear path)."""
        t = broadcast_time(t, data).abs()
        return self.alpha_derivative(t) * noise + self.gamma_derivative(t) * data

    def recover(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Endpoints:
        """Solve ``[x_t, F] = [[alpha, gamma], [alpha', gamma']] [z, x]`` for both endpoints.

        On the linear path: ``x_hat = x_t - t * F`` and ``z_hat = x_t + (1 - t) * F``.
        """
        t = broadcast_time(t, x_t).abs()
        a, g = self.alpha(t), self.gamma(t)
        da, dg = self.alpha_derivative(t), self.gamma_derivative(t)
        determinant = da * g - a * dg
        data = (da * x_t - a * prediction) / determinant
        noise = (g * prediction - dg * x_t) / determinant
        return Endpoints(data=data, noise=noise)

    def jump(self, x_t: Tensor, prediction: Tensor, t: Tensor | float, r: Tensor | float) -> Tensor:
        """Move from time ``t`` to ``r`` with the prediction ``F`` (``x_t - (t - r) F`` when linear)."""
        ends = self.recover(x_t, prediction, t)
        return self.interpolate(ends.data, ends.noise, r)


class LinearPath(Path):
    """Rectified-flow / OT path: ``alpha = t``, ``gamma = 1 - t``. Every released model uses it."""

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def gamma(self, t: Tensor) -> Tensor:
        return 1 - t

    def alpha_derivative(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def gamma_derivative(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def jump(self, x_t: Tensor, prediction: Tensor, t: Tensor | float, r: Tensor | float) -> Tensor:
        # Same result as the generic recover-then-interpolate, with one multiply-add.
        step = broadcast_time(t, x_t).abs() - broadcast_time(r, x_t).abs()
        return x_t - step * prediction


class CosinePath(Path):
    """Trigonometric path: ``alpha = sin(pi t / 2)``, ``gamma = cos(pi t / 2)``."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(t * math.pi / 2)

    def gamma(self, t: Tensor) -> Tensor:
        return torch.cos(t * math.pi / 2)

    def alpha_derivative(self, t: Tensor) -> Tensor:
        return torch.cos(t * math.pi / 2) * math.pi / 2

    def gamma_derivative(self, t: Tensor) -> Tensor:
        return -torch.sin(t * math.pi / 2) * math.pi / 2


PATHS: dict[str, type[Path]] = {"linear": LinearPath, "cosine": CosinePath}


def get_path(name: str) -> Path:
    """Look a path up by name (``linear`` or ``cosine``)."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name]()
