"""Training machinery: checkpoints, the configuration and the training engine."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import MaskedDataset, resolve_defaults, train

__all__ = ["ConfigError", "MaskedDataset", "TrainConfig", "load_config", "resolve_defaults", "train"]
