"""Study: why do SAM and SharpBalance members measure SHARPER than deep-ensemble members on digits?

    .venv/bin/python recipes/studies/sharpness_digits.py   # ~30 min on 1 thread; a rerun skips finished parts
    .venv/bin/python recipes/studies/sharpness_digits.py --max_seconds 60   # the same, in slices

The quickstart (`recipes/quickstart.py`: scikit-learn digits, 3-member ensembles of `small_cnn`) reports
the adaptive worst-case sharpness (eq. 3 of Lu et al., NeurIPS 2024: ``max_{‖T⁻¹ε‖₂ ≤ ρ0} L_B(θ+ε) −
L_B(θ)``, ``T = diag(|θ|)``, ρ0 = 0.5, 10 ascent steps, 50 batches of 5 training rows) and finds SAM and
SharpBalance members sharper than deep-ensemble members, more so at a larger SAM radius: the opposite
of the paper's Fig. 4. This driver finds out whether the measure, its settings or the regime (the loss
increase measured from a saturated, near-zero training loss) is responsible. It

1. checks `sbtrainer.sharpness` against closed forms on quadratic losses at the study's settings
   (worst case: the trust-region maximum; average case and Hutchinson: ``½σ² tr(T H T)``);
2. trains, with the quickstart's settings and seeds (`quickstart.make_config`, same model, same split),
   a deep ensemble, SAM (ρ = 0.05 and 0.2), SharpBalance (ρ = 0.05, k = 0.5) and, as a control, ASAM
   (ρ = 0.5: SAM in the |θ|-scaled geometry the adaptive measure uses), 20 epochs each, and keeps every
   member's weights at the end of each epoch;
3. measures every final member: training loss / accuracy, weight norms, logit scale and margins; the
   adaptive worst-case sharpness on a ρ0 grid (the loss-increase curve) and at several step counts; the
   non-adaptive worst case; the adaptive average case at several σ; the Fisher trace (mean per-sample
   squared gradient norm, `sbtrainer.scoring.per_sample_sharpness`); the Hessian traces ``tr(H)`` and
   ``tr(T H T)`` (Hutchinson), the top eigenvalue of ``T H T`` (power iteration) and the first-order
   term ``‖T ∇L‖``;
4. measures them again at a MATCHED training loss, three ways: (a) with temperature-scaled logits,
   ``τ`` per member such that the training NLL of ``logits / τ`` is the same target for everyone
   (for the adaptive measures this is exactly the model with its linear head divided by ``τ``: same
   predictions, lower confidence); (b) on held-out rows (the test split, where the loss is not
   saturated); (c) at the first epoch checkpoint whose mean member training NLL reaches a common target.
   To fit a 2-core CPU budget, (b) and (c) and the step-count grid are measured on some methods only
   (``STEPS_GRID_METHODS``, ``FAMILIES``).

Results (every number) go to ``--results`` (default ``benchmarks/results/studies/sharpness_digits.json``),
written after each part; trained members go to ``--checkpoint_dir`` (``outputs/studies/sharpness_digits``,
git-ignored). A rerun skips every part the JSON already has (retraining, deterministically, only if a
needed checkpoint is gone); ``--max_seconds`` stops cleanly between parts so a long study can run in
slices. ``--tiny`` is the smoke-test size (1 epoch, 2 members, a few batches). The JSON's ``tables`` hold
the key table, the loss-increase curve, the step-count table and the closed-form check as Markdown;
``compute_seconds`` is the wall time of each part (on a shared machine: an upper bound of its CPU time).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/: quickstart and recipe_utils

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from quickstart import DigitsDataset, load_data, make_config
from torch import nn
from transformers import PrinterCallback, TrainerCallback

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.member_adapter import cross_entropy_per_sample
from sbtrainer.models import small_cnn
from sbtrainer.scoring import per_sample_sharpness
from sbtrainer.sharpness import average_case_sharpness, worst_case_sharpness

logger = logging.getLogger("sharpness_digits")
ROOT = Path(__file__).resolve().parents[2]

#: name -> (ensemble_method, rho, adaptive); SharpBalance with the quickstart's k = 0.5 and Td = epochs // 2.
#: ASAM (Kwon et al., 2021: SAM in the |θ|-scaled space, the geometry the adaptive measure uses; ρ = 0.5 as
#: their CIFAR-10 setting) is the control that tells "SAM is not flatter" from "the measure is wrong".
METHODS: dict[str, tuple[str, float, bool]] = {
    "deep_ensemble": ("deep_ensemble", 0.05, False),  # rho unused
    "sam_rho0.05": ("sam", 0.05, False),
    "sam_rho0.2": ("sam", 0.2, False),
    "sharpbalance_rho0.05": ("sharpbalance", 0.05, False),
    "asam_rho0.5": ("sam", 0.5, True),
}
#: the parts each method gets (a CPU budget): the step-count grid on the first two, the held-out and equal-loss
#: checkpoint parts on the deep ensemble and SAM only, temperature matching on all but SharpBalance (whose members
#: end like the SAM ρ = 0.05 ones: it runs that SAM until Td); every method gets the final parts.
STEPS_GRID_METHODS = ("deep_ensemble", "sam_rho0.05")
FAMILIES = {"deep_ensemble": ("heldout", "temperature", "checkpoint"), "sam_rho0.05": ("heldout", "temperature", "checkpoint"),
            "sam_rho0.2": ("heldout", "temperature", "checkpoint"), "sharpbalance_rho0.05": (),
            "asam_rho0.5": ("temperature",)}
FULL = {  # the study's grids; "batches" of 5 training rows per sharpness estimate
    "epochs": 20, "members": 3, "batches": 20, "quickstart_batches": 50,
    "curve_rho0": [0.02, 0.05, 0.1, 0.25, 0.5, 1.0], "curve_steps": 20, "steps_grid": [5, 10, 50], "steps_rho0": 0.5,
    "plain_rho": [0.05, 0.2], "avg_sigma": [0.05, 0.1, 0.25, 0.5], "avg_samples": 20,
    "hutchinson_vectors": 10, "power_iters": 20, "curvature_rows": 256, "group_vectors": 5,
    "matched_nll": [0.05], "matched_rho0": [0.1, 0.5], "matched_plain_rho": [0.2], "matched_sigma": [0.1, 0.5],
    "checkpoint_nll": 0.1, "fisher_rows": None,
}
TINY = {
    "epochs": 1, "members": 2, "batches": 2, "quickstart_batches": 2,
    "curve_rho0": [0.1, 0.5], "curve_steps": 3, "steps_grid": [2], "steps_rho0": 0.5,
    "plain_rho": [0.2], "avg_sigma": [0.1], "avg_samples": 2, "hutchinson_vectors": 2, "power_iters": 3,
    "curvature_rows": 32, "group_vectors": 2,
    "matched_nll": [0.5], "matched_rho0": [0.5], "matched_plain_rho": [0.2], "matched_sigma": [0.1],
    "checkpoint_nll": 1.5, "fisher_rows": 64,
}
QUICKSTART_SETTING = {"rho0": 0.5, "steps": 10}  # what recipes/quickstart.py reports (with 50 batches of 5, seed 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/studies/sharpness_digits.json"))
    p.add_argument("--checkpoint_dir", default=str(ROOT / "outputs/studies/sharpness_digits"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tiny", action="store_true", help="smoke-test size (1 epoch, 2 members, 2 batches, short grids)")
    p.add_argument("--max_seconds", type=float, default=None, help="stop between parts after this long; rerun resumes")
    p.add_argument("--seed", type=int, default=0, help="the members' seed (quickstart --seed)")
    p.add_argument("--subset_seed", type=int, default=0, help="seed of the sharpness batches (quickstart --subset_seed)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- closed-form checks


class QuadraticModel(nn.Module):
    """A "model" whose parameter is a vector ``θ (d,)``; its output ``(B, d)`` repeats ``θ`` for each row."""

    def __init__(self, theta0: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def quadratic_loss(theta0: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> Callable:
    """``loss_fn(out (B, d), labels) -> (B,)``: ``gᵀ(θ−θ0) + ½(θ−θ0)ᵀH(θ−θ0)`` for every row (θ = out[0])."""

    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        u = out[0] - theta0
        return (g @ u + 0.5 * u @ (h @ u)).expand(out.shape[0])

    return loss_fn


def trust_region_max(a: torch.Tensor, b: torch.Tensor, rho: float) -> float:
    """``max_{‖δ‖₂ ≤ ρ} bᵀδ + ½δᵀAδ`` for a symmetric PSD ``A (d, d)`` and ``b (d,)`` (float64).

    The maximiser lies on the sphere: ``δ = (μI − A)⁻¹ b`` with ``μ > λmax(A)`` such that ``‖δ‖ = ρ``
    (bisection on μ in A's eigenbasis). In the "hard case" (``b`` orthogonal to the top eigenspace and
    ``‖(λmax I − A)⁺ b‖ < ρ``, which includes ``b = 0``) ``μ = λmax`` and the rest of the radius goes
    along the top eigenvector; with ``b = 0`` the value is ``½ρ² λmax(A)``.
    """
    lam, u = torch.linalg.eigh(a)
    c = u.T @ b
    top = lam >= lam[-1] - 1e-12 * max(1.0, float(lam[-1].abs()))
    if float(c[top].norm()) == 0.0:
        x = torch.zeros_like(c)
        x[~top] = c[~top] / (lam[-1] - lam[~top])
        if float(x.norm()) <= rho:  # hard case
            x[torch.nonzero(top)[0]] = math.sqrt(rho**2 - float(x.norm()) ** 2)
            return float(c @ x + 0.5 * (lam * x * x).sum())

    def norm(mu: float) -> float:
        return float((c / (mu - lam)).norm())

    lo, hi = float(lam[-1]) + 1e-12, float(lam[-1]) + float(c.norm()) / rho + 1.0
    while norm(hi) > rho:
        hi = 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    x = c / (hi - lam)
    return float(c @ x + 0.5 * (lam * x * x).sum())


def hutchinson_trace(loss_of: Callable[[], torch.Tensor], params: list[torch.Tensor], num_vectors: int,
                     scale: list[torch.Tensor] | None = None, seed: int = 0) -> tuple[float, float]:
    """Hutchinson estimate of ``tr(T H T)`` (``T = diag(scale)``, ``tr(H)`` without ``scale``): ``(mean, stderr)``.

    ``H`` is the Hessian of the scalar ``loss_of()`` in ``params``; each of ``num_vectors`` Rademacher
    vectors ``v`` gives ``(Tv)ᵀ H (Tv)`` by double backward. Exact for a diagonal ``H`` (``v_k² = 1``).
    """
    gen = torch.Generator().manual_seed(seed)
    grads = torch.autograd.grad(loss_of(), params, create_graph=True)
    values = []
    for _ in range(num_vectors):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        if scale is not None:
            v = [s * x for s, x in zip(scale, v)]
        hv = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, v)), params, retain_graph=True)
        values.append(float(sum((h * x).sum() for h, x in zip(hv, v))))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")


def top_eigenvalue(loss_of: Callable[[], torch.Tensor], params: list[torch.Tensor], iters: int,
                   scale: list[torch.Tensor] | None = None, seed: int = 0) -> float:
    """Largest eigenvalue of ``T H T`` (``H`` without ``scale``) by ``iters`` power iterations (Rayleigh quotient)."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.autograd.grad(loss_of(), params, create_graph=True)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    value = 0.0
    for _ in range(iters):
        n = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / n for x in v]
        tv = v if scale is None else [s * x for s, x in zip(scale, v)]
        hv = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, tv)), params, retain_graph=True)
        w = hv if scale is None else [s * x for s, x in zip(scale, hv)]
        value = float(sum((a * b).sum() for a, b in zip(w, v)))
        v = [x.detach() for x in w]
    return value


