"""From per-sample sharpness scores to each member's sharpness-aware set (paper Sec. 4.3, Fig. 6).

For member ``j``, ``T_j`` = its ``floor(k N)`` samples by score (``"highest"``: the paper text;
``"lowest"``: the authors' released code), ties broken towards the lower row index.
Member ``i``'s SAM set is ``D_i = union_{j != i} T_j``. Samples in no ``T_j`` (``R``, row order) can be
handed out by the release's rules: ``"round_robin"`` adds ``R[i::m]`` to ``D_i`` (CIFAR-100),
``"complement"`` adds ``R minus R[i::m]`` (CIFAR-10). A pure function: no Trainer, no state.
"""

from __future__ import annotations

import itertools
import math

import torch

SELECTIONS = ("highest", "lowest")
RESIDUALS = ("none", "round_robin", "complement")


def top_k_masks(scores: torch.Tensor, fraction: float, selection: str = "highest") -> torch.Tensor:
    """Boolean ``(m, N)``: row ``j`` marks member ``j``'s ``floor(fraction * N)`` selected samples.

    Ties go to the lower index (stable sort).
    """
    m, n = scores.shape
    k = math.floor(fraction * n)
    key = -scores if selection == "highest" else scores
    order = torch.sort(key.double(), dim=1, stable=True).indices[:, :k]
    masks = torch.zeros(m, n, dtype=torch.bool)
    masks.scatter_(1, order.cpu(), True)
    return masks


def sam_sets(top: torch.Tensor, residual: str = "none") -> torch.Tensor:
    """SAM masks ``(m, N)`` from the members' top-k masks ``top`` ``(m, N)``: ``D_i = union_{j != i} T_j`` (+ residual)."""
    if residual not in RESIDUALS:
        raise ValueError(f"partition: residual must be one of {RESIDUALS}; got {residual!r}")
    m = top.shape[0]
    count = top.sum(dim=0)
    masks = (count.unsqueeze(0) - top.int()) > 0  # union over the other members
    if residual != "none":
        rest = torch.nonzero(count == 0).squeeze(1)
        for i in range(m):
            share = rest[i::m]
            if residual == "round_robin":
                masks[i, share] = True
            else:
                masks[i, rest] = True
                masks[i, share] = False
    return masks


def partition(
    scores: torch.Tensor, fraction: float, selection: str = "highest", residual: str = "none"
) -> torch.Tensor:
    """SAM masks ``(m, N)`` bool from scores ``(m, N)``: ``masks[i, r]`` is True when row ``r`` is in ``D_i^SAM``.

    Args:
        scores: per-sample sharpness of each member over the same N rows (finite).
        fraction: k in [0, 1].
        selection: ``"highest"`` or ``"lowest"``.
        residual: ``"none"``, ``"round_robin"`` or ``"complement"``.
    """
    _check(scores, fraction, selection, residual)
    return sam_sets(top_k_masks(scores.detach().cpu(), fraction, selection), residual)


def partition_statistics(scores: torch.Tensor, top: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Logged statistics of one scoring: per-member SAM-set fraction and score summary, mean pairwise overlaps.

    Args:
        scores: ``(m, N)`` per-sample sharpness.
        top: ``(m, N)`` bool, each member's top-k set (`top_k_masks`).
        masks: ``(m, N)`` bool, each member's SAM set (`sam_sets`).
    """
    m = masks.shape[0]
    stats: dict[str, float] = {}
    for i in range(m):
        s = scores[i].double()
        stats[f"scoring/member_{i}_sam_set_fraction"] = masks[i].float().mean().item()
        stats[f"scoring/member_{i}_score_mean"] = s.mean().item()
        stats[f"scoring/member_{i}_score_median"] = s.median().item()
        stats[f"scoring/member_{i}_score_max"] = s.max().item()
    pairs = list(itertools.combinations(range(m), 2))
    if pairs:
        stats["scoring/sam_set_pairwise_overlap"] = sum(
            (masks[i] & masks[j]).float().mean().item() for i, j in pairs) / len(pairs)
        stats["scoring/top_k_pairwise_jaccard"] = sum(_jaccard(top[i], top[j]) for i, j in pairs) / len(pairs)
    return stats


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


def _check(scores: torch.Tensor, fraction: float, selection: str, residual: str) -> None:
    if scores.dim() != 2:
        raise ValueError(f"partition: scores must have shape (m, N); got {tuple(scores.shape)}")
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"partition: fraction (sam_fraction) must be in [0, 1]; got {fraction}")
    if selection not in SELECTIONS:
        raise ValueError(f"partition: selection must be one of {SELECTIONS}; got {selection!r}")
    if residual not in RESIDUALS:
        raise ValueError(f"partition: residual must be one of {RESIDUALS}; got {residual!r}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores))[:5].tolist()
        raise ValueError(f"partition: scores must be finite; non-finite at (member, row) {bad}")
