"""TwinFlow: one-step and few-step generators from flow-matching models (arXiv 2512.05150).

Package map: ``path`` (time convention), ``objective`` (the training loss and its presets),
``teacher`` (EMA teacher), ``sampler`` (the unified any-step sampler), ``models`` (small
backbones), ``adapters`` (diffusers transformers with the target-time input; needs the
``diffusers`` extra), ``diffusers_scheduler`` (the sampler behind diffusers' scheduler API),
``data``, ``train`` (config, loop, checkpoints), ``eval`` (classifier metrics, grids, plots), ``cli``.
"""

from twinflow.objective import ObjectiveConfig, ObjectiveResult, TwinFlowObjective, objective_config
from twinflow.path import CosinePath, LinearPath, Path, get_path
from twinflow.pipeline import ClassConditionalGenerator, Samples, load
from twinflow.sampler import SAMPLER_PRESETS, SamplerConfig, sample, sampler_config
from twinflow.teacher import EMATeacher

__version__ = "0.1.0"

__all__ = [
    "SAMPLER_PRESETS",
    "ClassConditionalGenerator",
    "CosinePath",
    "EMATeacher",
    "LinearPath",
    "ObjectiveConfig",
    "ObjectiveResult",
    "Path",
    "SamplerConfig",
    "Samples",
    "TwinFlowObjective",
    "get_path",
    "load",
    "objective_config",
    "sample",
    "sampler_config",
]
