"""Configuration of the TwinFlow objective and the named presets (spec section 2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from twinflow.checks import is_finite_number, is_integer
from twinflow.regimes import SLICE_NAMES


TARGET_PRECISIONS = ("auto", "float32", "compute")
GUIDED_SLICES = tuple(name for name in SLICE_NAMES if name != "fake")  # the real slices (spec 2.1)


# The checks of ObjectiveConfig.__post_init__ (the presets below are built at import).
def _numbers(value: object, count: int) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == count and all(is_finite_number(item) for item in value)


def _require(accepted: bool, name: str, expected: str, value: object) -> None:
    """The one error shape: ``objective.<field> must be <expected>, got <value>``."""
    if not accepted:
        raise ValueError(f"objective.{name} must be {expected}, got {value!r}")


def _float_text(value: object) -> object:
    """``"1e-3"`` as 0.001; anything else unchanged, for ``__post_init__`` to accept or name."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _float_tuple(value: object) -> object:
    """A list of numbers (or numeric strings) as a tuple of floats; anything else unchanged."""
    if not isinstance(value, (list, tuple)):
        return value
    items = [_float_text(item) for item in value]
    return tuple(float(item) if is_finite_number(item) else item for item in items)


@dataclass(frozen=True)
class SliceProportions:
    """Relative sizes of the four batch slices (spec 2.1); 0 switches a slice off."""

    one_step: float = 1.0  # `e2e`: t = 1, r = 0; carries L_rectify
    multi_step: float = 1.0  # `mul`: r close to t
    any_step: float = 1.0  # `any`: r anywhere in [0, t]
    fake: float = 1.0  # `adv`: the fake flow at negative time, L_adv

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Every knob of the objective. Build one with :func:`objective_config` from a preset name.

    Symbols of the paper / spec in the comments.
    """

    proportions: SliceProportions = SliceProportions()
    estimate_order: int = 2  # N, teacher sub-steps of the RCGM target (0 = flow matching)
    consistency_ratio: float = 1.0  # lambda: how far r may lie below t
    multi_step_max_gap: float = 0.05  # the `mul` slice uses min(this, lambda); 0 gives r = t
    time_distribution: tuple[float, float, float] = (1.0, 1.0, 1.0)  # p(t) = c * Beta(a, b)
    small_step: float = 0.01  # dt of the one true step in the RCGM target
    residual_clamp: float = 1.0  # clamp of the RCGM residual and of Delta_v
    guidance_ratio: float = 0.5  # w, the enhanced (training-time CFG) ratio; 0 = off
    guidance_time_range: tuple[float, float] = (0.0, 1.0)  # strict: low < t < high
    # The real slices whose targets are guidance-enhanced: all three is the spec (2.2). Leaving
    # out multi_step keeps F(x, t, t), the velocity the guidance term reads, the plain
    # conditional one, so the guidance cannot compound through the teacher (README, departures).
    guidance_slices: tuple[str, ...] = GUIDED_SLICES
    rectify_coefficient: float = 0.5  # k, weight of L_rectify; 0 = off
    time_weighting: bool = True  # tan((1 - (|t| - |r|)) * pi / 2.5) + 1 on non-fake samples
    loss: str = "l2"  # "l2" or "barron"
    rectify_loss: str | None = None  # L_rectify's shape: None follows `loss` (the reference), or "l2" / "barron"
    barron_constant: float = 1e-3  # c of the Barron-style robust loss
    image_free: bool = False  # replace real data by the model's own one-step samples
    # Precision of the RCGM target's network calls under bf16 autocast: "float32" evaluates the
    # teacher's sub-steps and the prediction the residual scales by 1/dt in float32 (bf16 noise
    # in R is about 0.3 of the clamp on long jumps, measured); "compute" keeps the autocast
    # precision (the reference); "auto" is float32 when the weights are float32, else compute.
    target_precision: str = "auto"

    def __post_init__(self):
        # Types first, so a YAML slip ("abc", a bool for a count) is named here and not later as
        # a TypeError deep in the loss; then the ranges outside which the objective is wrong.
        p = self.proportions
        if not isinstance(p, SliceProportions):
            raise ValueError(f"objective.proportions must be a mapping of {list(SliceProportions().as_dict())}, got {p!r}")
        for name, value in p.as_dict().items():
            _require(is_finite_number(value) and value >= 0, f"proportions.{name}", "a number >= 0", value)
        if sum(p.as_dict().values()) <= 0:
            raise ValueError(f"objective.proportions must be >= 0 with a positive sum, got {p.as_dict()}")
        _require(
            is_integer(self.estimate_order) and self.estimate_order >= 0, "estimate_order", "an integer >= 0", self.estimate_order
        )
        for name, expected, inside in (
            # above 1, r could fall below 0: real samples would land in the fake (negative-time) half
            ("consistency_ratio", "a number in [0, 1]", lambda value: 0 <= value <= 1),
            ("multi_step_max_gap", "a number in [0, 1]", lambda value: 0 <= value <= 1),
            ("small_step", "a number in (0, 1)", lambda value: 0 < value < 1),
            ("residual_clamp", "a number > 0", lambda value: value > 0),  # at 0 or below it zeroes L_base
            ("guidance_ratio", "a number >= 0", lambda value: value >= 0),
            ("rectify_coefficient", "a number >= 0", lambda value: value >= 0),
            ("barron_constant", "a number > 0", lambda value: value > 0),
        ):
            value = getattr(self, name)
            _require(is_finite_number(value) and inside(value), name, expected, value)
        for name in ("time_weighting", "image_free"):
            _require(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        if self.target_precision not in TARGET_PRECISIONS:
            raise ValueError(f"objective.target_precision must be one of {list(TARGET_PRECISIONS)}, got {self.target_precision!r}")
        if self.loss not in ("l2", "barron"):
            raise ValueError(f"objective.loss must be 'l2' or 'barron', got {self.loss!r}")
        if self.rectify_loss not in (None, "l2", "barron"):
            raise ValueError(f"objective.rectify_loss must be null (as objective.loss), 'l2' or 'barron', got {self.rectify_loss!r}")
        distribution = self.time_distribution
        if not _numbers(distribution, 3) or min(distribution) <= 0:
            raise ValueError(f"objective.time_distribution must be three positive numbers (a, b, c), got {distribution!r}")
        if (not isinstance(self.guidance_slices, tuple) or not self.guidance_slices
                or not set(self.guidance_slices) <= set(GUIDED_SLICES)
                or len(set(self.guidance_slices)) != len(self.guidance_slices)):
            raise ValueError(f"objective.guidance_slices must be a non-empty list of distinct names from {list(GUIDED_SLICES)}, got {self.guidance_slices!r}")
        if not _numbers(self.guidance_time_range, 2) or not 0 <= self.guidance_time_range[0] <= self.guidance_time_range[1] <= 1:
            raise ValueError(f"objective.guidance_time_range must be two numbers with 0 <= low <= high <= 1, got {self.guidance_time_range!r}")
        from twinflow.objective.partition import integer_weights  # partition imports this module

        integer_weights(p)  # the slice pattern must have a manageable period (spec 2.1 rotation)
        if self.rectify_coefficient > 0 and p.one_step == 0:
            raise ValueError("objective.rectify_coefficient > 0 needs the one_step slice (proportions.one_step > 0)")

    @property
    def uses_fake_flow(self) -> bool:
        """Whether the model's negative-time half is trained or queried (L_adv or L_rectify)."""
        return self.proportions.fake > 0 or self.rectify_coefficient > 0

    def to_dict(self) -> dict:
        config = asdict(self)
        config["time_distribution"] = list(self.time_distribution)
        config["guidance_time_range"] = list(self.guidance_time_range)
        config["guidance_slices"] = list(self.guidance_slices)
        return config

    @classmethod
    def from_dict(cls, values: dict) -> "ObjectiveConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown objective key(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "proportions" in values and isinstance(values["proportions"], dict):
            proportion_keys = {f.name for f in fields(SliceProportions)}
            bad = sorted(set(values["proportions"]) - proportion_keys)
            if bad:
                raise ValueError(f"unknown objective.proportions key(s) {bad}; known: {sorted(proportion_keys)}")
            values["proportions"] = SliceProportions(**values["proportions"])
        for key in ("time_distribution", "guidance_time_range"):
            if key in values:
                values[key] = _float_tuple(values[key])
        if isinstance(values.get("guidance_slices"), (list, tuple)):
            values["guidance_slices"] = tuple(values["guidance_slices"])
        for key in _FLOAT_FIELDS & set(values):  # YAML reads 1e-3 (no dot) as a string
            values[key] = _float_text(values[key])
        return cls(**values)


