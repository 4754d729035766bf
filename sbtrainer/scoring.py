"""Per-sample sharpness ``s(x) = ||grad_theta loss(f_theta(x), y)||^2`` (paper Sec. 4.3).

The squared per-sample gradient norm approximates the trace of the empirical Fisher (Bottou et al.,
2018). It is computed with the model in eval mode (BatchNorm on running statistics, no dropout), so
samples are independent, over the rows the caller gives, in row order; every buffer of the model is
restored afterwards (a forward that updates state even in eval mode leaves no trace). Four
implementations give the same numbers:

- ``"hooks"`` (`sbtrainer.ghost_norm.batch_scores_hooks`): one batched forward and an activation-only backward;
  plain modules built from Conv2d/Linear/BatchNorm in which every trainable parameter is used once per forward,
  by its own module, e.g. timm ResNets (1.0-1.5x a plain forward+backward in benchmarks/scoring.py);
- ``"ghost"`` (`sbtrainer.ghost_norm.batch_scores_ghost`): the same single batched pass for transformer members,
  HF (BERT, ALBERT: keyword inputs) or plain (timm ViT): Linear on token sequences, LayerNorm, Embedding, a
  patch-embedding Conv2d, bare parameters added to the activations (``cls_token``, ``pos_embed``) and layers
  shared across depth (ALBERT: the cross terms between a layer's calls are included);
- chunked ``torch.func`` (``"vmap"``; fails on HF BERT/ALBERT, whose mask handling branches on data);
- a one-sample-at-a-time ``"loop"``.

``"hooks"`` and ``"ghost"`` decide whether they are exact from the model's structure and its autograd graph on
every batch (``NotImplementedError`` otherwise: for hooks, shared weights, a module called twice, a derived
weight such as ``torch.nn.utils.prune``'s, a weight reused functionally; for ghost, see its docstring).
``method="auto"`` tries hooks, then ghost for members holding a LayerNorm or an Embedding (or HF models), then
vmap, then the loop, logging each fallback once per model class; on the first batch of hooks or ghost it also
compares the first two samples with the loop (a secondary guard); if a later batch fails the structural check,
``auto`` falls back from that batch on.
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

from .ghost_norm import batch_scores_ghost, batch_scores_hooks, transformer_like
from .member_adapter import (
    MemberLoss,
    batch_labels,
    call_member,
    cross_entropy_per_sample,
    is_hf_model,
    model_inputs,
)
from .sam import frozen_buffers

logger = logging.getLogger(__name__)

LossFn = MemberLoss
_VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)
_WARNED: set[str] = set()  # (model class, method) already reported as unusable
SCORE_METHODS = ("auto", "hooks", "ghost", "vmap", "loop")


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
    member: nn.Module, batch: dict, input_name: str = "pixel_values", loss_fn: LossFn = cross_entropy_per_sample
) -> torch.Tensor:
    """Scores ``(B,)`` of one batch, one sample at a time with ``torch.autograd.grad``."""
    params = [p for p in member.parameters() if p.requires_grad]
    inputs, labels = model_inputs(batch, member, input_name), batch_labels(batch)
    out = []
    for j in range(labels.shape[0]):
        one = {k: v[j : j + 1] for k, v in inputs.items()}
        loss = loss_fn(call_member(member, one, input_name).float(), labels[j : j + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return torch.stack(out).cpu()  # one device-to-host copy per batch, not per sample


def batch_scores_vmap(
    member: nn.Module, batch: dict, input_name: str = "pixel_values", loss_fn: LossFn = cross_entropy_per_sample
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
        return loss_fn(logits.float(), y.unsqueeze(0)).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, labels)
    total = sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())
    return total.detach().cpu()


def score_members(
    members: Sequence[nn.Module],
    dataset: Dataset,
    *,
    rows: Sequence[int] | None = None,
    collate_fn: Callable | None = None,
    batch_size: int = 64,
    method: str = "auto",
    input_name: str = "pixel_values",
    loss_fn: LossFn = cross_entropy_per_sample,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "scoring",
    prepare: Callable[[dict], dict] | None = None,
) -> torch.Tensor:
    """Per-sample sharpness ``(len(members), len(rows))`` float32 of each member on ``dataset[rows]``.

    Every row is read and collated ONCE and scored by all the given members (any subset of an ensemble's
    members, e.g. the ones a process owns). ``dataset`` yields dict examples with a label column;
    ``collate_fn`` batches them (default ``transformers.default_data_collator``). The dataset should carry
    no augmentation: pass the eval-time view of the training set. ``loss_fn(logits (B, C), labels (B,))`` is
    the per-sample loss ``(B,)`` (the member loss of `sbtrainer.member_adapter`; it is applied to one row at a time,
    so a batch-mean loss works too); the default, the per-sample NLL, makes the score the empirical Fisher
    trace of paper Sec. 4.3. Each member is scored in eval mode with its buffers restored afterwards.
    ``prepare``, if given, maps each collated batch after it is moved to ``device`` (e.g. a device-side
    image pipeline's clean view).

    Raises:
        ValueError: an unknown ``method`` or ``batch_size < 1``.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"per_sample_sharpness: method must be one of {SCORE_METHODS}; got {method!r}")
    if batch_size < 1:
        raise ValueError(f"per_sample_sharpness: batch_size must be >= 1; got {batch_size}")
    members = list(members)
    if not members:
        return torch.empty(0, 0 if rows is None else len(rows))
    device = torch.device(device) if device is not None else next(members[0].parameters()).device
    methods = [method] * len(members)
    chunks: list[list[torch.Tensor]] = [[] for _ in members]
    with contextlib.ExitStack() as stack:
        for member in members:
            stack.enter_context(eval_mode(member))
            stack.enter_context(frozen_buffers(member))
        for batch in tqdm(_batches(dataset, rows, collate_fn, batch_size), desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if prepare is not None:
                batch = prepare(batch)
            for i, member in enumerate(members):
                scores, methods[i] = _score_batch(member, batch, methods[i], input_name, loss_fn)
                chunks[i].append(scores)
    if not chunks[0]:
        return torch.empty(len(members), 0)
    return torch.stack([torch.cat(c) for c in chunks])


def per_sample_sharpness(member: nn.Module, dataset: Dataset, *, desc: str = "sharpness", **kwargs) -> torch.Tensor:
    """Per-sample sharpness ``(len(rows),)`` float32 of one ``member``: `score_members` for one member.

    Keyword arguments (``rows``, ``collate_fn``, ``batch_size``, ``method``, ``input_name``, ``loss_fn``,
    ``device``, ``progress``, ``prepare``) are those of `score_members`.
    """
    return score_members([member], dataset, desc=desc, **kwargs)[0]


def is_scoring_epoch(epoch: int, start: int, every: int | None) -> bool:
    """True when scoring is due at the start of ``epoch``: ``start`` (Td), then every ``every`` epochs if set."""
    if epoch < start:
        return False
    return epoch == start or (every is not None and (epoch - start) % every == 0)


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
    scores = batch_scores_hooks(member, batch[input_name], labels, _summed_loss(loss_fn)).cpu()
    return _verified(scores, member, batch, input_name, loss_fn, verify, "hooks")


def _fallback(member: nn.Module, method: str, err: Exception, to: str) -> None:
    key = f"{type(member).__name__}/{method}"
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s scoring is not available for %s (%s: %s); using %s.", method, type(member).__name__,
                       type(err).__name__, err, to)


