"""The small U-Net backbone and the EMA teacher."""

from __future__ import annotations

import pytest
import torch

from twinflow.models import UNetConfig, build_model, count_parameters
from twinflow.models.embeddings import sinusoidal_embedding
from twinflow.teacher import EMATeacher


def small_model(**overrides):
    torch.manual_seed(0)
    model = build_model("unet", channels=[16, 32], blocks_per_level=1, embedding_dim=32, attention_heads=2, **overrides)
    # Residual branches and the head start at zero (the network starts as the zero velocity);
    # give every parameter weights so that each input can reach the output.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.05)
    return model


def test_output_shape_and_sign_of_time_matters():
    model = small_model()
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0.9, 0.5, 0.2])
    labels = torch.tensor([0, 5, 10])  # 10 = null class
    real = model(x, t, t * 0.5, labels)
    fake = model(x, -t, -t * 0.5, labels)
    assert real.shape == x.shape
    assert (real - fake).abs().mean() > 1e-3, "the fake trajectory (negative time) must be distinguishable"
    other_target = model(x, t, t * 0.1, labels)
    assert (real - other_target).abs().mean() > 1e-4, "the target time must reach the network"
    other_label = model(x, t, t * 0.5, torch.tensor([1, 6, 3]))
    assert (real - other_label).abs().mean() > 1e-4


def test_signed_embedding_is_odd_in_its_sine_half():
    t = torch.tensor([0.3, -0.3])
    features = sinusoidal_embedding(t, 16)
    torch.testing.assert_close(features[0, :8], -features[1, :8])
    torch.testing.assert_close(features[0, 8:], features[1, 8:])


def test_other_sizes_and_channels():
    model = small_model(image_channels=3, image_size=32, num_classes=4)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.rand(2), torch.tensor([0, 4]))
    assert out.shape == (2, 3, 32, 32)


def test_bad_inputs_are_named():
    model = small_model()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.randn(2, 1, 32, 32), torch.rand(2), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.rand(2), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=30, channels=(16, 32, 64))
    with pytest.raises(ValueError, match="unknown model config key"):
        build_model("unet", chanels=[8])
    with pytest.raises(ValueError, match="unknown model"):
        build_model("dit")


def test_default_demo_model_size_is_small():
    from twinflow.train.config import load_config, model_arguments

    name, arguments = model_arguments(load_config("configs/mnist_twinflow.yaml"))
    count = count_parameters(build_model(name, **arguments))
    assert 0.3e6 < count < 3e6


def test_ema_teacher_decay_zero_is_the_model_itself():
    model = small_model()
    teacher = EMATeacher(model, 0.0)
    assert teacher.network is model and not teacher.owns_weights


def test_ema_teacher_warm_up_and_blend():
    model = small_model()
    teacher = EMATeacher(model, 0.9)
    assert teacher.network is not model
    assert all(not p.requires_grad for p in teacher.network.parameters())
    decays = []
    for _ in range(4):
        before = [p.clone() for p in teacher.network.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        d = teacher.working_decay
        teacher.update(model)
        for old, new, current in zip(before, teacher.network.parameters(), model.parameters()):
            torch.testing.assert_close(new, d * old + (1 - d) * current)
        decays.append(teacher.working_decay)
    # d_{k+1} = d_k + (1 - d_k) (decay - d_k) / 2, from d_0 = 0
    expected, d = [], 0.0
    for _ in range(4):
        d = d + (1 - d) * (0.9 - d) * 0.5
        expected.append(d)
    assert decays == pytest.approx(expected)
    assert decays[0] == pytest.approx(0.45) and decays[-1] < 0.9
    state = teacher.state_dict()
    other = EMATeacher(small_model(), 0.9)
    other.load_state_dict(state)
    assert other.working_decay == teacher.working_decay
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(small_model(), 0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="ema decay"):
        EMATeacher(model, 1.0)
