"""The TwinFlow objective and its presets (spec section 2)."""

from twinflow.objective.config import OBJECTIVE_PRESETS, ObjectiveConfig, SliceProportions, objective_config
from twinflow.objective.partition import SLICE_NAMES, BatchPlan, plan_batch, slice_sizes
from twinflow.objective.twinflow import ObjectiveResult, TwinFlowObjective

__all__ = [
    "OBJECTIVE_PRESETS",
    "SLICE_NAMES",
    "BatchPlan",
    "ObjectiveConfig",
    "ObjectiveResult",
    "SliceProportions",
    "TwinFlowObjective",
    "objective_config",
    "plan_batch",
    "slice_sizes",
]
