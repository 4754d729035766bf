"""sbtrainer: SharpBalance ensembles (Lu et al., NeurIPS 2024) for the HuggingFace Trainer."""

import os

# SharpBalance's S/N sub-batches change size every step; on CPU the default oneDNN primitive cache
# (1024) thrashes on a ResNet18 and adds ~100 ms a step (benchmarks/step_cost.py --onednn-cache).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

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
