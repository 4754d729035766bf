"""The SAM ascent and restore, with no Trainer knowledge.

SAM (Foret et al., ICLR 2021, eq. 2): ``eps = rho * g / ||g||``; the descent gradient is taken at
``theta + eps``. ASAM (Kwon et al., ICML 2021, eq. 9): ``eps = rho * T^2 g / ||T g||`` with
``T = diag(|theta|)``. Rules every SAM step here obeys (DESIGN.md §1):

- the perturbed pass does not update BatchNorm running statistics (:func:`frozen_norm_stats`);
- weights are restored bitwise after the perturbed pass (a copy is restored, ``eps`` is never subtracted);
- a non-finite (or zero) ascent gradient gives ``eps = 0`` for that step, never corrupted weights;
- previously accumulated ``.grad`` is stashed so the ascent gradient never mixes with it.

All functions work on lists of parameters and avoid host syncs (no ``.item()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def sam_epsilon(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float, adaptive: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The ascent perturbation of SAM / ASAM.

    Args:
        params: parameters ``theta_j`` (any shapes).
        grads: their gradients ``g_j`` (same shapes).
        rho: radius (>= 0).
        adaptive: ASAM scaling by ``|theta|``.

    Returns:
        ``(eps, norm, ok)``: ``eps_j`` shaped like ``params``; ``norm`` the 0-d norm ``||T g||``
        (``||g||`` if not adaptive); ``ok`` a 0-d bool, False when the norm is zero or non-finite, in
        which case every ``eps_j`` is zero.
    """
    if adaptive:
        abs_params = [p.detach().abs() for p in params]
        scaled = torch._foreach_mul(list(grads), abs_params)  # T g
    else:
        scaled = list(grads)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled, 2.0)).float())
    ok = torch.isfinite(norm) & (norm > 0)
    factor = torch.where(ok, rho / norm.clamp_min(1e-30), torch.zeros_like(norm))
    eps = torch._foreach_mul(scaled, abs_params) if adaptive else [g.clone() for g in scaled]  # T^2 g or g
    eps = torch._foreach_mul(eps, factor)
    eps = [torch.where(ok, e, torch.zeros_like(e)) for e in eps]  # NaN * 0 is NaN: select, never multiply
    return eps, norm, ok


@contextlib.contextmanager
def perturbed(params: Sequence[torch.Tensor], eps: Sequence[torch.Tensor]) -> Iterator[None]:
    """Move ``params`` to ``theta + eps`` inside the block; restore the exact previous values on exit."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(list(params), list(eps))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running statistics (mean, var, num_batches_tracked) exactly as they were on entry.

    The module keeps normalising with batch statistics in train mode; only the running buffers are restored.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            saved.append((m, [b.detach().clone() if b is not None else None for b in _bn_buffers(m)]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for live, copy in zip(_bn_buffers(m), buffers):
                    if live is not None:
                        live.copy_(copy)


def _bn_buffers(m: _BatchNorm) -> list[torch.Tensor | None]:
    return [m.running_mean, m.running_var, m.num_batches_tracked]


def stash_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Take the accumulated ``.grad`` off ``params`` (set to None) and return it."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def unstash_grads(params: Sequence[torch.Tensor], stash: Sequence[torch.Tensor | None]) -> None:
    """Add the stashed gradients back onto ``params``' current ``.grad``."""
    for p, g in zip(params, stash):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
