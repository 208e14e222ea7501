"""The four TwinFlow regimes and every name they go by: one table for the objective, the
sampler, the reports and the README.

The spec names the training slices ``e2e / mul / any / adv`` (section 2.1) and the sampler's
styles ``few / any / mul`` (section 3); the reference's ``sampling_style`` uses the latter, and
so do the configs the released checkpoints were sampled with. This project speaks in the full
words of :data:`REGIMES` (``one_step``, ``multi_step``, ``any_step``, ``fake``): the objective's
slices and proportions carry them, and a sampler style may be given by them too. The sampler
keeps the spec's style names as its stored values (``SamplerConfig.style``, ``twinflow.json``),
so that a config written for the reference reads the same here; :func:`sampler_style` maps one
vocabulary onto the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    """One regime of the any-step model ``F(x_t, t, r)``.

    Attributes:
        name: this project's name, the training slice's name (``SliceProportions`` field).
        spec_slice: the spec's name of the training slice (section 2.1).
        sampler_style: the spec's and the reference's sampler style that samples in this regime
            (section 3), or None for the fake flow, which is trained but never sampled.
        training_times: the times ``(t, r)`` of its training slice.
        sampling_target: the target time ``r`` of a sampler call at ``t_cur -> t_next``.
    """

    name: str
    spec_slice: str
    sampler_style: str | None
    training_times: str
    sampling_target: str


REGIMES: tuple[Regime, ...] = (
    Regime("one_step", "e2e", "few", "t = 1, r = 0", "r = 0"),
    Regime("multi_step", "mul", "mul", "t ~ p(t), r = t - u t min(0.05, lambda)", "r = t_cur"),
    Regime("any_step", "any", "any", "t ~ p(t), r in [0, t]", "r = t_next"),
    Regime("fake", "adv", None, "(-t, -t) on the model's own samples", "(not sampled)"),
)

SLICE_NAMES: tuple[str, ...] = tuple(regime.name for regime in REGIMES)
"""The objective's batch slices, in batch order: ``one_step | multi_step | any_step | fake``."""

STYLES: tuple[str, ...] = ("few", "any", "mul")
"""The sampler's styles, as stored: the target time ``r`` of each call is 0, ``t_next`` or ``t_cur``."""

_STYLE_OF_NAME = {regime.name: regime.sampler_style for regime in REGIMES if regime.sampler_style}


def sampler_style(name: str) -> str:
    """The stored sampler style for a style or a regime name: ``"few"`` and ``"one_step"`` both
    give ``"few"``, ``"any_step"`` gives ``"any"``, ``"multi_step"`` gives ``"mul"``.

    Raises:
        ValueError: naming both vocabularies, for anything else (``"fake"`` included).
    """
    if name in STYLES:
        return name
    if isinstance(name, str) and name in _STYLE_OF_NAME:
        return _STYLE_OF_NAME[name]
    raise ValueError(
        f"style must be one of {STYLES} (or the regime names {tuple(_STYLE_OF_NAME)}), got {name!r}"
    )