def quadratic_check(grid: dict, batches: int) -> dict:
    """`worst_case_sharpness` / `average_case_sharpness` / Hutchinson vs closed forms on quadratics, at the study's settings.

    Two d = 40 quadratics around a nonzero ``θ0`` with ``H`` of eigenvalues log-spaced over 1e-3..10 (a
    spiky spectrum, as in networks): at a minimum (``g = 0``: the worst case is ``½ρ0² λmax(THT)``) and
    with a gradient (``g ≠ 0``: the trust-region maximum). Reported: measured / closed form per (ρ0, steps).
    """
    gen = torch.Generator().manual_seed(0)
    d = 40
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(-3, 1, d, dtype=torch.float64)) @ q.T
    theta0 = torch.randn(d, generator=gen, dtype=torch.float64)
    t = theta0.abs()
    a = t[:, None] * h * t[None, :]  # T H T
    data = [{"pixel_values": torch.zeros(5, 1), "labels": torch.zeros(5, dtype=torch.long)}] * batches
    out: dict = {"d": d, "eigenvalues_H": [1e-3, 10.0], "lambda_max_THT": float(torch.linalg.eigvalsh(a)[-1]),
                 "trace_THT": float(torch.trace(a)), "worst_case": {}, "average_case": {}}
    for case, g in (("minimum", torch.zeros(d, dtype=torch.float64)),
                    ("gradient", 0.3 * torch.randn(d, generator=gen, dtype=torch.float64))):
        model, loss_fn = QuadraticModel(theta0), quadratic_loss(theta0, g, h)
        rows = {}
        for rho0 in grid["curve_rho0"]:
            exact = trust_region_max(a, t * g, rho0)
            for steps in sorted(set(grid["steps_grid"]) | {grid["curve_steps"], QUICKSTART_SETTING["steps"]}):
                got = worst_case_sharpness(model, data, rho0=rho0, steps=steps, loss_fn=loss_fn, num_batches=batches,
                                           disable_tqdm=True).value
                rows[f"rho0={rho0},steps={steps}"] = {"measured": got, "closed_form": exact, "ratio": got / exact}
        out["worst_case"][case] = rows
    model, loss_fn = QuadraticModel(theta0), quadratic_loss(theta0, torch.zeros(d, dtype=torch.float64), h)
    for sigma in grid["avg_sigma"]:
        res = average_case_sharpness(model, data, rho0=sigma, num_samples=200, loss_fn=loss_fn, num_batches=batches,
                                     disable_tqdm=True)  # fmt: skip
        exact = 0.5 * sigma**2 * float(torch.trace(a))
        out["average_case"][f"sigma={sigma}"] = {"measured": res.value, "stderr": res.stderr, "closed_form": exact}
    loss_of = lambda: loss_fn(model(torch.zeros(1, 1)), None)[0]  # noqa: E731
    scale = [t]
    out["hutchinson_THT"] = dict(zip(("mean", "stderr"), hutchinson_trace(loss_of, [model.theta], 200, scale)))
    diag_model = QuadraticModel(theta0)
    diag_loss = quadratic_loss(theta0, torch.zeros(d, dtype=torch.float64), torch.diag(torch.diagonal(h)))
    diag_of = lambda: diag_loss(diag_model(torch.zeros(1, 1)), None)[0]  # noqa: E731
    out["hutchinson_diagonal_THT"] = {"estimate": hutchinson_trace(diag_of, [diag_model.theta], 3, scale)[0],
                                      "closed_form": float((t * t * torch.diagonal(h)).sum())}
    out["power_iteration_lambda_max_THT"] = top_eigenvalue(loss_of, [model.theta], 200, scale)
    return out


