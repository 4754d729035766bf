"""The SAM ascent and restore, with no Trainer knowledge.

SAM (Foret et al., ICLR 2021, eq. 2): ``eps = rho * g / ||g||``; the descent gradient is taken at
``theta + eps``. ASAM (Kwon et al., ICML 2021, eq. 9): ``eps = rho * T^2 g / ||T g||`` with
``T = diag(|theta|)``. Rules every SAM step here obeys:

- the perturbed pass leaves no trace in the model's state: every buffer (BatchNorm running statistics,
  a hand-written norm layer's statistics, step counters, any dtype) is restored bitwise after it
  (:func:`frozen_buffers`), so after a step the buffers are exactly what the passes at ``theta`` leave;
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
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Leave every buffer of ``module`` (all submodules, any dtype) bitwise as it was on entry.

    What a forward may do to its state is keyed on the state, not on the class that holds it: torch's BatchNorm
    and a hand-written norm layer updating its own running buffers are treated alike. On exit each buffer that
    existed on entry gets its entry value back IN PLACE (the tensor object stays the one optimizers, hooks or
    other references hold), a buffer REASSIGNED inside the block (``self.running_mean = ...``) is put back to the
    original tensor, and buffers registered inside the block are removed again. The module keeps computing with
    batch statistics in train mode; only the stored state is restored. State kept outside buffers (plain Python
    attributes) is not seen: register it with ``register_buffer``.
    """
    mods = list(module.modules())
    entry = [(m, dict(m._buffers), set(m._non_persistent_buffers_set)) for m in mods]
    copies: dict[int, torch.Tensor] = {}
    for _, buffers, _ in entry:
        for b in buffers.values():
            if b is not None and id(b) not in copies:
                copies[id(b)] = b.detach().clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers, non_persistent in entry:
                m._buffers.clear()
                m._buffers.update(buffers)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
                for b in buffers.values():
                    if b is None:
                        continue
                    saved = copies[id(b)]
                    if b.shape == saved.shape and b.dtype == saved.dtype:
                        b.copy_(saved)
                    else:  # resized or re-typed in place
                        b.data = saved.clone()


frozen_norm_stats = frozen_buffers
"""The former name of :func:`frozen_buffers` (it now restores every buffer, not only BatchNorm statistics)."""


def _owns_running_state(m: nn.Module) -> bool:
    return any(b is not None and b.is_floating_point() and name not in m._non_persistent_buffers_set
               for name, b in m._buffers.items())


@contextlib.contextmanager
def single_sample_norm_eval(module: nn.Module) -> Iterator[None]:
    """Normalise a 1-sample batch with running statistics: batch statistics of one sample are undefined.

    Inside the block ``training`` is False on every submodule in training mode that OWNS (non-recursively) a
    persistent floating-point buffer, the state that data statistics live in: torch's BatchNorm, a hand-written
    norm layer with ``register_buffer("running_mean", ...)``, any such layer alike. The flag is set on that module
    alone (not ``.eval()``, which recurses and may be overridden), so its children keep their mode: a Dropout
    child still drops. Flags are restored on exit.

    Modules whose buffers are index tables or caches are left in train mode: HF ``position_ids`` /
    ``token_type_ids`` and index buffers are integer, rotary ``inv_freq`` and attention masks are registered
    ``persistent=False`` (derived constants, rebuilt at construction, never saved). This matters because a few HF
    modules that own such buffers use ``self.training`` for something else (functional dropout in XLM's model and
    CLVP's attention, LeViT's cached attention biases, RoPE augmentation in DINOv3); switching them would change
    more than the normalisation. A module that owns persistent float buffers and also uses ``self.training`` for
    dropout or noise (e.g. an MoE router's correction bias with jitter) does lose that for the 1-sample batch.
    """
    switched = [m for m in module.modules() if m.training and _owns_running_state(m)]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


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
