"""Loss curvature around an input (Garg & Roy, 2023) and its rank agreement with per-sample sharpness (paper Fig. 14).

SharpBalance ranks training samples by a curvature in WEIGHT space, the per-sample sharpness
``||grad_theta loss(x, y)||^2`` (an empirical-Fisher-trace estimate, paper Sec. 4.3; `sbtrainer.scoring`).
Garg & Roy ("Samples with low loss curvature improve data efficiency", CVPR 2023) rank samples by the
curvature of the loss around the data point, in INPUT space. The paper (App. F.3, Fig. 14) ranks 1,000
training samples both ways and reports a Spearman rank correlation of 0.82. This module gives both
ingredients that `sbtrainer.scoring` does not:

- `input_curvature`: a finite-difference Hessian-vector estimate in input space, per sample;
- `rank_correlation`: Spearman's rho (``scipy.stats.spearmanr``: ranks with ties averaged, then Pearson);
- `plot_curvature_vs_sharpness`: the Fig. 14 scatter.

The estimator. With ``l(x) = loss_fn(model(x), y)`` the loss of ONE sample (so values do not depend on the
batch size), ``g(x) = grad_x l(x)`` and ``H_x`` the input Hessian, a direction ``v`` gives

    H_x v  ≈  (g(x + h v) − g(x)) / h          (forward difference, error O(h · ||∇³_x l|| · ||v||²))

and the curvature of one sample is ``(1/K) Σ_k ||g(x + h v_k) − g(x)||_2 / h`` over ``K`` directions:

- ``direction="rademacher"`` (Garg & Roy's): entries of ``v_k`` are ±1 with equal probability (``||v_k|| = √D``
  for an input of ``D`` numbers), so ``E ||H_x v||^2 = trace(H_x^2) = Σ_i λ_i^2`` (Hutchinson); the estimate
  is the mean of ``||H_x v_k||``, of the order of the Frobenius norm ``||H_x||_F``;
- ``direction="gradient"``: one unit direction ``v = g(x) / ||g(x)||`` per sample (the curvature along the
  loss's steepest input direction, as in CURE, Moosavi-Dezfooli et al., 2019); ``num_directions`` is not
  used; a sample with ``g(x) = 0`` gets 0.

Units: loss per (input unit)^2 times the norm of ``v`` (``√D`` for Rademacher, 1 for ``"gradient"``), in the
units of the tensor the model takes (normalised pixels for the CIFAR recipes). Garg & Roy's release adds
``h v`` and does not divide by ``h``: its numbers are ``h`` times these (a constant factor, the ranking is the
same); it also differentiates the batch-mean loss (another constant factor, ``1 / B``).

The model runs in eval mode (BatchNorm on running statistics, no dropout), so samples are independent; its
train/eval mode and buffers are restored, parameter ``.grad`` is left untouched (only input gradients are
formed). Nothing here knows about the Trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .member_adapter import MemberLoss, batch_labels, call_member, cross_entropy_per_sample, model_inputs
from .sam import frozen_buffers
from .scoring import eval_mode

logger = logging.getLogger(__name__)

DIRECTIONS = ("rademacher", "gradient")


def _check(name: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"input_curvature: {name} must {rule}; got {value!r}")


def _input_grad(model: nn.Module, inputs: dict, x: torch.Tensor, labels: torch.Tensor, input_name: str,
                loss_fn: MemberLoss) -> torch.Tensor:
    """``(B, *input_shape)``: the gradient of each sample's own loss at ``x`` (the loss summed over rows)."""
    x = x.detach().requires_grad_(True)
    logits = call_member(model, {**inputs, input_name: x}, input_name)
    loss = loss_fn(logits, labels)
    if loss.dim() != 1 or loss.shape[0] != labels.shape[0]:
        raise ValueError(f"input_curvature: loss_fn must return the per-sample loss (B,) = ({labels.shape[0]},); "
                         f"got shape {tuple(loss.shape)}")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.detach()


