"""The sampler's configuration: :class:`SamplerConfig`, the named presets (spec section 3) and
one-line specs such as ``multi:steps=50``; what a run, a command line or a report names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from twinflow.checks import is_finite_number, is_integer, is_number
from twinflow.regimes import STYLES, sampler_style


AUTO = "auto"
"""Value of ``stochastic_ratio`` that selects the per-step rule of :func:`step_stochastic_ratio`."""

_TUPLE_FIELDS = {"time_warp": 3, "gaps": 2, "guidance_interval": 2}


@dataclass(frozen=True)
class SamplerConfig:
    """Every knob of the unified sampler. Frozen, so presets cannot be changed by accident;
    derive a variant with :func:`dataclasses.replace` or :func:`sampler_config`.

    Attributes:
        steps: number of network evaluations (NFE) the schedule is built for. Order 1 uses
            ``steps`` grid intervals; order 2 uses ``(steps + 1) // 2`` intervals with two calls
            on each except the last, i.e. ``2 * intervals - 1`` calls.
        style: ``"few"`` (target time ``r = 0``), ``"any"`` (``r = t_next``) or ``"mul"``
            (``r = t_cur``, ordinary multi-step sampling of an instantaneous-velocity model).
            The regime names ``one_step``, ``any_step``, ``multi_step`` of
            :mod:`twinflow.regimes` are accepted and stored as these.
        order: 1 (Euler-like) or 2 (Heun correction).
        stochastic_ratio: rho in [0, 1], the share of fresh noise in each re-noising, or
            ``"auto"`` for the per-step rule of :func:`step_stochastic_ratio`.
        extrapolation_ratio: kappa; ``x_hat += kappa (x_hat - x_hat_prev)``, same for ``z_hat``,
            on the steps of index >= 2 (counting from 0) except the last, whose ``x_hat`` is the
            sample: the reference's rule (its ``unified_sampler.py``), which the released models
            were tuned with.
        time_warp: Kumaraswamy parameters (a, b, c) of the warp ``s -> (1 - (1 - s^a)^b)^c``.
        gaps: (g0, g1), the grid spans ``s`` in ``[g0, 1 - g1]`` (``t = 1 - s``).
        guidance_scale: classifier-free guidance scale w, as diffusers and the reference define
            it: the guided prediction is ``F_uncond + w (F_cond - F_uncond)``, so ``w = 1`` is the
            conditional model alone. 0 switches guidance off (no unconditional call), as the
            reference's ``cfg_scale = 0``: the way TwinFlow models are meant to be sampled.
        guidance_interval: (lo, hi); guidance only for calls whose time ``t`` has
            ``lo <= t <= hi``.
    """

    steps: int = 1
    style: str = "few"
    order: int = 1
    stochastic_ratio: float | str = 0.0  # rho in the paper
    extrapolation_ratio: float = 0.0  # kappa in the paper
    time_warp: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Kumaraswamy (a, b, c)
    gaps: tuple[float, float] = (0.0, 0.0)  # (g0, g1)
    guidance_scale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        # One vocabulary for users: a regime name is stored as the spec's style name.
        if isinstance(self.style, str) and self.style not in STYLES:
            try:
                object.__setattr__(self, "style", sampler_style(self.style))
            except ValueError:
                pass  # validate() names the bad style; a config is built before it is checked

    @property
    def intervals(self) -> int:
        """Number of grid intervals: ``steps`` for order 1, ``(steps + 1) // 2`` for order 2."""
        return self.steps if self.order == 1 else (self.steps + 1) // 2

    def validate(self) -> SamplerConfig:
        """Check every field; raise ``ValueError`` naming the bad field. Returns ``self``."""
        if not is_integer(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        sampler_style(self.style)
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        rho = self.stochastic_ratio
        if isinstance(rho, str):
            if rho != AUTO:
                raise ValueError(f"stochastic_ratio must be in [0, 1] or {AUTO!r}, got {rho!r}")
        elif not (is_number(rho) and 0.0 <= rho <= 1.0):
            raise ValueError(f"stochastic_ratio must be in [0, 1] or {AUTO!r}, got {rho!r}")
        if not (is_finite_number(self.extrapolation_ratio)):
            raise ValueError(
                f"extrapolation_ratio must be a finite number, got {self.extrapolation_ratio!r}"
            )
        for name, length in _TUPLE_FIELDS.items():
            value = getattr(self, name)
            if not (
                isinstance(value, (tuple, list))
                and len(value) == length
                and all(is_finite_number(item) for item in value)
            ):
                raise ValueError(f"{name} must be {length} finite numbers, got {value!r}")
        if any(item <= 0 for item in self.time_warp):
            raise ValueError(f"time_warp entries must all be > 0, got {self.time_warp!r}")
        start_gap, end_gap = self.gaps
        if not (0.0 <= start_gap < 1.0 and 0.0 <= end_gap < 1.0 and start_gap + end_gap < 1.0):
            raise ValueError(
                f"gaps must each be in [0, 1) with g0 + g1 < 1, got {self.gaps!r}"
            )
        if not (is_finite_number(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        low, high = self.guidance_interval
        if low > high:
            raise ValueError(
                f"guidance_interval must have lo <= hi, got {self.guidance_interval!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (tuples become lists, so it is JSON/YAML friendly)."""
        values = asdict(self)
        for name in _TUPLE_FIELDS:
            values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplerConfig:
        """Build and validate a config from a mapping; unknown keys raise ``ValueError``."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SamplerConfig keys {unknown}; known keys: {sorted(known)}")
        converted = {
            key: tuple(value) if key in _TUPLE_FIELDS and isinstance(value, list) else value
            for key, value in values.items()
        }
        return cls(**converted).validate()


SAMPLER_PRESETS: dict[str, SamplerConfig] = {
    # Spec section 3, "recommended presets".
    "1nfe": SamplerConfig(steps=1),
    "2nfe": SamplerConfig(steps=2, stochastic_ratio=1.0, gaps=(0.001, 0.6)),
    "4nfe": SamplerConfig(steps=4, stochastic_ratio=1.0, gaps=(0.001, 0.5)),
    "any": SamplerConfig(steps=4, stochastic_ratio=0.0, gaps=(0.001, 0.5), style="any"),
    "multi": SamplerConfig(
        steps=30,
        stochastic_ratio=0.0,
        time_warp=(1.17, 0.8, 1.1),
        gaps=(0.001, 0.0),
        style="mul",
    ),
}


def sampler_config(preset: str | None = None, **overrides: Any) -> SamplerConfig:
    """A validated config: the named preset (or the defaults) with ``overrides`` applied.

    Example: ``sampler_config("4nfe", stochastic_ratio=0.5)``.
    """
    if preset is None:
        base = SamplerConfig()
    elif preset in SAMPLER_PRESETS:
        base = SAMPLER_PRESETS[preset]
    else:
        raise ValueError(
            f"unknown sampler preset {preset!r}; choose one of {sorted(SAMPLER_PRESETS)}"
        )
    return override_sampler(base, **overrides)


def override_sampler(config: SamplerConfig, **overrides: Any) -> SamplerConfig:
    """``config`` with single fields changed (``steps=8``), validated; an unknown field is named."""
    known = {field.name for field in fields(SamplerConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown sampler option {key!r}; known options: {sorted(known)}")
    converted = {
        key: tuple(value) if key in _TUPLE_FIELDS and isinstance(value, list) else value
        for key, value in overrides.items()
    }
    return replace(config, **converted).validate()


def sampler_from_spec(spec: str) -> SamplerConfig:
    """A config from a one-line spec ``PRESET[:key=value[:key=value...]]`` (command lines, reports).

    Examples: ``"1nfe"``, ``"multi:steps=50"``, ``"4nfe:stochastic_ratio=0.5:gaps=[0.001,0.4]"``.
    Values are read as YAML scalars or lists (``auto``, ``0.5``, ``[1.17,0.8,1.1]``).
    """
    import yaml  # only spec strings need it

    name, *options = spec.strip().split(":")
    overrides = {}
    for option in options:
        key, separator, value = option.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"sampler spec {spec!r}: {option!r} must look like key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return sampler_config(name.strip(), **overrides)


def resolve_sampler(preset: str | SamplerConfig, **overrides: Any) -> SamplerConfig:
    """What every caller takes as a sampler: a preset name, a spec (``multi:steps=50``) or a
    config, with single fields overridden (``steps=8``); validated, a typo named."""
    base = preset if isinstance(preset, SamplerConfig) else sampler_from_spec(preset)
    return override_sampler(base, **overrides)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of sampler specs, keeping commas inside ``[...]``."""
    return [part.strip() for part in re.split(r",(?![^\[]*\])", text) if part.strip()]
