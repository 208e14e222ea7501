"""Split a batch into the four TwinFlow slices and draw their times (spec 2.1).

Layout of every batch, in this order: ``one_step | multi_step | any_step | fake``.

Which slices a batch holds comes from one fixed, periodic assignment of slices to the run's
*sample stream*: sample ``k`` of the run (counted over optimizer steps, accumulation
micro-steps, processes and positions in a micro-batch, see :func:`stream_position`) belongs to
slice ``pattern[k mod period]`` of :class:`SliceSchedule`. A batch of ``b`` samples starting at
stream position ``s`` holds the slices of positions ``s .. s + b - 1``, laid out in the order
above. Hence:

* a batch that is a whole number of periods (1:1:1:1: a multiple of 4) holds every slice in
  exact proportion, as the reference's partitioned batch does;
* any per-process batch ``b >= 1`` trains every preset: small batches rotate the slices across
  positions, processes, micro-steps and steps, so that the proportions hold over every run of
  ``period`` consecutive samples (at 20B scale a GPU holds 1-2 samples);
* the assignment depends on the stream position only, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import torch
from torch import Tensor

from twinflow.objective.config import ObjectiveConfig, SliceProportions
from twinflow.regimes import SLICE_NAMES

MAX_PERIOD = 4096  # samples in one period of the slice pattern
PROPORTION_DENOMINATOR = 100  # proportions are read as fractions with denominators up to this


class SliceSchedule:
    """The periodic assignment of slices to a run's sample stream (see the module notes).

    The proportions are made integer weights ``w`` (read as fractions with small denominators);
    one period holds ``sum(w)`` samples, ``w[i]`` of slice ``i``. Within a period the slices are
    interleaved by largest deficit: position ``k`` goes to the slice whose count lags its share
    ``(k + 1) w_i / period`` the most (ties to the earlier slice), so every run of ``n``
    consecutive samples holds each slice within one sample of ``n`` times its share, and 1:1:1:1
    gives ``one_step, multi_step, any_step, fake, one_step, ...``.
    """

    def __init__(self, proportions: SliceProportions):
        self.weights = integer_weights(proportions)
        self.period = sum(self.weights.values())
        counts = {name: 0 for name in SLICE_NAMES}
        pattern = []
        for position in range(self.period):
            deficits = {
                name: (position + 1) * weight / self.period - counts[name]
                for name, weight in self.weights.items() if weight > 0
            }
            chosen = max(deficits, key=lambda name: (deficits[name], -SLICE_NAMES.index(name)))
            counts[chosen] += 1
            pattern.append(chosen)
        assert counts == self.weights, (counts, self.weights)  # a period holds each weight exactly
        self.pattern = tuple(pattern)
        # prefix[name][i]: how many of the first i positions of a period belong to the slice.
        self._prefix = {name: [0] * (self.period + 1) for name in SLICE_NAMES}
        for index, name in enumerate(self.pattern):
            for other in SLICE_NAMES:
                self._prefix[other][index + 1] = self._prefix[other][index] + (other == name)

    def _before(self, position: int) -> dict[str, int]:
        """Samples of each slice among stream positions ``0 .. position - 1``."""
        periods, rest = divmod(position, self.period)
        return {name: periods * self.weights[name] + self._prefix[name][rest] for name in SLICE_NAMES}

    def counts(self, start: int, count: int) -> dict[str, int]:
        """Samples of each slice among stream positions ``start .. start + count - 1``."""
        if start < 0 or count < 0:
            raise ValueError(f"stream positions must be non-negative, got start={start}, count={count}")
        before, after = self._before(start), self._before(start + count)
        return {name: after[name] - before[name] for name in SLICE_NAMES}

    def share(self, name: str) -> float:
        """The fraction of the stream that belongs to slice ``name``."""
        return self.weights[name] / self.period


def integer_weights(proportions: SliceProportions) -> dict[str, int]:
    """The proportions as the smallest integer weights in the same ratio.

    Each proportion is read as a fraction with a denominator up to
    :data:`PROPORTION_DENOMINATOR` (``0.5`` is ``1/2``, ``0.333`` about ``1/3``); a ratio whose
    period would exceed :data:`MAX_PERIOD` samples is an error naming the proportions.
    """
    values = proportions.as_dict()
    fractions = {name: Fraction(values[name]).limit_denominator(PROPORTION_DENOMINATOR) for name in SLICE_NAMES}
    scale = math.lcm(*(fraction.denominator for fraction in fractions.values()))
    weights = {name: int(fraction * scale) for name, fraction in fractions.items()}
    divisor = math.gcd(*weights.values())
    weights = {name: weight // divisor for name, weight in weights.items()}
    if sum(weights.values()) > MAX_PERIOD:
        raise ValueError(
            f"objective.proportions {values} repeat only every {sum(weights.values())} samples "
            f"(at most {MAX_PERIOD}); use a simpler ratio such as 1:1:1:1 or 2:1:1:1"
        )
    return weights


@lru_cache(maxsize=64)
def slice_schedule(proportions: SliceProportions) -> SliceSchedule:
    """The (cached) schedule of a set of proportions."""
    return SliceSchedule(proportions)


def slice_sizes(batch_size: int, config: ObjectiveConfig, start: int = 0) -> dict[str, int]:
    """Sizes of the four slices of a batch of ``batch_size`` samples at stream position ``start``."""
    if batch_size < 1:
        raise ValueError(f"a batch needs at least one sample, got {batch_size}")
    return slice_schedule(config.proportions).counts(start, batch_size)


def stream_position(step: int, micro_step: int, accumulation: int, rank: int, world_size: int, batch_size: int) -> int:
    """Index, in the run's sample stream, of the first sample of one process's micro-batch.

    The stream runs over optimizer steps, then accumulation micro-steps, then processes, then
    the ``batch_size`` samples of a micro-batch, so one optimizer step covers the contiguous
    window of ``accumulation * world_size * batch_size`` positions from ``step`` times that.
    """
    return ((step * accumulation + micro_step) * world_size + rank) * batch_size


@dataclass
class BatchPlan:
    """Per-sample times of one batch and where each slice lies.

    ``time`` and ``target_time`` are signed: the fake slice carries ``-t`` (spec section 1).
    ``one_step_share`` is the stream's share of one-step samples: L_rectify sums over the
    batch's one-step samples and divides by ``batch size * one_step_share``, their *expected*
    number, so that the term keeps its weight whether a batch holds its one-step samples or a
    rotation puts them in other micro-batches.
    """

    sizes: dict[str, int]
    time: Tensor  # t, shape (B,)
    target_time: Tensor  # r, shape (B,)
    one_step_share: float = 0.25

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


def plan_batch(batch_size: int, config: ObjectiveConfig, generator: torch.Generator, start: int = 0) -> BatchPlan:
    """Draw ``(t, r)`` for every slice of a batch at stream position ``start``; times live on the
    CPU (move them with the batch)."""
    sizes = slice_sizes(batch_size, config, start)
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

    share = slice_schedule(config.proportions).share("one_step")
    return BatchPlan(sizes=sizes, time=torch.cat(times), target_time=torch.cat(targets), one_step_share=share)