# ----------------------------------------------------------------------------- training


class Snapshots(TrainerCallback):
    """Keeps every member's ``state_dict`` (a CPU copy) at the end of each epoch."""

    def __init__(self) -> None:
        self.epochs: list[list[dict]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epochs.append([copy.deepcopy({k: v.detach().cpu() for k, v in m.state_dict().items()}) for m in model.members])


def build_member() -> nn.Module:
    """The quickstart's member: `small_cnn` for 8x8 grayscale digits, 10 classes, width 16."""
    return small_cnn(in_chans=1, num_classes=10, width=16, image_size=8)


def train_method(name: str, grid: dict, seed: int, train: DigitsDataset, tmp: Path) -> dict:
    """Train one ensemble with the quickstart's config; returns ``{"final": [state_dict], "epochs": [[state_dict]], ...}``."""
    method, rho, adaptive = METHODS[name]
    qs_args = argparse.Namespace(output_dir=str(tmp / name), members=grid["members"], epochs=grid["epochs"], rho=rho,
                                 sam_fraction=0.5, seed=seed)
    config = make_config(qs_args, method)
    if adaptive:
        config = dataclasses.replace(config, adaptive=True)
    ensemble = EnsembleModel.from_factory(lambda _s: build_member(), config.num_members, config.member_seeds)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    snaps = Snapshots()
    trainer.add_callback(snaps)
    start = time.perf_counter()
    trainer.train()
    return {"final": [m.state_dict() for m in ensemble.members], "epochs": snaps.epochs,
            "train_seconds": time.perf_counter() - start,
            "sam_set_fraction": trainer.sam_masks.float().mean().item() if trainer.scoring_history else None}


def load_members(states: list[dict]) -> list[nn.Module]:
    members = []
    for s in states:
        m = build_member()
        m.load_state_dict(s)
        members.append(m.eval())
    return members


# ----------------------------------------------------------------------------- measures


def tempered_ce(tau: float) -> Callable:
    """Per-sample cross-entropy ``(B,)`` of ``logits / tau``."""
    return lambda logits, labels: F.cross_entropy(logits.float() / tau, labels, reduction="none")


@torch.no_grad()
def member_stats(member: nn.Module, data: DigitsDataset, loss_fn: Callable = cross_entropy_per_sample) -> dict:
    """Loss (``loss_fn``; ``nll`` is always the plain NLL), accuracy, weight norms, logit scale and margins (eval mode)."""
    z = member.eval()(data.x)
    correct = z.gather(1, data.y[:, None])[:, 0]
    other = z.masked_fill(F.one_hot(data.y, z.shape[1]).bool(), -float("inf")).amax(1)
    margin = correct - other
    params = dict(member.named_parameters())
    group = {"conv": [n for n in params if n in ("0.weight", "3.weight")],
             "bn": [n for n in params if n.startswith(("1.", "4."))],
             "head": [n for n in params if n.startswith("8.")]}
    norm = lambda names: math.sqrt(sum(float(params[n].pow(2).sum()) for n in names))  # noqa: E731
    return {"loss": float(loss_fn(z, data.y).mean()), "nll": float(F.cross_entropy(z, data.y)), "accuracy": float((z.argmax(1) == data.y).float().mean()),
            "weight_norm": norm(list(params)), **{f"weight_norm_{k}": norm(v) for k, v in group.items()},
            "logit_norm_mean": float(z.norm(dim=1).mean()), "logit_std_mean": float(z.std(dim=1).mean()),
            "margin_mean": float(margin.mean()), "margin_median": float(margin.median()),
            "margin_p10": float(margin.quantile(0.1)), "margin_min": float(margin.min()),
            "max_prob_mean": float(z.softmax(1).amax(1).mean())}


def matching_temperature(member: nn.Module, data: DigitsDataset, target: float) -> float:
    """``τ`` with NLL(logits / τ) = ``target`` on ``data`` (bisection on log τ; monotone when every row is right)."""
    with torch.no_grad():
        z = member.eval()(data.x)
    nll = lambda tau: float(F.cross_entropy(z / tau, data.y))  # noqa: E731
    lo, hi = -8.0, 8.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nll(math.exp(mid)) < target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def curvature(member: nn.Module, data: DigitsDataset, loss_fn: Callable, grid: dict, seed: int) -> dict:
    """Hessian traces, top eigenvalue of ``T H T`` and ``‖∇L‖``, ``‖T∇L‖`` of the mean loss (eval mode).

    On ``grid["curvature_rows"]`` rows of ``data`` drawn with ``seed`` (the same rows for every member).
    """
    member.eval()
    params = [p for p in member.parameters() if p.requires_grad]
    scale = [p.detach().abs() for p in params]
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: grid["curvature_rows"]]
    x, y = data.x[rows], data.y[rows]
    loss_of = lambda: loss_fn(member(x), y).mean()  # noqa: E731
    grads = torch.autograd.grad(loss_of(), params)
    tr, tr_se = hutchinson_trace(loss_of, params, grid["hutchinson_vectors"], None, seed)
    ttr, ttr_se = hutchinson_trace(loss_of, params, grid["hutchinson_vectors"], scale, seed)
    return {"hessian_trace": tr, "hessian_trace_stderr": tr_se, "adaptive_hessian_trace": ttr,
            "adaptive_hessian_trace_stderr": ttr_se,
            "adaptive_lambda_max": top_eigenvalue(loss_of, params, grid["power_iters"], scale, seed),
            "grad_norm": math.sqrt(sum(float(g.pow(2).sum()) for g in grads)),
            "adaptive_grad_norm": math.sqrt(sum(float((s * g).pow(2).sum()) for s, g in zip(scale, grads)))}


