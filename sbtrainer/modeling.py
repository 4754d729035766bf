"""How a member is called: one adapter for HF `PreTrainedModel`s and plain modules.

Every module that runs a member on a batch (trainer, scoring, sharpness, metrics helpers) goes
through :func:`call_member`, so a member is either

- a HuggingFace ``PreTrainedModel`` (called with the batch's model inputs as keywords, ``.logits`` read), or
- a plain ``nn.Module`` taking the one tensor named ``input_name`` and returning logits ``(B, C)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

# Batch keys that are never model inputs.
LABEL_KEYS = ("labels", "label", "label_ids")
INDEX_KEYS = ("sample_index", "member_index")
NON_INPUT_KEYS = frozenset(LABEL_KEYS + INDEX_KEYS)


def is_hf_model(module: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (duck-typed: has ``config`` and ``save_pretrained``)."""
    return hasattr(module, "config") and hasattr(module, "save_pretrained") and hasattr(module, "main_input_name")


def member_input_names(member: nn.Module, input_name: str = "pixel_values") -> list[str]:
    """Names of the batch columns ``member`` consumes (its ``forward`` parameters, or ``[input_name]``)."""
    if not is_hf_model(member):
        return [input_name]
    params = inspect.signature(member.forward).parameters
    return [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in LABEL_KEYS]


def model_inputs(batch: Mapping[str, torch.Tensor], member: nn.Module, input_name: str = "pixel_values") -> dict:
    """The subset of ``batch`` that ``member`` takes as inputs (labels and index columns dropped)."""
    if not is_hf_model(member):
        if input_name not in batch:
            raise KeyError(f"batch has no input column {input_name!r} (input_name); columns: {sorted(batch)}")
        return {input_name: batch[input_name]}
    names = set(member_input_names(member, input_name))
    return {k: v for k, v in batch.items() if k in names and k not in NON_INPUT_KEYS}


def batch_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The labels ``(B,)`` of ``batch`` (column ``labels``, ``label`` or ``label_ids``)."""
    for key in LABEL_KEYS:
        if key in batch:
            return batch[key]
    raise ValueError(f"batch must have a label column (one of {LABEL_KEYS}); columns: {sorted(batch)}")


def call_member(member: nn.Module, inputs: Mapping[str, torch.Tensor], input_name: str = "pixel_values") -> torch.Tensor:
    """Run ``member`` on ``inputs`` (already filtered by :func:`model_inputs`) and return logits ``(B, C)``."""
    if is_hf_model(member):
        out = member(**inputs)
        return out.logits if hasattr(out, "logits") else out[0]
    return member(inputs[input_name])
