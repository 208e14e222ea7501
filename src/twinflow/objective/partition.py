"""Split a batch into the four TwinFlow slices and draw their times (spec 2.1).

Layout of every batch, in this order: ``one_step | multi_step | any_step | fake``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twinflow.objective.config import ObjectiveConfig

SLICE_NAMES = ("one_step", "multi_step", "any_step", "fake")


def slice_sizes(batch_size: int, config: ObjectiveConfig) -> dict[str, int]:
    """Sizes of the four slices, proportional to ``config.proportions`` (largest remainder).

    Every active slice (proportion > 0) gets at least one sample, so a batch must hold at
    least as many samples as there are active slices; a smaller one is an error rather than
    a silent empty slice.
    """
    weights = config.proportions.as_dict()
    active = [name for name in SLICE_NAMES if weights[name] > 0]
    if batch_size < len(active):
        raise ValueError(
            f"batch of {batch_size} sample(s) cannot hold the {len(active)} active objective slices "
            f"{active}; use a batch size of at least {len(active)}"
        )
    total = sum(weights[name] for name in active)
    sizes = {name: 0 for name in SLICE_NAMES}
    # One sample per active slice first, the rest by largest remainder.
    spare = batch_size - len(active)
    exact = {name: spare * weights[name] / total for name in active}
    for name in active:
        sizes[name] = 1 + int(exact[name])
    leftover = batch_size - sum(sizes.values())
    by_remainder = sorted(active, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    for name in by_remainder[:leftover]:
        sizes[name] += 1
    return sizes


@dataclass
class BatchPlan:
    """Per-sample times of one batch and where each slice lies.

    ``time`` and ``target_time`` are signed: the fake slice carries ``-t`` (spec section 1).
    """

    sizes: dict[str, int]
    time: Tensor  # t, shape (B,)
    target_time: Tensor  # r, shape (B,)

    def slice(self, name: str) -> slice:
        start = 0
        for slice_name in SLICE_NAMES:
            if slice_name == name:
                return slice(start, start + self.sizes[name])
            start += self.sizes[slice_name]
        raise KeyError(name)

    @property
    def real(self) -> slice:
        """All samples on the real trajectory (everything but the fake slice)."""
        return slice(0, self.slice("fake").start)


def sample_time(count: int, config: ObjectiveConfig, generator: torch.Generator) -> Tensor:
    """``t ~ c * Beta(a, b)`` (uniform by default), drawn from ``generator`` only."""
    a, b, scale = config.time_distribution
    if a == 1.0 and b == 1.0:
        return scale * _uniform(count, generator)
    # torch's Beta sampler takes no generator: seed a forked global RNG from ours.
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return scale * torch.distributions.Beta(a, b).sample((count,))


def _uniform(count: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(count, generator=generator, device=device).cpu()


def plan_batch(batch_size: int, config: ObjectiveConfig, generator: torch.Generator) -> BatchPlan:
    """Draw ``(t, r)`` for every slice; times live on the CPU (move them with the batch)."""
    sizes = slice_sizes(batch_size, config)
    times, targets = [], []

    count = sizes["one_step"]
    times.append(torch.ones(count))
    targets.append(torch.zeros(count))

    for name, gap in (
        ("multi_step", min(config.multi_step_max_gap, config.consistency_ratio)),
        ("any_step", config.consistency_ratio),
    ):
        count = sizes[name]
        t = sample_time(count, config, generator)
        u = _uniform(count, generator)
        times.append(t)
        targets.append(t - u * t * gap)

    count = sizes["fake"]
    t = sample_time(count, config, generator)
    times.append(-t)
    targets.append(-t)

    return BatchPlan(sizes=sizes, time=torch.cat(times), target_time=torch.cat(targets))