def curvature_by_group(member: nn.Module, data: DigitsDataset, loss_fn: Callable, grid: dict, seed: int) -> dict:
    """Per parameter group (conv weights, BatchNorm affine, linear head): ``tr(H_gg)``, ``tr(T_g H_gg T_g)``, ``‖T_g ∇_g L‖``.

    The diagonal blocks of the Hessian, by Hutchinson with ``grid["group_vectors"]`` Rademacher vectors that
    are zero outside the group, on the rows `curvature` uses.
    """
    member.eval()
    named = [(n, p) for n, p in member.named_parameters() if p.requires_grad]
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: grid["curvature_rows"]]
    x, y = data.x[rows], data.y[rows]
    loss_of = lambda: loss_fn(member(x), y).mean()  # noqa: E731
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss_of(), params)
    out = {}
    for group, prefixes in (("conv", ("0.weight", "3.weight")), ("bn", ("1.", "4.")), ("head", ("8.",))):
        mask = [float(n.startswith(prefixes)) for n, _ in named]
        scale_plain = [torch.full_like(p, k) for k, p in zip(mask, params)]
        scale_adaptive = [p.detach().abs() * k for k, p in zip(mask, params)]
        n_vec = grid["group_vectors"]
        out[f"{group}_hessian_trace"] = hutchinson_trace(loss_of, params, n_vec, scale_plain, seed)[0]
        out[f"{group}_adaptive_hessian_trace"] = hutchinson_trace(loss_of, params, n_vec, scale_adaptive, seed)[0]
        out[f"{group}_adaptive_grad_norm"] = math.sqrt(sum(float((s * g).pow(2).sum())
                                                           for s, g in zip(scale_adaptive, grads)))
        out[f"{group}_weight_norm"] = math.sqrt(sum(float(p.detach().pow(2).sum()) * k for k, p in zip(mask, params)))
    return out


