"""Per-sample sharpness ``s(x) = ||grad_theta loss(f_theta(x), y)||^2`` (paper Sec. 4.3).

The squared per-sample gradient norm approximates the trace of the empirical Fisher (Bottou et al.,
2018). It is computed with the model in eval mode (BatchNorm on running statistics, no dropout), so
samples are independent, over the rows the caller gives, in row order; every buffer of the model is
restored afterwards (a forward that updates state even in eval mode leaves no trace). Three
implementations give the same numbers: ``"hooks"`` (`sbtrainer.ghost_norm`: one batched forward and an
activation-only backward; plain modules built from Conv2d/Linear/BatchNorm in which every trainable
parameter is used once per forward, by its own module, e.g. timm ResNets; 1.0-1.5x a plain
forward+backward in benchmarks/scoring.py), chunked ``torch.func`` (``"vmap"``) and a one-sample-at-a-time
``"loop"``. ``"hooks"`` decides whether it is exact from the model's structure and its autograd graph on
every batch (shared weights, a module called twice, a derived weight such as ``torch.nn.utils.prune``'s, a
weight reused functionally: ``NotImplementedError``). ``method="auto"`` tries hooks (on its first batch it
also compares the first two samples with the loop, a secondary guard), then vmap, then the loop, logging
each fallback once per model class; if a later batch fails the structural check, ``auto`` falls back from
that batch on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .ghost_norm import batch_scores_hooks
from .modeling import batch_labels, call_member, is_hf_model, model_inputs
from .sam import frozen_buffers

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)
_WARNED: set[str] = set()  # (model class, method) already reported as unusable
SCORE_METHODS = ("auto", "hooks", "vmap", "loop")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode inside the block, restoring each submodule's previous mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _trainable(member: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in member.named_parameters() if p.requires_grad}


def batch_scores_loop(
    member: nn.Module, batch: dict, input_name: str = "pixel_values", loss_fn: LossFn = F.cross_entropy
) -> torch.Tensor:
    """Scores ``(B,)`` of one batch, one sample at a time with ``torch.autograd.grad``."""
    params = [p for p in member.parameters() if p.requires_grad]
    inputs, labels = model_inputs(batch, member, input_name), batch_labels(batch)
    out = []
    for j in range(labels.shape[0]):
        one = {k: v[j : j + 1] for k, v in inputs.items()}
        loss = loss_fn(call_member(member, one, input_name).float(), labels[j : j + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return torch.stack(out).cpu()  # one device-to-host copy per batch, not per sample


def batch_scores_vmap(
    member: nn.Module, batch: dict, input_name: str = "pixel_values", loss_fn: LossFn = F.cross_entropy
) -> torch.Tensor:
    """Scores ``(B,)`` of one batch with ``torch.func.grad`` vmapped over the samples."""
    params = _trainable(member)
    buffers = dict(member.named_buffers())
    inputs, labels = model_inputs(batch, member, input_name), batch_labels(batch)
    hf = is_hf_model(member)

    def sample_loss(p: dict, x: dict, y: torch.Tensor) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in x.items()}
        if hf:
            out = functional_call(member, (p, buffers), args=(), kwargs=one)
            logits = out.logits if hasattr(out, "logits") else out[0]
        else:
            logits = functional_call(member, (p, buffers), args=(one[input_name],))
        return loss_fn(logits.float(), y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, labels)
    total = sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())
    return total.detach().cpu()


def per_sample_sharpness(
    member: nn.Module,
    dataset: Dataset,
    *,
    rows: Sequence[int] | None = None,
    collate_fn: Callable | None = None,
    batch_size: int = 64,
    method: str = "auto",
    input_name: str = "pixel_values",
    loss_fn: LossFn = F.cross_entropy,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "sharpness",
) -> torch.Tensor:
    """Per-sample sharpness ``(len(rows),)`` float32 of ``member`` on ``dataset[rows]`` (all rows by default).

    ``dataset`` yields dict examples with a labels column; ``collate_fn`` batches them (default
    ``transformers.default_data_collator``). The dataset should carry no augmentation: pass the
    eval-time view of the training set.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"per_sample_sharpness: method must be one of {SCORE_METHODS}; got {method!r}")
    if batch_size < 1:
        raise ValueError(f"per_sample_sharpness: batch_size must be >= 1; got {batch_size}")
    device = torch.device(device) if device is not None else next(member.parameters()).device
    batches = _batches(dataset, rows, collate_fn, batch_size)
    chunks = []
    with eval_mode(member), frozen_buffers(member):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            scores, method = _score_batch(member, batch, method, input_name, loss_fn)
            chunks.append(scores)
    return torch.cat(chunks) if chunks else torch.empty(0)


def batch_scores_hooks_checked(
    member: nn.Module, batch: dict, input_name: str, loss_fn: LossFn, verify: int = 0
) -> torch.Tensor:
    """Scores ``(B,)`` by `sbtrainer.ghost_norm`; with ``verify > 0`` the first samples are also checked against the loop.

    Exactness is decided by structure in `sbtrainer.ghost_norm` on every call; ``verify`` is a secondary guard for
    what structure cannot show (a parameter-free module mixing the rows of a batch).

    Raises:
        NotImplementedError: members it cannot score exactly (HF models, unsupported layers, a parameter with more
            than one use per forward, a mismatch with the loop).
    """
    if is_hf_model(member):
        raise NotImplementedError("hooks scoring takes plain modules with one input tensor")
    labels = batch_labels(batch)
    per_sample = None if loss_fn is F.cross_entropy else loss_fn  # summed over 1-row slices, as the loop does
    scores = batch_scores_hooks(member, batch[input_name], labels, per_sample).cpu()
    if verify:
        head = {k: v[:verify] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        expected = batch_scores_loop(member, head, input_name, loss_fn)
        if not torch.allclose(scores[:verify], expected, rtol=1e-3, atol=1e-8):
            raise NotImplementedError(f"hooks scores {scores[:verify].tolist()} differ from the loop's {expected.tolist()}")
    return scores


def _fallback(member: nn.Module, method: str, err: Exception, to: str) -> None:
    key = f"{type(member).__name__}/{method}"
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s scoring is not available for %s (%s: %s); using %s.", method, type(member).__name__,
                       type(err).__name__, err, to)


def _score_batch(member, batch, method, input_name, loss_fn) -> tuple[torch.Tensor, str]:
    """Scores of one batch and the method for the next (``"auto-hooks"``: hooks chosen by auto, may still fall back)."""
    if method == "loop":
        return batch_scores_loop(member, batch, input_name, loss_fn), method
    if method in ("auto", "auto-hooks", "hooks"):
        try:
            verify = 2 if method == "auto" else 0
            scores = batch_scores_hooks_checked(member, batch, input_name, loss_fn, verify)
            return scores, "hooks" if method == "hooks" else "auto-hooks"
        except NotImplementedError as err:
            if method == "hooks":
                raise
            _fallback(member, "hooks", err, "vmap")
            method = "auto-vmap"
    try:
        return batch_scores_vmap(member, batch, input_name, loss_fn), method
    except _VMAP_ERRORS as err:
        if method == "vmap":
            raise
        _fallback(member, "vmap", err, "the per-sample loop (score_method='loop' skips the attempt)")
        return batch_scores_loop(member, batch, input_name, loss_fn), "loop"


def _batches(dataset: Dataset, rows: Sequence[int] | None, collate_fn: Callable | None, batch_size: int) -> Iterable:
    if collate_fn is None:
        from transformers import default_data_collator

        collate_fn = default_data_collator
    subset = dataset if rows is None else Subset(dataset, list(rows))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