def batch_scores_ghost_checked(
    member: nn.Module, batch: dict, input_name: str, loss_fn: LossFn, verify: int = 0
) -> torch.Tensor:
    """Scores ``(B,)`` by `sbtrainer.ghost_norm.batch_scores_ghost` (transformer members, HF or plain).

    With ``verify > 0`` the first samples are also checked against the loop (a secondary guard, as for hooks).

    Raises:
        NotImplementedError: members it cannot score exactly (see `sbtrainer.ghost_norm.batch_scores_ghost`) or a
            mismatch with the loop.
    """
    inputs, labels = model_inputs(batch, member, input_name), batch_labels(batch)
    scores = batch_scores_ghost(member, lambda: call_member(member, inputs, input_name), labels,
                                _summed_loss(loss_fn)).cpu()
    return _verified(scores, member, batch, input_name, loss_fn, verify, "ghost")


def _summed_loss(loss_fn: LossFn) -> LossFn | None:
    """None for cross-entropy (the batched passes sum it themselves), else the loss, summed over 1-row slices."""
    return None if loss_fn in (F.cross_entropy, cross_entropy_per_sample) else loss_fn


def _verified(scores: torch.Tensor, member: nn.Module, batch: dict, input_name: str, loss_fn: LossFn, verify: int,
              method: str) -> torch.Tensor:
    """``scores``, after comparing the first ``verify`` samples with the loop (``NotImplementedError`` if they differ)."""
    if verify:
        head = {k: v[:verify] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        expected = batch_scores_loop(member, head, input_name, loss_fn)
        if not torch.allclose(scores[:verify], expected, rtol=1e-3, atol=1e-8):
            raise NotImplementedError(f"{method} scores {scores[:verify].tolist()} differ from the loop's {expected.tolist()}")
    return scores


def _score_batch(member, batch, method, input_name, loss_fn) -> tuple[torch.Tensor, str]:
    """Scores of one batch and the method for the next.

    ``method`` is a `SCORE_METHODS` entry or the state auto keeps between batches: ``"auto-hooks"`` /
    ``"auto-ghost"`` (chosen by auto, may still fall back on a later batch), ``"auto-vmap"``.
    """
    if method == "loop":
        return batch_scores_loop(member, batch, input_name, loss_fn), method
    verify = 2 if method == "auto" else 0  # the sampled guard runs on auto's first batch of a fast method
    if method in ("auto", "auto-hooks", "hooks"):
        try:
            scores = batch_scores_hooks_checked(member, batch, input_name, loss_fn, verify)
            return scores, "hooks" if method == "hooks" else "auto-hooks"
        except NotImplementedError as err:
            if method == "hooks":
                raise
            verify = 2  # ghost's first batch under auto
            to_ghost = transformer_like(member) or is_hf_model(member)
            _fallback(member, "hooks", err, "ghost" if to_ghost else "vmap")
            method = "auto-ghost" if to_ghost else "auto-vmap"
    if method in ("auto-ghost", "ghost"):
        try:
            scores = batch_scores_ghost_checked(member, batch, input_name, loss_fn, verify)
            return scores, method
        except NotImplementedError as err:
            if method == "ghost":
                raise
            _fallback(member, "ghost", err, "vmap")
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
