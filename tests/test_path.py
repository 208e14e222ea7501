"""Tests for twinflow.path: the linear and cosine paths against their closed forms."""

from __future__ import annotations

import pytest
import torch

from twinflow.path import CosinePath, LinearPath, Path, broadcast_time, get_path


def _batch(seed: int = 0, batch: int = 6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 4, 4, generator=generator, dtype=torch.float64)
    z = torch.randn(batch, 1, 4, 4, generator=generator, dtype=torch.float64)
    # Per-sample times strictly inside (0, 1), away from the ends.
    t = 0.05 + 0.9 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return x, z, t


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1, 1, 1)


# ---- LinearPath ----------------------------------------------------------------------------


def test_linear_interpolate_and_velocity_closed_forms():
    x, z, t = _batch()
    path = LinearPath()
    torch.testing.assert_close(path.interpolate(x, z, t), _col(t) * z + (1 - _col(t)) * x, rtol=0, atol=1e-12)
    torch.testing.assert_close(path.velocity(x, z, t), z - x, rtol=0, atol=1e-12)
    # Scalar times broadcast too; the ends are data (t = 0) and noise (t = 1).
    torch.testing.assert_close(path.interpolate(x, z, 0.0), x, rtol=0, atol=0)
    torch.testing.assert_close(path.interpolate(x, z, 1.0), z, rtol=0, atol=0)
    torch.testing.assert_close(path.interpolate(x, z, 0.25), 0.25 * z + 0.75 * x, rtol=0, atol=1e-12)


def test_linear_recover_closed_forms_for_an_arbitrary_prediction():
    x, z, t = _batch(1)
    path = LinearPath()
    x_t = path.interpolate(x, z, t)
    prediction = torch.randn_like(x)  # not the true velocity: the formulas must still hold
    ends = path.recover(x_t, prediction, t)
    torch.testing.assert_close(ends.data, x_t - _col(t) * prediction, rtol=0, atol=1e-12)
    torch.testing.assert_close(ends.noise, x_t + (1 - _col(t)) * prediction, rtol=0, atol=1e-12)


def test_linear_recover_with_true_velocity_is_exact():
    x, z, t = _batch(2)
    path = LinearPath()
    x_t = path.interpolate(x, z, t)
    ends = path.recover(x_t, path.velocity(x, z, t), t)
    torch.testing.assert_close(ends.data, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ends.noise, z, rtol=0, atol=1e-12)


def test_negative_time_uses_absolute_value():
    x, z, t = _batch(3)
    path = LinearPath()
    torch.testing.assert_close(path.interpolate(x, z, -t), path.interpolate(x, z, t), rtol=0, atol=0)
    torch.testing.assert_close(path.velocity(x, z, -t), path.velocity(x, z, t), rtol=0, atol=0)
    x_t = path.interpolate(x, z, t)
    prediction = torch.randn_like(x)
    positive, negative = path.recover(x_t, prediction, t), path.recover(x_t, prediction, -t)
    torch.testing.assert_close(negative.data, positive.data, rtol=0, atol=0)
    torch.testing.assert_close(negative.noise, positive.noise, rtol=0, atol=0)
    # Sanity: a negative time must not be treated as a plain (signed) number.
    assert not torch.allclose(path.interpolate(x, z, -t), -_col(t) * z + (1 + _col(t)) * x)


def test_linear_jump_closed_form_and_generic_jump_agree():
    x, z, t = _batch(4)
    path = LinearPath()
    r = t * torch.rand(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t = path.interpolate(x, z, t)
    prediction = torch.randn_like(x)
    fast = path.jump(x_t, prediction, t, r)
    torch.testing.assert_close(fast, x_t - _col(t - r) * prediction, rtol=0, atol=1e-12)
    generic = Path.jump(LinearPath(), x_t, prediction, t, r)  # recover, then interpolate
    torch.testing.assert_close(fast, generic, rtol=0, atol=1e-12)
    # With the true velocity a jump lands exactly on the path at r; r = 0 lands on the data.
    torch.testing.assert_close(path.jump(x_t, z - x, t, r), path.interpolate(x, z, r), rtol=0, atol=1e-12)
    torch.testing.assert_close(path.jump(x_t, z - x, t, 0.0), x, rtol=0, atol=1e-12)
    # Scalar times in the generic jump too.
    torch.testing.assert_close(
        Path.jump(LinearPath(), x_t, prediction, 0.7, 0.2), x_t - 0.5 * prediction, rtol=0, atol=1e-12
    )


# ---- CosinePath ----------------------------------------------------------------------------


def test_cosine_recover_with_true_velocity_is_exact():
    x, z, t = _batch(6, batch=16)
    path = CosinePath()
    x_t = path.interpolate(x, z, t)
    ends = path.recover(x_t, path.velocity(x, z, t), t)
    torch.testing.assert_close(ends.data, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ends.noise, z, rtol=0, atol=1e-10)
    # The generic jump with the true velocity stays on the path.
    r = t / 3
    torch.testing.assert_close(path.jump(x_t, path.velocity(x, z, t), t, r), path.interpolate(x, z, r), rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
def test_velocity_is_finite_difference_of_interpolate(path):
    x, z, t = _batch(7)
    h = 1e-6
    numeric = (path.interpolate(x, z, t + h) - path.interpolate(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(path.velocity(x, z, t), numeric, rtol=1e-6, atol=1e-6)


def test_cosine_endpoints():
    x, z, _ = _batch(8)
    path = CosinePath()
    torch.testing.assert_close(path.interpolate(x, z, 0.0), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(path.interpolate(x, z, 1.0), z, rtol=0, atol=1e-12)


# ---- helpers -------------------------------------------------------------------------------


def test_broadcast_time_shapes():
    like = torch.zeros(4, 1, 3, 3)
    assert broadcast_time(0.5, like).ndim == 0
    assert broadcast_time(torch.arange(4.0), like).shape == (4, 1, 1, 1)
    assert broadcast_time(torch.arange(4.0), like).dtype == like.dtype


@pytest.mark.parametrize("shape", [(3,), (4, 1), (2, 2)])
def test_broadcast_time_wrong_shape_names_the_shape(shape):
    like = torch.zeros(4, 1, 3, 3)
    with pytest.raises(ValueError) as error:
        broadcast_time(torch.zeros(shape), like)
    assert str(tuple(shape)) in str(error.value)
    assert "(4,)" in str(error.value)


def test_get_path():
    assert isinstance(get_path("linear"), LinearPath)
    assert isinstance(get_path("cosine"), CosinePath)
    with pytest.raises(ValueError, match="'spiral'"):
        get_path("spiral")
