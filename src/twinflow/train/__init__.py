"""Training: config loading, the loop, checkpoints, metrics, DDP / FSDP2 runs under torchrun (``distributed``),
text-to-image data and LoRA (``data``, ``lora``), and export to diffusers folders (``export``)."""

from twinflow.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from twinflow.train.config import ConfigError, load_config
from twinflow.train.export import export_diffusers, load_lora_export
from twinflow.train.loop import TrainingDiverged, TrainResult, train

__all__ = [
    "Checkpoint",
    "ConfigError",
    "TrainResult",
    "TrainingDiverged",
    "export_diffusers",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "load_lora_export",
    "save_checkpoint",
    "train",
]