def measure_plan(grid: dict, family: str, steps_grid: bool = True) -> dict[str, Callable]:
    """name -> ``fn(member, data, loss_fn, common)`` returning a float or a dict, for one family of parts.

    ``family``: ``"final"`` (everything; the step-count grid if ``steps_grid``), ``"matched"`` (the short
    list used at a matched loss).
    """
    def wc(rho0, steps, adaptive=True, **over):
        return lambda m, d, lf, c: worst_case_sharpness(m, d, rho0=rho0, steps=steps, adaptive=adaptive, loss_fn=lf,
                                                        **{**c, **over}).value

    def avg(sigma):
        return lambda m, d, lf, c: average_case_sharpness(m, d, rho0=sigma, num_samples=grid["avg_samples"],
                                                          loss_fn=lf, **c).value

    final = family == "final"
    plan: dict[str, Callable] = {"stats": lambda m, d, lf, c: member_stats(m, d, lf)}
    for rho0 in grid["curve_rho0"] if final else grid["matched_rho0"]:
        plan[f"worst_adaptive_rho0={rho0}_steps={grid['curve_steps']}"] = wc(rho0, grid["curve_steps"])
    if final and steps_grid:
        for steps in grid["steps_grid"]:
            plan[f"worst_adaptive_rho0={grid['steps_rho0']}_steps={steps}"] = wc(grid["steps_rho0"], steps)
    if final:
        qs = QUICKSTART_SETTING
        plan[f"worst_adaptive_rho0={qs['rho0']}_steps={qs['steps']}_batches={grid['quickstart_batches']}"] = wc(
            qs["rho0"], qs["steps"], num_batches=grid["quickstart_batches"])
    for rho in grid["plain_rho"] if final else grid["matched_plain_rho"]:
        plan[f"worst_plain_rho={rho}_steps={grid['curve_steps']}"] = wc(rho, grid["curve_steps"], adaptive=False)
    for sigma in grid["avg_sigma"] if final else grid["matched_sigma"]:
        plan[f"average_adaptive_sigma={sigma}"] = avg(sigma)
    rows = None if grid["fisher_rows"] is None else list(range(grid["fisher_rows"]))  # None: every row
    plan["fisher_trace"] = lambda m, d, lf, c: float(per_sample_sharpness(m, d, rows=rows, loss_fn=lf,
                                                                          progress=False).mean())
    plan["curvature"] = lambda m, d, lf, c: curvature(m, d, lf, grid, c["seed"])
    if final:
        plan["curvature_by_group"] = lambda m, d, lf, c: curvature_by_group(m, d, lf, grid, c["seed"])
    return plan


