"""sbtrainer: SharpBalance ensembles (Lu et al., NeurIPS 2024) for the HuggingFace Trainer."""

from .callbacks import SharpnessScoringCallback
from .config import SharpBalanceConfig
from .ensemble import EnsembleModel, EnsembleOutput
from .partition import partition
from .scoring import per_sample_sharpness
from .trainer import SharpBalanceTrainer

__version__ = "0.1.0"

__all__ = [
    "EnsembleModel",
    "EnsembleOutput",
    "SharpBalanceConfig",
    "SharpBalanceTrainer",
    "SharpnessScoringCallback",
    "partition",
    "per_sample_sharpness",
]
