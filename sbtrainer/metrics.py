"""Ensemble metrics: accuracy, EIR, DER, variance, KL, NLL, ECE and Brier score.

Pure functions on the members' logits ``(N, m, C)`` (N samples, m members, C classes; torch tensors
or numpy arrays) and integer labels ``(N,)``. Everything is computed in float64 on the CPU.

Definitions, from Lu et al., "Sharpness-diversity tradeoff: improving flat ensembles with
SharpBalance" (NeurIPS 2024):

- ensemble output (Sec. 2): ``reduction="logits"`` averages the members' logits (paper text);
  ``reduction="probs"`` averages their softmax probabilities (the authors' released code);
- variance, eq. (1): ``E_x[Var_members(f(x))]``, the unbiased (ddof=1) variance of the logits across
  members, averaged over classes and samples (``classes="sum"`` sums over classes instead, as the
  released ``measure_diversity_variance.py`` does);
- DER, eq. (2): mean pairwise disagreement (unordered pairs) / mean member error (Theisen et al., 2023);
- EIR, eq. (4): (mean member error - ensemble error) / mean member error; :func:`eir_vote` uses the
  majority vote as the ensemble (ties go to the lowest class index, as in Theisen et al.);
- KL, eq. (11), App. E: ``KL(p_i || p_j)`` of the members' softmax outputs, averaged over the ordered
  pairs ``i != j`` and over samples;
- NLL, ECE and Brier score (App. F.5): ECE uses ``num_bins`` equal-width confidence bins ``(lo, hi]``,
  ``ECE = sum_b |B_b|/N * |acc_b - conf_b|`` (Guo et al., 2017); Brier = mean over samples of
  ``sum_c (p_c - onehot_c)^2``.

Ratios whose denominator is the mean member error (EIR, DER) are ``nan`` when every member is right on
every sample: they are undefined there.

Across processes: :func:`ensemble_metrics` takes an ``accelerate.Accelerator`` and gathers every
process's shard (uneven sizes are fine) before reducing, so the result equals the one-process value.
:func:`make_compute_metrics` builds the ``compute_metrics`` callable for ``transformers.Trainer``,
which gathers across processes itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray
REDUCTIONS = ("logits", "probs")
DIVERSITY_KEYS = ("der", "variance", "kl")


# --------------------------------------------------------------------------- validation / conversion


def _as_logits(member_logits: ArrayLike, name: str = "member_logits") -> torch.Tensor:
    """``member_logits`` as a float64 CPU tensor ``(N, m, C)``; raises ``ValueError`` if not 3-D."""
    logits = torch.as_tensor(np.asarray(member_logits) if not torch.is_tensor(member_logits) else member_logits)
    if logits.dim() != 3:
        raise ValueError(
            f"{name} must be 3-D (N samples, m members, C classes); got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"{name} needs at least 1 member and 1 class; got shape {tuple(logits.shape)}")
    return logits.detach().to(device="cpu", dtype=torch.float64)


def _as_labels(labels: ArrayLike, logits: torch.Tensor) -> torch.Tensor:
    """``labels`` as an int64 CPU tensor ``(N,)`` matching ``logits`` ``(N, m, C)``."""
    lab = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).detach().cpu()
    if lab.dim() != 1 or lab.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per sample of member_logits (N={logits.shape[0]}); "
            f"got shape {tuple(lab.shape)}"
        )
    if lab.is_floating_point() and not torch.equal(lab, lab.round()):
        raise ValueError("labels must be integer class indices; got non-integer floats")
    lab = lab.to(torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= logits.shape[2]):
        raise ValueError(
            f"labels must lie in [0, C) with C={logits.shape[2]} classes; "
            f"got values in [{int(lab.min())}, {int(lab.max())}]"
        )
    return lab


def _inputs(member_logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _as_logits(member_logits)
    return logits, _as_labels(labels, logits)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _check_num_bins(num_bins: int) -> None:
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1; got {num_bins!r}")


def _check_members(logits: torch.Tensor, metric: str) -> None:
    if logits.shape[1] < 2:
        raise ValueError(
            f"{metric} is a diversity metric and needs member_logits with m >= 2 members; "
            f"got m={logits.shape[1]}"
        )


# --------------------------------------------------------------------------- building blocks


def reduce_member_logits(member_logits: torch.Tensor, reduction: str = "logits") -> torch.Tensor:
    """Ensemble logits ``(B, C)`` from member logits ``(B, m, C)``: THE reduction (used by `EnsembleModel` too).

    ``"logits"``: mean of the logits (paper Sec. 2). ``"probs"``: log of the mean softmax (the authors' release),
    so that ``softmax`` of the result is the mean of the members' probabilities (half precision is computed in
    float32).
    """
    _check_reduction(reduction)
    if reduction == "logits":
        return member_logits.mean(dim=1)
    x = member_logits if member_logits.dtype in (torch.float32, torch.float64) else member_logits.float()
    return torch.logsumexp(F.log_softmax(x, dim=-1), dim=1) - math.log(member_logits.shape[1])


def _ensemble_log_probs(logits: torch.Tensor, reduction: str) -> torch.Tensor:
    """Ensemble log-probabilities ``(N, C)`` from member logits ``(N, m, C)``."""
    reduced = reduce_member_logits(logits, reduction)
    return F.log_softmax(reduced, dim=-1) if reduction == "logits" else reduced


def ensemble_probs(member_logits: ArrayLike, reduction: str = "logits") -> torch.Tensor:
    """Ensemble probabilities ``(N, C)`` (float64): softmax of the mean logits, or the mean of softmaxes.

    Args:
        member_logits: ``(N, m, C)``.
        reduction: ``"logits"`` (paper, Sec. 2) or ``"probs"`` (authors' release).
    """
    return _ensemble_log_probs(_as_logits(member_logits), reduction).exp()


def _error(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Error rate of predictions ``(N,)``."""
    return float((pred != labels).double().mean())


def _member_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-member error rates ``(m,)``."""
    return (logits.argmax(dim=-1) != labels[:, None]).double().mean(dim=0)


def _vote(logits: torch.Tensor) -> torch.Tensor:
    """Majority vote ``(N,)`` of the members' argmax predictions; ties go to the lowest class index."""
    preds = logits.argmax(dim=-1)  # (N, m)
    counts = F.one_hot(preds, num_classes=logits.shape[-1]).sum(dim=1)  # (N, C)
    return torch.from_numpy(np.argmax(counts.numpy(), axis=-1))  # numpy argmax: first maximum


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of log-probabilities ``(N, C)``."""
    return float(-log_probs.gather(1, labels[:, None]).mean())


def _brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of ``sum_c (p_c - onehot_c)^2`` for probabilities ``(N, C)``."""
    onehot = F.one_hot(labels, num_classes=probs.shape[-1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(dim=-1).mean())


def _ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int) -> float:
    """ECE of probabilities ``(N, C)`` with ``num_bins`` equal-width bins ``(lo, hi]`` over confidence."""
    _check_num_bins(num_bins)
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).to(probs.dtype)
    inner_edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(conf, inner_edges, right=False)  # edges[i-1] < conf <= edges[i]
    gap = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct - conf)
    # |B_b|/N * |acc_b - conf_b| = |sum_{i in B_b} (correct_i - conf_i)| / N
    return float(gap.abs().sum() / max(len(labels), 1))


