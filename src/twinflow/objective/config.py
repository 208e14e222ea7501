"""Configuration of the TwinFlow objective and the named presets (spec section 2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


TARGET_PRECISIONS = ("auto", "float32", "compute")


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
        p = self.proportions
        values = [p.one_step, p.multi_step, p.any_step, p.fake]
        if any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"objective.proportions must be >= 0 with a positive sum, got {p.as_dict()}")
        if self.estimate_order < 0:
            raise ValueError(f"objective.estimate_order must be >= 0, got {self.estimate_order}")
        if not 0 < self.small_step < 1:
            raise ValueError(f"objective.small_step must lie in (0, 1), got {self.small_step}")
        if self.target_precision not in TARGET_PRECISIONS:
            raise ValueError(f"objective.target_precision must be one of {list(TARGET_PRECISIONS)}, got {self.target_precision!r}")
        if self.loss not in ("l2", "barron"):
            raise ValueError(f"objective.loss must be 'l2' or 'barron', got {self.loss!r}")
        if self.rectify_loss not in (None, "l2", "barron"):
            raise ValueError(f"objective.rectify_loss must be null (as objective.loss), 'l2' or 'barron', got {self.rectify_loss!r}")
        if len(self.time_distribution) != 3 or min(self.time_distribution) <= 0:
            raise ValueError(f"objective.time_distribution must be three positive numbers (a, b, c), got {self.time_distribution}")
        low, high = self.guidance_time_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"objective.guidance_time_range must satisfy 0 <= low <= high <= 1, got {self.guidance_time_range}")
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
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


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
