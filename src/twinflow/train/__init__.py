"""Training: config loading, the loop, checkpoints, metrics, and DDP / FSDP2 runs under torchrun (``distributed``)."""

from twinflow.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from twinflow.train.config import ConfigError, load_config
from twinflow.train.loop import TrainingDiverged, TrainResult, train

__all__ = [
    "Checkpoint",
    "ConfigError",
    "TrainResult",
    "TrainingDiverged",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "train",
]
