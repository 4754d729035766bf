"""How a member is called and what its loss is: one adapter for HF `PreTrainedModel`s and plain modules.

Every module that runs a member on a batch (trainer, scoring, sharpness, metrics helpers) goes
through :func:`call_member`, so a member is either

- a HuggingFace ``PreTrainedModel`` (called with the batch's model inputs as keywords, ``.logits`` read), or
- a plain ``nn.Module`` taking the one tensor named ``input_name`` and returning logits ``(B, C)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: ``loss_fn(logits (B, C), labels (B,)) -> (B,)``: a member's per-sample loss. Used by training (mean over
#: the sub-batch), evaluation (``eval_loss``), the ensemble's ``.loss``, scoring (its square gradient norm per
#: row) and the sharpness measures (mean over the batch). A function returning the batch mean also works
#: wherever it is applied to one row at a time (scoring).
MemberLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The default member loss: per-sample cross-entropy ``(B,)`` (float32) of logits ``(B, C)``, labels ``(B,)``.

    With ``label_smoothing=0`` it is the NLL whose squared per-sample gradient norm is the empirical Fisher
    trace of paper Sec. 4.3.
    """
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)


def mean_member_loss(loss_fn: MemberLoss, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 0-d mean over the batch of ``loss_fn(logits, labels)`` (per-sample ``(B,)``, or already a mean)."""
    return loss_fn(logits, labels).mean()

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