_FLOAT_FIELDS = {field.name for field in fields(ObjectiveConfig) if field.type == "float"}

OBJECTIVE_PRESETS: dict[str, ObjectiveConfig] = {
    # All terms: L_base on three slices, L_adv on the fake slice, L_rectify on the one-step slice.
    "twinflow": ObjectiveConfig(),
    # The "without TwinFlow" ablation: RCGM only, no fake flow, no rectification.
    "rcgm": ObjectiveConfig(
        proportions=SliceProportions(one_step=1.0, multi_step=1.0, any_step=1.0, fake=0.0),
        rectify_coefficient=0.0,
    ),
    # Plain flow matching: only the multi-step slice with r = t, order 0, no guidance target.
    "flow_matching": ObjectiveConfig(
        proportions=SliceProportions(one_step=0.0, multi_step=1.0, any_step=0.0, fake=0.0),
        estimate_order=0,
        multi_step_max_gap=0.0,
        guidance_ratio=0.0,
        rectify_coefficient=0.0,
    ),
}


def objective_config(preset: str = "twinflow", **overrides) -> ObjectiveConfig:
    """A preset by name with optional field overrides (``proportions`` may be a dict)."""
    if preset not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective preset {preset!r}; choose one of {sorted(OBJECTIVE_PRESETS)}")
    base = OBJECTIVE_PRESETS[preset].to_dict()
    if isinstance(overrides.get("proportions"), dict):
        overrides["proportions"] = {**base["proportions"], **overrides["proportions"]}
    base.update(overrides)
    return ObjectiveConfig.from_dict(base)


__all__ = ["OBJECTIVE_PRESETS", "ObjectiveConfig", "SliceProportions", "objective_config"]
