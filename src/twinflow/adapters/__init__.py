"""diffusers transformers as TwinFlow backbones ``F(x_t, t, r, condition)`` (spec sections 4-5).

One adapter per family (``qwen_image``, ``z_image``, ``sd3``, ``flux``, ``sana``), each a drop-in
``torch.nn.Module`` for :class:`~twinflow.objective.TwinFlowObjective` and
:func:`~twinflow.sampler.sample`. The target time ``r`` enters through a second time embedding
wrapped around the model's own (``base``); the extra weights are saved and loaded under the
released key names (``weights``). Nothing here imports diffusers except :func:`load_adapter`.
"""

from twinflow.adapters.base import ZERO_TIMES, TargetTimeEmbedding, TimeConvention, TransformerAdapter
from twinflow.adapters.exported import (
    EXTRA_WEIGHTS_FILE,
    LORA_WEIGHTS_FILE,
    METADATA_FILE,
    ZERO_TIME_KEY,
    load_lora_export,
    read_export_metadata,
    recorded_zero_time,
    time_metadata,
)
from twinflow.adapters.flux import FLUX_TIME, FluxAdapter
from twinflow.adapters.qwen_image import QWEN_IMAGE_TIME, QwenImageAdapter
from twinflow.adapters.registry import (
    ADAPTERS,
    adapter_for,
    build_adapter,
    family_of,
    load_adapter,
    transformer_family,
)
from twinflow.adapters.sana import SANA_TIME, SanaAdapter
from twinflow.adapters.sd3 import SD3_TIME, SD3Adapter
from twinflow.adapters.weights import (
    extra_state_dict,
    find_extra_weights,
    load_extra_weights,
    save_extra_weights,
    weight_files,
)
from twinflow.adapters.z_image import Z_IMAGE_TIME, ZImageAdapter, resolve_zero_time

__all__ = [
    "ADAPTERS",
    "EXTRA_WEIGHTS_FILE",
    "LORA_WEIGHTS_FILE",
    "METADATA_FILE",
    "FLUX_TIME",
    "QWEN_IMAGE_TIME",
    "SANA_TIME",
    "SD3_TIME",
    "ZERO_TIMES",
    "ZERO_TIME_KEY",
    "Z_IMAGE_TIME",
    "FluxAdapter",
    "QwenImageAdapter",
    "SanaAdapter",
    "SD3Adapter",
    "TargetTimeEmbedding",
    "TimeConvention",
    "TransformerAdapter",
    "ZImageAdapter",
    "adapter_for",
    "build_adapter",
    "extra_state_dict",
    "family_of",
    "find_extra_weights",
    "load_adapter",
    "load_extra_weights",
    "load_lora_export",
    "read_export_metadata",
    "recorded_zero_time",
    "resolve_zero_time",
    "save_extra_weights",
    "time_metadata",
    "transformer_family",
    "weight_files",
]
