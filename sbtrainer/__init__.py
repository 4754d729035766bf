"""sbtrainer: SharpBalance ensembles (Lu et al., NeurIPS 2024) for the HuggingFace Trainer.

The public names are loaded lazily (as TRL does): ``import sbtrainer.metrics`` (or ``.sam``,
``.partition``, ``.scoring``, ``.sharpness``, ``.theory``) does not import ``transformers.Trainer``;
only ``SharpBalanceTrainer``, ``SharpBalanceConfig`` and the Hub functions need transformers.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# SharpBalance's S/N sub-batches change size every step; on CPU the default oneDNN primitive cache
# (1024) thrashes on a ResNet18 and adds ~100 ms a step (benchmarks/step_cost.py --onednn-cache).
# It is read when torch first creates a oneDNN primitive, so it must be set before training starts.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

try:
    __version__ = version("sbtrainer")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "EnsembleModel": "ensemble",
    "EnsembleOutput": "ensemble",
    "SharpBalanceConfig": "config",
    "SharpBalanceTrainer": "trainer",
    "score_members": "scoring",
    "partition": "partition",
    "per_sample_sharpness": "scoring",
}

__all__ = [
    "EnsembleModel",
    "EnsembleOutput",
    "SharpBalanceConfig",
    "SharpBalanceTrainer",
    "partition",
    "per_sample_sharpness",
    "score_members",
]

if TYPE_CHECKING:
    from .config import SharpBalanceConfig
    from .ensemble import EnsembleModel, EnsembleOutput
    from .partition import partition
    from .scoring import per_sample_sharpness, score_members
    from .trainer import SharpBalanceTrainer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sbtrainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