def input_curvature(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    h: float = 1e-3,
    num_directions: int = 10,
    direction: str = "rademacher",
    input_name: str = "pixel_values",
    loss_fn: MemberLoss = cross_entropy_per_sample,
    generator: torch.Generator | None = None,
    seed: int = 0,
    directions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss curvature around the input, ``(1/K) Σ_k ||∇_x l(x + h v_k) − ∇_x l(x)|| / h`` (Garg & Roy).

    See the module docstring for the estimator, its units and its relation to ``trace(H_x^2)``.

    Args:
        model: a module taking ``batch[input_name]`` (floating point, ``(B, *input_shape)``) and returning logits
            ``(B, C)``; HF models get the other columns of the batch too (`sbtrainer.member_adapter.model_inputs`).
        batch: the input column and labels ``(B,)`` (``labels``, ``label`` or ``label_ids``).
        h: finite-difference step, > 0 (Garg & Roy: 1e-3). Smaller steps cut the O(h) truncation error and raise
            the rounding error (float32 gradients: keep ``h · ||H_x v||`` well above ``1e-7 · ||∇_x l||``).
        num_directions: ``K`` Rademacher directions per sample, >= 1 (Garg & Roy: 10); unused for ``"gradient"``.
        direction: ``"rademacher"`` or ``"gradient"`` (unit input-gradient direction, one per sample).
        loss_fn: per-sample loss ``(B,)`` of ``(logits (B, C), labels (B,))``; default cross-entropy.
        generator: CPU generator the Rademacher signs are drawn from, ``(K, B, *input_shape)`` per call (a
            dataset-level caller passes one through its batches); default a new one seeded with ``seed``.
        directions: ``(K, B, *input_shape)`` directions to use instead of drawing them (any vectors; the
            result is then ``mean_k ||H_x v_k||`` for exactly these ``v_k``). Overrides ``direction``.

    Returns:
        ``(B,)`` float32 on the CPU.

    Raises:
        ValueError: ``h <= 0`` or not finite, ``num_directions < 1``, an unknown ``direction``, a non-floating
            input, ``directions`` of the wrong shape, or a ``loss_fn`` that does not return ``(B,)``.
    """
    _check("h", isinstance(h, (int, float)) and math.isfinite(h) and h > 0, "be a finite number > 0", h)
    _check("num_directions", isinstance(num_directions, int) and num_directions >= 1, "be an int >= 1", num_directions)
    _check("direction", direction in DIRECTIONS, f"be one of {DIRECTIONS}", direction)
    inputs = model_inputs(batch, model, input_name)
    x, labels = inputs[input_name], batch_labels(batch)
    _check(input_name, torch.is_tensor(x) and x.is_floating_point(), "be a floating-point tensor (the input "
           "curvature differentiates the loss with respect to it)", getattr(x, "dtype", type(x)))
    if directions is not None and (directions.dim() != x.dim() + 1 or tuple(directions.shape[1:]) != tuple(x.shape)):
        raise ValueError(f"input_curvature: directions must have shape (K, *{tuple(x.shape)}); "
                         f"got {tuple(directions.shape)}")
    with eval_mode(model), frozen_buffers(model), torch.enable_grad():
        base = _input_grad(model, inputs, x, labels, input_name, loss_fn)
        if directions is not None:
            vs = [v.to(device=x.device, dtype=x.dtype) for v in directions]
        elif direction == "gradient":
            norm = base.flatten(1).norm(dim=1).clamp_min(torch.finfo(base.dtype).tiny)
            vs = [base / norm.view(-1, *([1] * (x.dim() - 1)))]
        else:
            gen = generator if generator is not None else torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (num_directions, *x.shape), generator=gen)
            vs = [(2 * s - 1).to(device=x.device, dtype=x.dtype) for s in signs]
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for v in vs:
            moved = _input_grad(model, inputs, x.detach() + h * v, labels, input_name, loss_fn)
            total += ((moved - base).flatten(1).double().norm(dim=1) / h)
    return (total / len(vs)).float().cpu()


def input_curvature_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    rows: Sequence[int] | None = None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """`input_curvature` of every row of ``dataset[rows]`` (in row order), ``(len(rows),)`` float32 on the CPU.

    The Rademacher signs come from one CPU generator seeded with ``seed``, drawn batch after batch: the values
    are reproducible for a given ``seed``, ``rows`` and ``batch_size``. ``dataset`` yields dict examples (pass
    the un-augmented view of the training set); ``collate_fn`` defaults to ``transformers.default_data_collator``.
    Other keyword arguments (``h``, ``num_directions``, ``direction``, ``input_name``, ``loss_fn``) are
    `input_curvature`'s.

    Raises:
        ValueError: ``batch_size < 1``, or as `input_curvature`.
    """
    if batch_size < 1:
        raise ValueError(f"input_curvature_dataset: batch_size must be >= 1; got {batch_size}")
    if collate_fn is None:
        from transformers import default_data_collator

        collate_fn = default_data_collator
    device = torch.device(device) if device is not None else next(model.parameters()).device
    subset = dataset if rows is None else Subset(dataset, list(rows))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out.append(input_curvature(model, batch, generator=gen, **kwargs))
    return torch.cat(out) if out else torch.empty(0)


def rank_correlation(a: Sequence[float] | np.ndarray | torch.Tensor, b: Sequence[float] | np.ndarray | torch.Tensor
                     ) -> float:
    """Spearman's rank correlation of two score vectors (``scipy.stats.spearmanr``: tied values get their mean rank).

    Returns a float in ``[-1, 1]``, or ``nan`` when either vector is constant (no ranking to compare).

    Raises:
        ValueError: ``a`` and ``b`` are not 1-D of the same length >= 2, or hold a non-finite value.
    """
    from scipy.stats import spearmanr

    x = np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float64)
    y = np.asarray(b.detach().cpu() if torch.is_tensor(b) else b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"rank_correlation: a and b must be 1-D of the same length >= 2; got shapes {x.shape} "
                         f"and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("rank_correlation: a and b must be finite (a nan or inf has no rank)")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        logger.warning("rank_correlation: a constant vector has no ranking; returning nan")
        return float("nan")
    return float(spearmanr(x, y).statistic)


def axes_metadata(fig: Any) -> str:
    """JSON of each axes' x/y labels, title and legend texts: stored in the PNG (``Axes`` text chunk) for checks."""
    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        axes.append({"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "title": ax.get_title(),
                     "legend": [t.get_text() for t in legend.get_texts()] if legend is not None else []})
    return json.dumps(axes)


def plot_curvature_vs_sharpness(
    curvature: Sequence[float] | np.ndarray | torch.Tensor,
    sharpness: Sequence[float] | np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Paper Fig. 14: input-space loss curvature (x) against per-sample sharpness (Fisher trace, y), one dot a sample.

    The legend gives Spearman's rho (`rank_correlation`) and the number of samples. Drawn on matplotlib's Agg
    canvas (no pyplot, no global backend change); the axes' labels, title and legend are also stored as JSON in
    the PNG's ``Axes`` text chunk (`axes_metadata`).

    Returns:
        ``path`` (a PNG of ``figsize × dpi`` pixels).

    Raises:
        ValueError: as `rank_correlation`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(curvature.detach().cpu() if torch.is_tensor(curvature) else curvature, dtype=np.float64)
    y = np.asarray(sharpness.detach().cpu() if torch.is_tensor(sharpness) else sharpness, dtype=np.float64)
    rho = rank_correlation(x, y)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=8, alpha=0.6, color="tab:blue", label=f"Spearman ρ = {rho:.2f} (N = {x.size})")
    ax.set_xlabel("Loss curvature around the input (mean ‖H_x v‖, Garg & Roy)")
    ax.set_ylabel("Sharpness (Fisher trace, ‖∇_θ loss‖²)")
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, metadata={"Axes": axes_metadata(fig)})
    logger.info("wrote %s", out)
    return out
