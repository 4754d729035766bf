"""sbtrainer: SharpBalance ensembles (Lu et al., NeurIPS 2024) for the HuggingFace Trainer."""

__version__ = "0.1.0"