def _member_mean(logits: torch.Tensor, labels: torch.Tensor, fn: Callable) -> float:
    """Mean over members of ``fn(log_probs (N, C), labels (N,))`` for member logits ``(N, m, C)``."""
    log_probs = F.log_softmax(logits, dim=-1)
    return float(np.mean([fn(log_probs[:, i], labels) for i in range(logits.shape[1])]))


# --------------------------------------------------------------------------- accuracy and ensembling gain


def ensemble_accuracy(member_logits: ArrayLike, labels: ArrayLike, reduction: str = "logits") -> float:
    """Accuracy of the ensemble (argmax of the reduced output). ``member_logits (N, m, C)``, ``labels (N,)``."""
    logits, labels = _inputs(member_logits, labels)
    pred = _ensemble_log_probs(logits, reduction).argmax(dim=-1)
    return float((pred == labels).double().mean())


def member_accuracies(member_logits: ArrayLike, labels: ArrayLike) -> list[float]:
    """Accuracy of each member, a list of length m. ``member_logits (N, m, C)``, ``labels (N,)``."""
    logits, labels = _inputs(member_logits, labels)
    return (logits.argmax(dim=-1) == labels[:, None]).double().mean(dim=0).tolist()


def member_accuracy(member_logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean accuracy over members. ``member_logits (N, m, C)``, ``labels (N,)``."""
    return float(np.mean(member_accuracies(member_logits, labels)))


def _improvement_rate(mean_member_error: float, ensemble_error: float) -> float:
    if mean_member_error == 0.0:
        return float("nan")  # every member is perfect: the ratio is undefined
    return (mean_member_error - ensemble_error) / mean_member_error


def eir(member_logits: ArrayLike, labels: ArrayLike, reduction: str = "logits") -> float:
    """Ensemble improvement rate, eq. (4): ``(mean member error - ensemble error) / mean member error``.

    Args:
        member_logits: ``(N, m, C)``.
        labels: ``(N,)``.
        reduction: how the ensemble is formed, ``"logits"`` (mean logits) or ``"probs"`` (mean softmax).

    Returns ``nan`` when the mean member error is 0.
    """
    logits, labels = _inputs(member_logits, labels)
    ens_error = _error(_ensemble_log_probs(logits, reduction).argmax(dim=-1), labels)
    return _improvement_rate(float(_member_errors(logits, labels).mean()), ens_error)


def eir_vote(member_logits: ArrayLike, labels: ArrayLike) -> float:
    """EIR, eq. (4), with the majority vote as the ensemble (ties to the lowest class; Theisen et al., 2023).

    ``member_logits (N, m, C)``, ``labels (N,)``. Returns ``nan`` when the mean member error is 0.
    """
    logits, labels = _inputs(member_logits, labels)
    return _improvement_rate(float(_member_errors(logits, labels).mean()), _error(_vote(logits), labels))


# --------------------------------------------------------------------------- diversity


def disagreement(member_logits: ArrayLike) -> float:
    """Mean over unordered member pairs of the fraction of samples where their argmax differs.

    ``member_logits (N, m, C)`` with m >= 2.
    """
    logits = _as_logits(member_logits)
    _check_members(logits, "disagreement")
    preds = logits.argmax(dim=-1)  # (N, m)
    differ = (preds[:, :, None] != preds[:, None, :]).double().mean(dim=0)  # (m, m), symmetric
    m = logits.shape[1]
    return float(differ.sum() / (m * (m - 1)))  # diagonal is 0; each unordered pair counted twice


def der(member_logits: ArrayLike, labels: ArrayLike) -> float:
    """Disagreement-error ratio, eq. (2): mean pairwise disagreement / mean member error.

    ``member_logits (N, m, C)`` with m >= 2, ``labels (N,)``. Returns ``nan`` when the mean member error is 0.
    """
    logits, labels = _inputs(member_logits, labels)
    _check_members(logits, "der")
    mean_error = float(_member_errors(logits, labels).mean())
    if mean_error == 0.0:
        return float("nan")
    return disagreement(logits) / mean_error


def variance(member_logits: ArrayLike, classes: str = "mean") -> float:
    """Diversity as variance, eq. (1): unbiased (ddof=1) variance of the logits across members.

    Args:
        member_logits: ``(N, m, C)`` with m >= 2.
        classes: ``"mean"`` averages the per-class variances (default), ``"sum"`` sums them, which is what
            the authors' ``measure_diversity_variance.py`` reports (``‖·‖²`` over classes); both average
            over samples.
    """
    logits = _as_logits(member_logits)
    _check_members(logits, "variance")
    if classes not in ("mean", "sum"):
        raise ValueError(f"classes must be 'mean' or 'sum'; got {classes!r}")
    per_class = logits.var(dim=1, correction=1)  # (N, C)
    per_sample = per_class.mean(dim=-1) if classes == "mean" else per_class.sum(dim=-1)
    return float(per_sample.mean())


def kl(member_logits: ArrayLike) -> float:
    """Pairwise KL divergence, eq. (11): ``KL(p_i || p_j)`` averaged over ordered pairs ``i != j`` and samples.

    ``member_logits (N, m, C)`` with m >= 2; ``p_i`` is member i's softmax.
    """
    logits = _as_logits(member_logits)
    _check_members(logits, "kl")
    log_p = F.log_softmax(logits, dim=-1)  # (N, m, C)
    p = log_p.exp()
    # kl[n, i, j] = sum_c p_i (log p_i - log p_j)
    neg_entropy = (p * log_p).sum(dim=-1)  # (N, m)
    cross = torch.einsum("nic,njc->nij", p, log_p)  # (N, m, m)
    pair_kl = neg_entropy[:, :, None] - cross  # diagonal is 0 up to rounding
    m = logits.shape[1]
    off_diag = ~torch.eye(m, dtype=torch.bool)
    return float(pair_kl[:, off_diag].mean())


# --------------------------------------------------------------------------- calibration


def ensemble_nll(member_logits: ArrayLike, labels: ArrayLike, reduction: str = "logits") -> float:
    """Mean negative log-likelihood of the ensemble. ``member_logits (N, m, C)``, ``labels (N,)``."""
    logits, labels = _inputs(member_logits, labels)
    return _nll(_ensemble_log_probs(logits, reduction), labels)


def ensemble_ece(
    member_logits: ArrayLike, labels: ArrayLike, reduction: str = "logits", num_bins: int = 15
) -> float:
    """Expected calibration error of the ensemble, bins ``(lo, hi]``. ``member_logits (N, m, C)``, ``labels (N,)``."""
    _check_num_bins(num_bins)
    logits, labels = _inputs(member_logits, labels)
    return _ece(_ensemble_log_probs(logits, reduction).exp(), labels, num_bins)


def ensemble_brier(member_logits: ArrayLike, labels: ArrayLike, reduction: str = "logits") -> float:
    """Brier score of the ensemble: mean of ``sum_c (p_c - onehot_c)^2``. ``member_logits (N, m, C)``."""
    logits, labels = _inputs(member_logits, labels)
    return _brier(_ensemble_log_probs(logits, reduction).exp(), labels)


def member_nll(member_logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean over members of each member's NLL. ``member_logits (N, m, C)``, ``labels (N,)``."""
    logits, labels = _inputs(member_logits, labels)
    return _member_mean(logits, labels, _nll)


def member_ece(member_logits: ArrayLike, labels: ArrayLike, num_bins: int = 15) -> float:
    """Mean over members of each member's ECE (bins ``(lo, hi]``). ``member_logits (N, m, C)``."""
    _check_num_bins(num_bins)
    logits, labels = _inputs(member_logits, labels)
    return _member_mean(logits, labels, lambda lp, y: _ece(lp.exp(), y, num_bins))


def member_brier(member_logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean over members of each member's Brier score. ``member_logits (N, m, C)``, ``labels (N,)``."""
    logits, labels = _inputs(member_logits, labels)
    return _member_mean(logits, labels, lambda lp, y: _brier(lp.exp(), y))


# --------------------------------------------------------------------------- all at once


def _gather(accelerator: Any, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every process's ``(n_r, m, C)`` logits and ``(n_r,)`` labels in rank order.

    Shards may differ in size: each is padded to the largest, gathered, and the padding dropped.
    ``accelerator.gather`` is used rather than ``gather_for_metrics``: inside a prepared dataloader the
    latter truncates to the dataloader's remainder, which would cut the padded layout here.
    """
    device = accelerator.device
    logits, labels = logits.to(device), labels.to(device)
    sizes = accelerator.gather(torch.tensor([logits.shape[0]], device=device)).cpu().tolist()
    width = max(sizes)
    all_logits = accelerator.gather(accelerator.pad_across_processes(logits, dim=0)).cpu()
    all_labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0)).cpu()
    keep = torch.cat([torch.arange(r * width, r * width + n) for r, n in enumerate(sizes)])
    return all_logits[keep], all_labels[keep]


def ensemble_metrics(
    member_logits: ArrayLike,
    labels: ArrayLike,
    reduction: str = "logits",
    num_bins: int = 15,
    accelerator: Any | None = None,
) -> dict[str, float]:
    """Every metric of this module in one dict.

    Args:
        member_logits: ``(N, m, C)``; with ``accelerator``, this process's shard ``(n_r, m, C)``.
        labels: ``(N,)`` (or this process's ``(n_r,)``).
        reduction: ``"logits"`` (paper) or ``"probs"`` (authors' release), for the ensemble output.
        num_bins: ECE bins, >= 1.
        accelerator: an ``accelerate.Accelerator``; when given, logits and labels of all processes are
            gathered (uneven shards allowed) before any reduction, so every process gets the result on the
            full data. Shards must be disjoint: if they come from a prepared dataloader that pads its last
            batch, gather per batch with ``accelerator.gather_for_metrics`` and call without ``accelerator``.

    Returns keys ``ensemble_accuracy, member_accuracy, member_{i}_accuracy, eir, eir_vote, der, variance,
    kl, ensemble_nll, ensemble_ece, ensemble_brier, member_nll, member_ece, member_brier``. With a single
    member the diversity keys (``der, variance, kl``) are omitted: they compare members and are undefined.
    """
    _check_reduction(reduction)
    _check_num_bins(num_bins)
    logits, labels = _inputs(member_logits, labels)
    if accelerator is not None:
        logits, labels = _gather(accelerator, logits, labels)
    if logits.shape[0] == 0:
        raise ValueError("member_logits must hold at least one sample (N >= 1); got N=0")
    out: dict[str, float] = {"ensemble_accuracy": ensemble_accuracy(logits, labels, reduction)}
    accs = member_accuracies(logits, labels)
    out["member_accuracy"] = float(np.mean(accs))
    out.update({f"member_{i}_accuracy": a for i, a in enumerate(accs)})
    out["eir"] = eir(logits, labels, reduction)
    out["eir_vote"] = eir_vote(logits, labels)
    if logits.shape[1] >= 2:
        out["der"] = der(logits, labels)
        out["variance"] = variance(logits)
        out["kl"] = kl(logits)
    else:
        logger.debug("one member: diversity metrics %s omitted", DIVERSITY_KEYS)
    out["ensemble_nll"] = ensemble_nll(logits, labels, reduction)
    out["ensemble_ece"] = ensemble_ece(logits, labels, reduction, num_bins)
    out["ensemble_brier"] = ensemble_brier(logits, labels, reduction)
    out["member_nll"] = member_nll(logits, labels)
    out["member_ece"] = member_ece(logits, labels, num_bins)
    out["member_brier"] = member_brier(logits, labels)
    return out


def _member_logits_from_predictions(predictions: Any) -> Any:
    """The ``(N, m, C)`` element of ``EvalPrediction.predictions`` (a tuple/list, or the array itself)."""
    if isinstance(predictions, (tuple, list)):
        found = [p for p in predictions if np.ndim(p) == 3]
        if len(found) != 1:
            shapes = [tuple(np.shape(p)) for p in predictions]
            raise ValueError(
                "EvalPrediction.predictions must hold exactly one 3-D array (member logits (N, m, C)); "
                f"got shapes {shapes}"
            )
        return found[0]
    return predictions


def make_compute_metrics(
    reduction: str = "logits", num_bins: int = 15
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` callable for ``transformers.Trainer``.

    It reads ``eval_pred.predictions`` = ``(ensemble_logits (N, C), member_logits (N, m, C))`` (tuple or
    list; the 3-D element is used) and ``eval_pred.label_ids`` ``(N,)``, and returns
    :func:`ensemble_metrics`. The Trainer has already gathered across processes.
    """
    _check_reduction(reduction)
    _check_num_bins(num_bins)

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        member_logits = _member_logits_from_predictions(eval_pred.predictions)
        labels = eval_pred.label_ids
        if isinstance(labels, (tuple, list)) and not np.isscalar(labels[0]):
            labels = labels[0]
        return ensemble_metrics(member_logits, labels, reduction=reduction, num_bins=num_bins)

    return compute_metrics


__all__ = [
    "der",
    "disagreement",
    "eir",
    "eir_vote",
    "ensemble_accuracy",
    "ensemble_brier",
    "ensemble_ece",
    "ensemble_metrics",
    "ensemble_nll",
    "ensemble_probs",
    "kl",
    "make_compute_metrics",
    "member_accuracies",
    "member_accuracy",
    "member_brier",
    "member_ece",
    "member_nll",
    "reduce_member_logits",
    "variance",
]