def summarize(per_member: list) -> dict:
    """``{"members": [...], "mean": ...}`` (dict values: mean per key)."""
    if isinstance(per_member[0], dict):
        return {"members": per_member, "mean": {k: float(np.mean([v[k] for v in per_member])) for k in per_member[0]}}
    return {"members": per_member, "mean": float(np.mean(per_member))}


# ----------------------------------------------------------------------------- the study


class Study:
    """The JSON file, read at start and rewritten after each part; ``done(path)`` says whether a part is there."""

    def __init__(self, args: argparse.Namespace, grid: dict) -> None:
        self.args, self.grid, self.path = args, grid, Path(args.results)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.start = time.perf_counter()
        self.data.setdefault("settings", {"grid": grid, "seed": args.seed, "subset_seed": args.subset_seed,
                                          "methods": {k: list(v) for k, v in METHODS.items()},
                                          "steps_grid_methods": list(STEPS_GRID_METHODS), "families": FAMILIES,
                                          "quickstart_setting": QUICKSTART_SETTING, "threads": args.threads})
        if self.data["settings"]["grid"] != grid:
            raise SystemExit(f"{self.path} was written with other settings; remove it or pass --results elsewhere")
        self.data.setdefault("compute_seconds", {})

    def node(self, *keys: str) -> dict:
        d = self.data
        for k in keys:
            d = d.setdefault(k, {})
        return d

    def out_of_time(self) -> bool:
        return self.args.max_seconds is not None and time.perf_counter() - self.start > self.args.max_seconds

    def save(self, part: str | None = None, seconds: float = 0.0) -> None:
        if part is not None:
            self.data["compute_seconds"][part] = seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        tmp.replace(self.path)


def run_parts(study: Study, where: dict, plan: dict[str, Callable], members: list[nn.Module], data, loss_fns: list,
              common: dict, label: str) -> bool:
    """Run each missing part of ``plan`` on every member into ``where``; False if stopped by ``--max_seconds``."""
    for name, fn in plan.items():
        if name in where:
            continue
        if study.out_of_time():
            return False
        t0 = time.perf_counter()
        where[name] = summarize([fn(m, data, lf or cross_entropy_per_sample, common) for m, lf in zip(members, loss_fns)])
        study.save(f"{label}/{name}", time.perf_counter() - t0)
        logger.info("%s %s: %s", label, name, where[name]["mean"])
    return True


def _mean(data: dict, method: str, family: str, part: str, key: str | None = None) -> float | None:
    node = data.get("methods", {}).get(method, {}).get(family, {}).get(part)
    if node is None:
        return None
    return node["mean"] if key is None else node["mean"].get(key)


