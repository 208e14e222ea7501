"""End to end: a short training run on real MNIST digits measurably improves one-step samples.

Quality is measured without any learned judge: one-step samples are compared with held-out
real digits in pixel space. A 1-nearest-neighbour classifier over real training digits labels
each sample; the share labelled with the class it was asked for must rise far above chance,
and the distance to the nearest real digit of that class must fall.
"""

from __future__ import annotations

import pytest
import torch

import twinflow

from twinflow.data import DataConfig, load_dataset
from twinflow.eval import nearest_neighbour_scores
from twinflow.pipeline import ClassConditionalGenerator
from twinflow.train.config import load_config
from twinflow.train.loop import train


def one_step_quality(generator: ClassConditionalGenerator, reference_images, reference_labels):
    samples = generator.sample(per_class=10, preset="1nfe", seed=123)
    scores = nearest_neighbour_scores(samples.images, samples.labels, reference_images, reference_labels)
    return scores.accuracy, scores.distance


def test_short_twinflow_run_improves_one_step_samples(tmp_path, single_thread):
    overrides = [
        "device=cpu", "data.limit=null", "training.batch_size=32", "training.learning_rate=3e-3",
        "training.checkpoint_every=1000", "training.ema_decay=0.9", "sampling.presets=[1nfe]", "sampling.per_class=1",
        "phases=[{steps: 250, objective: {preset: flow_matching}}, {steps: 100, objective: {preset: twinflow}}]",
    ]
    config = load_config("configs/tiny.yaml", overrides)
    data = load_dataset(DataConfig(**config["data"]))
    reference_images, reference_labels = data.images[::5], data.labels[::5]

    result = train(config, tmp_path / "run")
    trained = twinflow.load(result.run_directory, device="cpu")
    untrained = twinflow.load(result.run_directory, device="cpu")
    # At initialisation the output layer is zero: the network predicts zero velocity and one step
    # returns the noise itself. Zero weights reproduce exactly that starting point.
    for parameter in untrained.network.parameters():
        torch.nn.init.zeros_(parameter)
    before_accuracy, before_distance = one_step_quality(untrained, reference_images, reference_labels)
    after_accuracy, after_distance = one_step_quality(trained, reference_images, reference_labels)
    assert before_accuracy < 0.3
    # 350 steps of a 150k-parameter network (about 30 s): digits of the right class, not yet clean.
    assert after_accuracy > 0.4, (before_accuracy, after_accuracy)
    assert after_distance < 0.7 * before_distance, (before_distance, after_distance)


def test_nearest_neighbour_scores_on_real_and_broken_samples():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(40, 1, 6, 6, generator=generator) * 2 - 1
    labels = torch.arange(40) % 4
    held_out = reference[:8] + 0.01 * torch.randn(8, 1, 6, 6, generator=generator)
    real = nearest_neighbour_scores((held_out + 1) / 2, labels[:8], reference, labels)
    assert real.accuracy == 1.0 and real.distance < 0.02
    noise = nearest_neighbour_scores(torch.rand(8, 1, 6, 6, generator=generator), labels[:8], reference, labels)
    assert noise.distance > 10 * real.distance
    swapped = nearest_neighbour_scores((held_out + 1) / 2, (labels[:8] + 1) % 4, reference, labels)
    assert swapped.accuracy == 0.0
    with pytest.raises(ValueError, match="differs from the reference"):
        nearest_neighbour_scores(torch.rand(2, 1, 5, 5), labels[:2], reference, labels)
