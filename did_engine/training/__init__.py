"""Mix-scale training: configuration (config.py), the loss and its noise (loss.py), state on
disk (state.py) and the trainer with DDP (trainer.py)."""

from did_engine.training.config import TrainConfig, TrainConfigError  # noqa: F401
from did_engine.training.state import StorageFullError  # noqa: F401
from did_engine.training.trainer import Trainer, train  # noqa: F401