def tables(data: dict) -> dict[str, str]:
    """Markdown tables (members' means) from the results: ``key`` (every measure side by side), ``curve``
    (the adaptive worst case against ρ0), ``steps`` (against the ascent steps) and ``quadratic`` (closed-form check).
    """
    grid = data["settings"]["grid"]
    steps, qs = grid["curve_steps"], QUICKSTART_SETTING
    qs_key = f"worst_adaptive_rho0={qs['rho0']}_steps={qs['steps']}_batches={grid['quickstart_batches']}"
    matched = f"temperature_nll={grid['matched_nll'][0]}"
    ckpt = f"checkpoint_nll={grid['checkpoint_nll']}"
    hi, lo = max(grid["matched_rho0"]), min(grid["matched_rho0"])
    sig, prho = min(grid["matched_sigma"]), max(grid["matched_plain_rho"])
    cols = [  # (header, family, part, key)
        ("train NLL", "final", "stats", "nll"), ("train acc", "final", "stats", "accuracy"),
        ("‖θ‖", "final", "stats", "weight_norm"), ("margin", "final", "stats", "margin_mean"),
        (f"adaptive ρ0={lo}", "final", f"worst_adaptive_rho0={lo}_steps={steps}", None),
        (f"adaptive ρ0={hi}", "final", f"worst_adaptive_rho0={hi}_steps={steps}", None),
        (f"quickstart (ρ0={qs['rho0']}, {qs['steps']} steps)", "final", qs_key, None),
        *[(f"plain ρ={r}", "final", f"worst_plain_rho={r}_steps={steps}", None) for r in grid["plain_rho"]],
        (f"average σ={sig}", "final", f"average_adaptive_sigma={sig}", None),
        ("Fisher tr", "final", "fisher_trace", None), ("tr H", "final", "curvature", "hessian_trace"),
        ("tr THT", "final", "curvature", "adaptive_hessian_trace"),
        ("λmax THT", "final", "curvature", "adaptive_lambda_max"), ("‖T∇L‖", "final", "curvature", "adaptive_grad_norm"),
        (f"T-matched adaptive ρ0={lo}", matched, f"worst_adaptive_rho0={lo}_steps={steps}", None),
        (f"T-matched adaptive ρ0={hi}", matched, f"worst_adaptive_rho0={hi}_steps={steps}", None),
        (f"T-matched plain ρ={prho}", matched, f"worst_plain_rho={prho}_steps={steps}", None),
        ("T-matched tr H", matched, "curvature", "hessian_trace"),
        ("T-matched tr THT", matched, "curvature", "adaptive_hessian_trace"),
        (f"held-out adaptive ρ0={hi}", "heldout", f"worst_adaptive_rho0={hi}_steps={steps}", None),
        (f"checkpoint adaptive ρ0={hi}", ckpt, f"worst_adaptive_rho0={hi}_steps={steps}", None),
    ]
    methods = list(data.get("methods", {}))

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.4g}"

    def table(headers: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"

    key = table(["measure", *methods], [[h, *(fmt(_mean(data, m, f, p, k)) for m in methods)] for h, f, p, k in cols])
    curve = table(["ρ0", *methods], [[str(r), *(fmt(_mean(data, m, "final", f"worst_adaptive_rho0={r}_steps={steps}"))
                                              for m in methods)] for r in grid["curve_rho0"]])
    step_rows = [[str(n), *(fmt(_mean(data, m, "final", f"worst_adaptive_rho0={grid['steps_rho0']}_steps={n}"))
                            for m in methods)] for n in sorted({*grid["steps_grid"], steps})]
    quad = data.get("quadratic_check", {}).get("worst_case", {})
    quad_rows = [[case, k, f"{v['ratio']:.4f}"] for case, rows in quad.items() for k, v in rows.items()]
    return {"key": key, "curve": curve, "steps": table([f"steps (ρ0={grid['steps_rho0']})", *methods], step_rows),
            "quadratic": table(["quadratic", "setting", "measured / closed form"], quad_rows)}


class MethodRun:
    """One method's trained members, loaded from ``--checkpoint_dir`` or trained (and saved) on first use."""

    def __init__(self, name: str, study: Study, train: DigitsDataset) -> None:
        self.name, self.study, self.train = name, study, train
        self.res = study.node("methods", name)
        self.ckpt = Path(study.args.checkpoint_dir) / f"{name}.pt"
        self._states: dict | None = None
        self._members: dict[str, list[nn.Module]] = {}

    def states(self) -> dict:
        if self._states is None:
            if self.ckpt.exists():
                self._states = torch.load(self.ckpt, weights_only=True)
            else:
                logger.info("training %s", self.name)
                states = train_method(self.name, self.study.grid, self.study.args.seed, self.train,
                                      self.ckpt.parent / "trainer")
                self.ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save(states, self.ckpt)
                fingerprint = [sum(float(v.double().pow(2).sum()) for k, v in s.items() if v.is_floating_point())
                               for s in states["final"]]
                old = self.res.get("weights_fingerprint")
                if old is not None and not np.allclose(old, fingerprint, rtol=1e-9, atol=0):
                    raise SystemExit(f"{self.name}: retrained weights differ from the ones measured before: "
                                     f"{fingerprint} vs {old}")
                self.res.update(weights_fingerprint=fingerprint, train_seconds=states["train_seconds"],
                                sam_set_fraction=states["sam_set_fraction"])
                self.study.save(f"{self.name}/train", states["train_seconds"])
                self._states = states
        return self._states

    def members(self, which: str = "final") -> list[nn.Module]:
        """The final members (``"final"``) or those at the end of epoch ``int(which) + 1``."""
        if which not in self._members:
            s = self.states()
            self._members[which] = load_members(s["final"] if which == "final" else s["epochs"][int(which)])
        return self._members[which]


def run_method(study: Study, run: MethodRun, test: DigitsDataset, common: dict) -> bool:
    """Every part of one method; False if stopped by ``--max_seconds``."""
    grid, res, name = study.grid, run.res, run.name
    if "epoch_train_nll" not in res:  # per-epoch training NLL of every member, for the equal-loss checkpoint
        t0 = time.perf_counter()
        res["epoch_train_nll"] = [[member_stats(m, run.train)["nll"] for m in load_members(e)]
                                  for e in run.states()["epochs"]]
        study.save(f"{name}/epoch_train_nll", time.perf_counter() - t0)
    final_plan = measure_plan(grid, "final", steps_grid=name in STEPS_GRID_METHODS)
    matched_plan = measure_plan(grid, "matched")
    families = FAMILIES[name]
    plain = [None] * grid["members"]
    todo = [("final", final_plan, run.train, "final", plain)]
    if "heldout" in families:
        todo.append(("heldout", matched_plan, test, "final", plain))
    for target in grid["matched_nll"] if "temperature" in families else []:  # equal training loss by temperature: τ per member
        key = f"temperature_nll={target}"
        node = study.node("methods", name, key)
        if "tau" not in node:
            node["tau"] = [matching_temperature(m, run.train, target) for m in run.members()]
            study.save()
        todo.append((key, matched_plan, run.train, "final", [tempered_ce(t) for t in node["tau"]]))
    # equal training loss by checkpoint: the first epoch whose mean member training NLL is <= checkpoint_nll
    mean_nll = [float(np.mean(e)) for e in res["epoch_train_nll"]]
    hit = next((i for i, v in enumerate(mean_nll) if v <= grid["checkpoint_nll"]), None)
    if hit is not None and "checkpoint" in families:
        key = f"checkpoint_nll={grid['checkpoint_nll']}"
        study.node("methods", name, key)["epoch"] = hit + 1
        todo.append((key, matched_plan, run.train, str(hit), plain))
    for key, plan, data, which, loss_fns in todo:
        where = study.node("methods", name, key)
        if all(k in where for k in plan):
            continue
        if not run_parts(study, where, plan, run.members(which), data, loss_fns, common, f"{name}/{key}"):
            return False
    return True


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the study; returns the results dict that is also written to ``--results``."""
    args = parse_args(argv)
    grid = TINY if args.tiny else FULL
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("sbtrainer").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study = Study(args, grid)
    common = {"batch_size": 5, "num_batches": grid["batches"], "seed": args.subset_seed, "disable_tqdm": True}
    if "quadratic_check" not in study.data:
        t0 = time.perf_counter()
        study.data["quadratic_check"] = quadratic_check(grid, min(grid["batches"], 5))
        study.save("quadratic_check", time.perf_counter() - t0)
    x_train, x_test, y_train, y_test = load_data()  # the quickstart's split
    train, test = DigitsDataset(x_train, y_train), DigitsDataset(x_test, y_test)
    for name in args.methods:
        if study.out_of_time() or not run_method(study, MethodRun(name, study, train), test, common):
            break
    study.data["complete"] = all(
        all(k in study.data.get("methods", {}).get(n, {}).get("final", {})
            for k in measure_plan(grid, "final", steps_grid=n in STEPS_GRID_METHODS)) for n in METHODS)
    study.data["total_compute_seconds"] = sum(study.data["compute_seconds"].values())
    study.data["tables"] = tables(study.data)
    study.save()
    print(study.data["tables"]["key"])
    return study.data


if __name__ == "__main__":
    main()
