"""The per-member (subset-)SAM step and its parts, with no Trainer knowledge (`subset_sam_step`).

SAM (Foret et al., ICLR 2021, eq. 2): ``eps = rho * g / ||g||``; the descent gradient is taken at
``theta + eps``. ASAM (Kwon et al., ICML 2021, eq. 9): ``eps = rho * T^2 g / ||T g||`` with
``T = diag(|theta|)``. GSAM (Zhuang et al., ICLR 2022, Algorithm 1): the descent direction is
``g_p - alpha * g_perp`` with ``g_p`` the gradient at ``theta + eps`` and ``g_perp`` the part of ``g``
orthogonal to ``g_p`` (:func:`gsam_descent_`); it reuses the two gradients SAM computes anyway.
Rules every SAM step here obeys:

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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def select_rows(batch: Mapping[str, Any], rows: torch.Tensor, total: int, device: torch.device | None = None) -> dict:
    """Rows ``rows`` (CPU int64) of every per-sample tensor of ``batch`` (first dim == ``total``); other values as they are.

    A contiguous run of rows is a slice (a view, no copy); other rows are gathered on ``device``.
    """
    contiguous = rows.numel() > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.numel()
    index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows.to(device or "cpu", non_blocking=True)

    def pick(v):
        if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total):
            return v
        return v[index]  # a slice is a view; advanced indexing keeps channels_last (index_select does not)

    return {k: pick(v) for k, v in batch.items()}


@dataclass
class StepResult:
    """What one member's step leaves besides ``.grad``.

    loss: 0-d, the mean loss at θ over the sub-batch (detached). ascent_norm: 0-d ``‖∇L_S(θ)‖`` (``‖T ∇L_S‖``
    for ASAM), unscaled; None when no ascent was taken. sam_rows: ``|S|``.
    """

    loss: torch.Tensor
    ascent_norm: torch.Tensor | None
    sam_rows: int


AscentRule = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float, bool],
                      tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]

SAM_VARIANTS = ("sam", "gsam")
"""The descent rules of `subset_sam_step`: SAM's ``g_p`` itself, or GSAM's ``g_p - alpha * g_perp``."""


def gsam_descent_(
    descent: Sequence[torch.Tensor], ascent: Sequence[torch.Tensor], alpha: float, ok: torch.Tensor | None = None
) -> torch.Tensor:
    """GSAM's descent direction (Zhuang et al., ICLR 2022, Algorithm 1), written IN PLACE over ``descent``.

    With ``g`` = ``ascent`` (the gradient at θ) and ``g_p`` = ``descent`` (the gradient at θ + ε)::

        g_perp = g - (<g, g_p> / ||g_p||^2) g_p          (the part of g orthogonal to g_p)
        descent <- g_p - alpha * g_perp = (1 + alpha <g, g_p>/||g_p||^2) g_p - alpha g

    The inner product and norm run over all tensors together (one flat vector), accumulated in float32
    (float64 for float64 tensors). The map is homogeneous: scaling ``g`` and ``g_p`` by one common factor
    (a loss scale) scales the result by it, so both may be read before a GradScaler's unscale as long as
    they carry the SAME scale. A caller whose ``descent`` is ``c * g_p`` (a row weight) passes ``c * alpha``
    here and gets ``c * (g_p - alpha g_perp)``, since the projection does not depend on ``g_p``'s length.

    Where ``||g_p|| = 0``, ``<g, g_p>`` or ``||g_p||`` is non-finite, or ``ok`` is False, ``descent`` is left
    bitwise as it is (GSAM degrades to SAM for that step; a non-finite ``g_p`` stays visible to a loss
    scaler's inf check). No host sync: the choice is made on the device.

    Args:
        descent: ``g_p``, a list of tensors (any shapes); overwritten with the GSAM direction.
        ascent: ``g``, tensors shaped like ``descent``; read only.
        alpha: GSAM's α (>= 0); ``alpha == 0`` returns at once and touches nothing (bitwise SAM).
        ok: optional 0-d bool, e.g. the ascent rule's ``ok`` (False: ``g`` was zero or non-finite).

    Returns:
        A 0-d bool on the device: True where the correction was applied.

    Raises:
        ValueError: ``alpha`` negative or not finite, or ``descent`` and ``ascent`` of different lengths.
    """
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"gsam_descent_: alpha must be finite and >= 0; got {alpha!r}")
    if len(descent) != len(ascent):
        raise ValueError(f"gsam_descent_: descent and ascent must have the same length; got {len(descent)} and "
                         f"{len(ascent)}")
    if not descent:
        return torch.zeros((), dtype=torch.bool)
    device = descent[0].device
    if alpha == 0.0:
        return torch.zeros((), dtype=torch.bool, device=device)
    acc = torch.float64 if any(d.dtype == torch.float64 for d in descent) else torch.float32
    dot = torch.stack([torch.dot(a.reshape(-1).to(acc), d.reshape(-1).to(acc)) for a, d in zip(ascent, descent)]).sum()
    sq = torch.stack([n.to(acc) for n in torch._foreach_norm(list(descent), 2.0)]).square().sum()
    good = torch.isfinite(dot) & torch.isfinite(sq) & (sq > 0)
    if ok is not None:
        good = good & ok.to(device)
    coef = torch.where(good, dot / sq.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(sq))
    scale = 1.0 + alpha * coef  # exactly 1 where not good: descent * 1 is descent bitwise
    zero = torch.zeros((), dtype=acc, device=device)
    with torch.no_grad():
        for d, a in zip(descent, ascent):
            d.mul_(scale.to(d.dtype)).add_(torch.where(good, a, zero.to(a.dtype)), alpha=-alpha)  # + (-0.0): exact
    return good



def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value


def subset_sam_step(
    member: nn.Module,
    loss_of: Callable[[dict, int], torch.Tensor],
    batch: dict,
    sam_mask: torch.Tensor,
    rho: float,
    *,
    row_weight: float,
    adaptive: bool = False,
    device: torch.device | None = None,
    backward: Callable[[torch.Tensor], None] = _backward,
    unscale: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ascent: AscentRule | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    variant: str = "sam",
    gsam_alpha: float = 0.0,
) -> StepResult:
    """One member's (subset-)SAM step (paper Sec. 4.3, eq. 3): ADD to ``.grad`` the gradient of ``row_weight * Σ_rows loss``.

    With ``S`` the rows where ``sam_mask`` is True and ``N`` the rest of the sub-batch ``B``::

        .grad += row_weight * ( |S| d_S + |N| ∇L_N(θ) ),   ε_S = ascent(∇L_S(θ)) (SAM: ρ g/‖g‖)

    with ``d_S = ∇L_S(θ + ε_S)`` (``variant="sam"``) or GSAM's ``d_S = g_p − α g_⊥`` (``variant="gsam"``;
    ``g = ∇L_S(θ)``, ``g_p = ∇L_S(θ + ε_S)``, ``g_⊥`` the part of ``g`` orthogonal to ``g_p``;
    :func:`gsam_descent_`), at the same cost: two passes on S, one on N. So ``row_weight = 1/|B|`` gives the mean over the batch, and ``1/(rows in the accumulation window)``
    weighs every row of a window equally. ``S = ∅`` or ``rho = 0`` is one plain pass; ``S = B`` is SAM.
    Order: stash the accumulated ``.grad``; ascent pass on S at θ; ε; perturbed pass on S at θ+ε with every
    buffer restored afterwards and the weights restored bitwise; plain pass on N at θ; unstash.

    Args:
        member: the module trained (its trainable parameters get the gradient).
        loss_of: ``loss_of(sub_batch, rows)`` -> 0-d mean loss of ``member`` over the sub-batch (the member
            loss; it may switch norm layers to running statistics for 1 row).
        batch: the sub-batch ``B``, a dict of tensors with ``B`` rows (other values passed through).
        sam_mask: bool ``(B,)`` on CPU.
        rho: radius (>= 0).
        row_weight: the weight of one row's loss gradient.
        adaptive: ASAM scaling by ``|θ|``.
        device: where gathered (non-contiguous) rows are put.
        backward: ``backward(loss)``; a loss scaler's ``scale(loss).backward()`` under mixed precision.
        unscale: divides a gradient quantity read before the unscale by the loss scale (for the log).
        ascent: the perturbation rule ``(params, grads, rho, adaptive) -> (eps, norm, ok)``; default
            :func:`sam_epsilon` (SAM/ASAM).
            ε must not depend on a loss scale (SAM's and ASAM's do not: they normalise the gradient).
        autocast: context manager for the forward passes (mixed precision).
        variant: ``"sam"`` or ``"gsam"`` (Zhuang et al., ICLR 2022), the descent rule on S; ASAM is
            ``adaptive``, so ``adaptive=True`` with ``"gsam"`` perturbs by ASAM's ε and corrects by GSAM.
        gsam_alpha: GSAM's α (>= 0, finite); read only with ``variant="gsam"``. α = 0 is SAM bitwise (the
            correction is skipped). Where the correction is undefined (``g_p = 0``, a non-finite inner
            product, or a zero / non-finite ascent gradient) the step is SAM's.

    Returns:
        `StepResult`.

    Raises:
        ValueError: ``variant`` not in `SAM_VARIANTS`, or ``gsam_alpha`` negative or not finite.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"subset_sam_step: variant must be one of {SAM_VARIANTS}; got {variant!r}")
    if not (gsam_alpha >= 0 and math.isfinite(gsam_alpha)):
        raise ValueError(f"subset_sam_step: gsam_alpha must be finite and >= 0; got {gsam_alpha!r}")
    n_b = int(sam_mask.numel())
    n_s = int(sam_mask.sum())
    if n_s == 0 or rho == 0.0:  # a plain pass: one forward+backward over B
        with autocast():
            loss = loss_of(batch, n_b)
        backward(loss * (n_b * row_weight))
        return StepResult(loss.detach(), None, n_s)
    s_batch = batch if n_s == n_b else select_rows(batch, torch.nonzero(sam_mask).squeeze(1), n_b, device)
    params = [p for p in member.parameters() if p.requires_grad]
    stash = stash_grads(params)
    with autocast():
        loss_s = loss_of(s_batch, n_s)  # ascent at θ (updates BatchNorm running stats: a pass at θ)
    backward(loss_s)
    had_grad = [p.grad is not None for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # g (loss-scaled), kept
    eps, norm, ok = (ascent or sam_epsilon)(params, grads, rho, adaptive)
    for p in params:
        p.grad = None
    with perturbed(params, eps), frozen_buffers(member):
        with autocast():
            loss_p = loss_of(s_batch, n_s)
        backward(loss_p * (n_s * row_weight))
    if variant == "gsam" and gsam_alpha != 0.0:
        # .grad is c·g_p (c = |S|·row_weight) and `grads` is g, both times the same loss scale: passing c·α
        # gives c·(g_p − α g_⊥). A parameter the perturbed pass left without a gradient has g_p = 0 there.
        for p, had in zip(params, had_grad):
            if p.grad is None and had:
                p.grad = torch.zeros_like(p)
        pairs = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
        gsam_descent_([d for d, _ in pairs], [g for _, g in pairs], gsam_alpha * n_s * row_weight, ok)
    loss = loss_s.detach() * (n_s / n_b)
    if n_s < n_b:
        n_batch = select_rows(batch, torch.nonzero(~sam_mask).squeeze(1), n_b, device)
        with autocast():
            loss_n = loss_of(n_batch, n_b - n_s)
        backward(loss_n * ((n_b - n_s) * row_weight))
        loss = loss + loss_n.detach() * ((n_b - n_s) / n_b)
    unstash_grads(params, stash)
    return StepResult(loss, unscale(norm), n_s)
