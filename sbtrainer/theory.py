"""Theorems 1-2 of the paper (Sec. 3, App. C): SAM's sharpness-diversity trade-off on a quadratic objective.

Lu et al., "Sharpness-diversity tradeoff: improving flat ensembles with SharpBalance" (NeurIPS 2024).

Setting (Sec. 3). Training data ``A`` (``n_tr × d_in``) and test data ``T`` (``n_te × d_in``) have i.i.d.
``N(0, 1/d_in)`` entries; a teacher ``θ*`` labels them (``y = Aθ*``); a linear student ``θ`` starts at
``θ0`` with ``E[θ0] = 0``, ``E[θ0 θ0ᵀ] = σ² I`` and is trained for ``num_steps`` (the paper's ``k``) steps
of SAM with the *unnormalised* ascent step of App. C::

    θ ← θ − η ∇f(θ + ρ ∇f(θ)),        f(θ; A) = ½ (θ − θ*)ᵀ AᵀA (θ − θ*)

Loss normalisation: ``f`` is the paper's ``L_A`` of Theorem 3, i.e. **half the sum** of the squared
residuals over the ``n_tr`` rows (not the mean). The SAM map is then ``θ − θ* ← B (θ − θ*)`` with
``B = I − η AᵀA − ηρ (AᵀA)²``. With the sum, ``AᵀA`` has eigenvalues in the Marchenko-Pastur support
``[(√(n_tr/d_in) − 1)², (√(n_tr/d_in) + 1)²]`` (about 12 to 30 at 3000 × 150), so the iteration is stable
only if ``η (λ₊ + ρ λ₊²) < 2``; `sam_growth_factor` gives ``max |1 − ηλ − ηρλ²|`` over the support. Read
literally, every (η, ρ) of the paper's Fig. 10 (η ∈ {0.01, 0.05, 0.1}, ρ ∈ [0.3, 0.5] at 3000 × 150:
factors 2.0 to 47) and all of Fig. 11 (S = 10, blocks of 300 × 150) but η = 0.1, ρ = 0.4 (factor 0.98)
have a factor > 1: the weights grow geometrically. The formulas below still hold there as
expectations of polynomials in ``AᵀA``, but they are then dominated by the spectral edge, where the
leading-order moments used here are least accurate (see `phi`). Measured at 3000 × 150 with 50 draws
× 50 inits, the simulated ``D`` exceeds the theory by 0.4-3.3% for Fig. 10's 2-4 steps and 6-13% at 8
steps; for Fig. 11 by 10-18% at 4 steps, 33-71% at 8 and 73-188% at 12 (where the simulated sharpness
also exceeds the upper bound, by up to 32%); at stable settings ``D`` agrees within 3%. The mean over rows is the sum with
``η/n_tr`` and ``ρ/n_tr`` (pass those); with the paper's η a handful of such steps barely moves the
weights (``ηλ ≈ 0.01``), so no trade-off shows.

Quantities (Theorem 1, full data; Theorem 2, each model on one of ``S`` disjoint row blocks ``A_s``
chosen uniformly at random):

- diversity ``D``: the variance of a model's test output ``tθ_k`` over inits (and, Theorem 2, over the
  block ``s``), averaged over test rows ``t`` and data ``A``; in squared output units.
- sharpness ``κ(ρ0) = E_A[max_{‖ε‖≤ρ0} f(θ̄ + ε; A) − f(θ̄; A)]`` at the init-averaged weights
  ``θ̄ = E_{θ0(,s)}[θ_k]``, on the full training data ``A``; in loss units.

Readings where the paper is ambiguous (each checked against `simulate` in ``tests/test_theory.py``):

1. ``O(1 + 1/d_in)`` in ``φ``: the finite-size correction of the Wishart moments (Bishop et al. 2018,
   Cor. 3.3). It is dropped: ``E[(AᵀA)^m]`` is taken as the Marchenko-Pastur moment
   ``(n/d)^m Σ_{l=1..m} (d/n)^{m−l} N(m, l)`` exactly, so ``φ(i, j) = ∫ (1 − ηx − ηρx²)^i x^j dμ_MP(x)``.
   ``φ`` is computed in exact rational arithmetic (the sum alternates in sign and its terms reach 1e80
   at 4k = 48 steps, far beyond float64 cancellation).
2. Theorem 1's lower bound: the Jensen-gap term ``G`` is multiplied by ``ρ0`` (the proof bounds
   ``E[ρ0 ‖BᵏAᵀAθ*‖]``; the statement drops the ``ρ0`` on ``G``, which is only a weaker bound for ρ0 ≤ 1).
   ``G`` uses ``Var[Z] ≤ (φ(4k,4) − φ(2k,2)²)‖θ*‖⁴`` (Cauchy-Schwarz; the text's ``‖θ*‖²`` is a typo).
3. Theorem 2's ``C``: ``C_formula="paper"`` is the statement's expression. ``"partition"`` recounts
   ``E‖AᵀA Σ_s B_sᵏ θ*‖²`` over the 15 ways the four block indices can coincide; all terms factor
   exactly except ``E[B_b M_a M_b B_a]`` (a ≠ b, interleaved), taken at its large-``d_in`` (free
   probability) value ``2rφ'(k,0)φ'(k,1) − r²φ'(k,0)²``. The two differ in 5 of the 15 terms; both are
   compared with the simulated ``E‖AᵀA(θ̄ − θ*)‖²`` in the tests.
4. Theorem 2 averages the weights over inits *and* blocks: ``θ̄ = θ* − (1/S) Σ_s B_sᵏ θ*``.

Nothing here imports transformers; only torch, numpy and the standard library.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache, lru_cache
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

C_FORMULAS = ("paper", "partition")
MEAN_WEIGHTS = ("exact", "empirical")

__all__ = [
    "C_FORMULAS",
    "MEAN_WEIGHTS",
    "SimulationResult",
    "TheoryPoint",
    "agreement",
    "marchenko_pastur_moment",
    "max_quadratic_on_ball",
    "narayana",
    "phi",
    "phi_prime",
    "sam_growth_factor",
    "sam_theory",
    "simulate",
    "subset_c",
    "subset_theory",
]


# --------------------------------------------------------------------------- validation


def _check(name: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}; got {value!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    _check(name, isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low,
           f"an integer >= {low}", value)


def _real(name: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if positive:
        _check(name, ok and value > 0, "a finite number > 0", value)
    else:
        _check(name, ok and value >= 0, "a finite number >= 0", value)


def _check_data(n_tr: int, d_in: int, num_subsets: int = 1) -> None:
    _int_at_least("n_tr", n_tr, 1)
    _int_at_least("d_in", d_in, 1)
    _int_at_least("num_subsets", num_subsets, 1)
    _check("num_subsets", n_tr % num_subsets == 0, f"a divisor of n_tr={n_tr} (equal row blocks)", num_subsets)


# --------------------------------------------------------------------------- Wishart moments


@cache
def narayana(m: int, j: int) -> int:
    """Narayana number ``N(m, j) = (1/j) C(m−1, j−1) C(m, j−1)`` (Theorem 1's ``N_{m,l}``), 0 outside ``1 ≤ j ≤ m``.

    ``N(m, ·)`` sums to the Catalan number ``C_m``: ``N(3, ·) = 1, 3, 1``; ``N(4, ·) = 1, 6, 6, 1``.
    """
    _int_at_least("m", m, 0)
    _int_at_least("j", j, 0)
    if j < 1 or j > m:
        return 0
    return math.comb(m - 1, j - 1) * math.comb(m, j - 1) // j


@lru_cache(maxsize=4096)
def _mp_moment_exact(m: int, ratio: Fraction) -> Fraction:
    """``E[(AᵀA)^m] / I`` at leading order, ``ratio = n/d`` (rows over columns), as an exact fraction."""
    if m == 0:
        return Fraction(1)
    inv = 1 / ratio
    return ratio**m * sum((inv ** (m - j)) * narayana(m, j) for j in range(1, m + 1))


def marchenko_pastur_moment(m: int, n_tr: int | float, d_in: int) -> float:
    """Leading-order Wishart moment ``E[(AᵀA)^m] = (n/d)^m Σ_{l=1..m} (d/n)^{m−l} N(m, l) · I`` (App. C eq. 6).

    ``A`` is ``n_tr × d_in`` with ``N(0, 1/d_in)`` entries; ``m = 0`` gives 1. The ``O(1 + 1/d_in)``
    finite-size factor of the paper is taken as 1 (module docstring, reading 1). ``n_tr`` may be a
    fraction of rows (``n_tr / S`` for a block). E.g. ``m = 1``: ``n/d``; ``m = 2``: ``(n/d)² + n/d``.
    """
    _int_at_least("m", m, 0)
    _real("n_tr", n_tr, positive=True)
    _int_at_least("d_in", d_in, 1)
    return float(_mp_moment_exact(m, Fraction(n_tr) / d_in))


def _poly_pow(eta: Fraction, rho: Fraction, i: int) -> list[Fraction]:
    """Coefficients (ascending) of ``(1 − ηx − ηρx²)^i``: the multinomial sum of Prop. 1 grouped by power."""
    poly = [Fraction(1)]
    step = (Fraction(1), -eta, -eta * rho)
    for _ in range(i):
        out = [Fraction(0)] * (len(poly) + 2)
        for a, pa in enumerate(poly):
            if pa:
                out[a] += pa
                out[a + 1] += pa * step[1]
                out[a + 2] += pa * step[2]
        poly = out
    return poly


@lru_cache(maxsize=4096)
def _phi_exact(i: int, j: int, eta: Fraction, rho: Fraction, ratio: Fraction) -> Fraction:
    poly = _poly_pow(eta, rho, i)
    return sum((c * _mp_moment_exact(p + j, ratio) for p, c in enumerate(poly) if c), Fraction(0))


def phi(i: int, j: int, *, eta: float, rho: float, n_tr: int | float, d_in: int) -> float:
    """``φ(i, j)`` of Prop. 1 / Theorem 1: ``E_A[Bⁱ (AᵀA)ʲ] = φ(i, j) I``, ``B = I − ηAᵀA − ηρ(AᵀA)²``.

    ``φ(i, j) = 1_{j=0} + Σ_{k1+k2+k3=i} i!/(k1!k2!k3!) (−η)^{k2+k3} ρ^{k3} E[(AᵀA)^m]``, ``m = k2+2k3+j``,
    with the moments of `marchenko_pastur_moment`. The multinomial sum is evaluated as the expansion
    of ``(1 − ηx − ηρx²)ⁱ xʲ`` (same terms, grouped by ``m``) in exact rational arithmetic from the
    binary values of ``eta`` and ``rho``, then rounded once to float. E.g. ``φ(0, 0) = 1``,
    ``φ(1, 0) = 1 − η m₁ − ηρ m₂`` with ``m₁ = n/d``, ``m₂ = (n/d)² + n/d``.

    Raises ValueError for negative ``i``/``j``, non-finite or negative ``eta``/``rho``, bad sizes.
    """
    _int_at_least("i", i, 0)
    _int_at_least("j", j, 0)
    _real("eta", eta)
    _real("rho", rho)
    _real("n_tr", n_tr, positive=True)
    _int_at_least("d_in", d_in, 1)
    return float(_phi_exact(int(i), int(j), Fraction(eta), Fraction(rho), Fraction(n_tr) / d_in))


def phi_prime(i: int, j: int, *, eta: float, rho: float, n_tr: int, d_in: int, num_subsets: int) -> float:
    """``φ'(i, j)`` of Theorem 2: `phi` for one row block ``A_s`` of ``n_tr / num_subsets`` rows."""
    _check_data(n_tr, d_in, num_subsets)
    return phi(i, j, eta=eta, rho=rho, n_tr=Fraction(n_tr, num_subsets), d_in=d_in)


def sam_growth_factor(eta: float, rho: float, n_tr: int | float, d_in: int) -> float:
    """``max |1 − ηλ − ηρλ²|`` over the Marchenko-Pastur support of ``AᵀA`` (``A``: ``n_tr × d_in``).

    The per-step factor by which SAM (unnormalised ascent, half-sum loss) multiplies ``θ − θ*`` along
    the worst eigendirection, at leading order: the support is ``[(√(n/d) − 1)², (√(n/d) + 1)²]`` plus
    ``{0}`` when ``n < d`` (untrained directions, factor 1). > 1 means the iteration diverges
    geometrically (e.g. 3000 × 150, η = 0.01, ρ = 0.3: ≈ 2.0). For a block pass ``n_tr / S``.
    """
    _real("eta", eta)
    _real("rho", rho)
    _real("n_tr", n_tr, positive=True)
    _int_at_least("d_in", d_in, 1)
    c = n_tr / d_in
    edges = [(math.sqrt(c) - 1) ** 2, (math.sqrt(c) + 1) ** 2] + ([0.0] if c < 1 else [])
    return max(abs(1 - eta * x - eta * rho * x * x) for x in edges)


# --------------------------------------------------------------------------- Theorems 1 and 2


@dataclass(frozen=True)
class TheoryPoint:
    """Analytic diversity and sharpness bounds of one setting (Theorem 1 or 2).

    Attributes:
        diversity: ``D`` (squared output units).
        sharpness_upper: upper bound on ``κ(ρ0)`` (loss units).
        sharpness_lower: Theorem 1's lower bound (reading 2 of the module docstring; may be negative when
            the Jensen-gap term is large); ``None`` for Theorem 2, which gives no lower bound.
        growth_factor: `sam_growth_factor` of the data each model trains on (> 1: divergent).
        settings: the arguments.
    """

    diversity: float
    sharpness_upper: float
    sharpness_lower: float | None
    growth_factor: float
    settings: dict[str, Any] = field(default_factory=dict)


def _check_theory_args(eta: float, rho: float, num_steps: int, sigma: float, rho0: float, theta_star_norm: float) -> None:
    _real("eta", eta)
    _real("rho", rho)
    _int_at_least("num_steps", num_steps, 0)
    _real("sigma", sigma)
    _real("rho0", rho0)
    _real("theta_star_norm", theta_star_norm)


def sam_theory(*, eta: float, rho: float, num_steps: int, sigma: float, n_tr: int, d_in: int, rho0: float,
               theta_star_norm: float) -> TheoryPoint:
    """Theorem 1: diversity and sharpness bounds of SAM trained ``num_steps`` steps on all of ``A``.

    ``D = φ(2k, 0) σ²``;
    ``κ ≤ ρ0²/2 (√(n/d) + 1)² + ρ0 √φ(2k,2) ‖θ*‖``;
    ``κ ≥ ρ0²/2 (√(n/d) − 1)² + ρ0 (√φ(2k,2) ‖θ*‖ − G)``, ``G = (φ(4k,4) − φ(2k,2)²) / (2 φ(2k,2)^{3/2}) ‖θ*‖``
    (``k = num_steps``; the ``(√(n/d) − 1)²`` term assumes ``n_tr ≥ d_in``). ``sigma`` is the init standard
    deviation per coordinate, ``theta_star_norm`` is ``‖θ*‖₂``. Raises ValueError on invalid arguments.
    """
    _check_theory_args(eta, rho, num_steps, sigma, rho0, theta_star_norm)
    _check_data(n_tr, d_in)
    k = num_steps
    p = {"eta": eta, "rho": rho, "n_tr": n_tr, "d_in": d_in}
    c = n_tr / d_in
    phi22 = phi(2 * k, 2, **p)
    phi44 = phi(4 * k, 4, **p)
    diversity = phi(2 * k, 0, **p) * sigma**2
    upper = rho0**2 / 2 * (math.sqrt(c) + 1) ** 2 + rho0 * math.sqrt(phi22) * theta_star_norm
    gap = (phi44 - phi22**2) / (2 * phi22**1.5) * theta_star_norm if phi22 > 0 else 0.0
    lower = rho0**2 / 2 * (math.sqrt(c) - 1) ** 2 + rho0 * (math.sqrt(phi22) * theta_star_norm - gap)
    settings = dict(p, num_steps=num_steps, sigma=sigma, rho0=rho0, theta_star_norm=theta_star_norm)
    return TheoryPoint(diversity, upper, lower, sam_growth_factor(eta, rho, n_tr, d_in), settings)


def subset_c(*, eta: float, rho: float, num_steps: int, n_tr: int, d_in: int, num_subsets: int,
             formula: str = "paper") -> float:
    """Theorem 2's ``C``, with ``E‖AᵀA Σ_s B_sᵏ θ*‖² ≈ C ‖θ*‖²`` (``B_s`` trained on block ``s``).

    ``formula="paper"``: the statement's expression. ``"partition"``: the recount of reading 3 of the
    module docstring. ``r = n_tr / (S d_in)``, ``φ'`` = `phi_prime`, ``k = num_steps``.
    """
    _check("formula", formula in C_FORMULAS, f"one of {C_FORMULAS}", formula)
    _check_data(n_tr, d_in, num_subsets)
    k, s = num_steps, num_subsets
    p = {"eta": eta, "rho": rho, "n_tr": n_tr, "d_in": d_in, "num_subsets": s}

    def f(i: int, j: int) -> float:
        return phi_prime(i, j, **p)

    r = n_tr / (s * d_in)
    s1, s2, s3 = s * (s - 1), s * (s - 1) * (s - 2), s * (s - 1) * (s - 2) * (s - 3)
    if formula == "paper":
        return (s * f(2 * k, 2) + 2 * r * s1 * f(2 * k, 1) + 2 * s1 * f(k, 2) * f(k, 0)
                + r * (1 + r) * s1 * f(2 * k, 0) + 2 * s1 * f(k, 1) ** 2
                + 1.5 * r * (1 + r) * s2 * f(k, 0) ** 2 + 1.5 * r**2 * s2 * f(2 * k, 0)
                + 3 * r * s2 * f(k, 0) * f(k, 1) + r**2 * s3 * f(k, 0) ** 2)
    interleaved = 2 * r * f(k, 0) * f(k, 1) - r**2 * f(k, 0) ** 2  # E[B_b M_a M_b B_a], a ≠ b, large d
    return (s * f(2 * k, 2) + 2 * r * s1 * f(2 * k, 1) + 2 * s1 * f(k, 0) * f(k, 2)
            + s1 * (f(k, 1) ** 2 + interleaved + r * (1 + r) * f(2 * k, 0))
            + s2 * (4 * r * f(k, 0) * f(k, 1) + r * (1 + r) * f(k, 0) ** 2 + r**2 * f(2 * k, 0))
            + r**2 * s3 * f(k, 0) ** 2)


def subset_theory(*, eta: float, rho: float, num_steps: int, sigma: float, n_tr: int, d_in: int, num_subsets: int,
                  rho0: float, theta_star_norm: float, c_formula: str = "paper") -> TheoryPoint:
    """Theorem 2: diversity and sharpness upper bound when each model trains on one of ``S`` row blocks.

    ``D = φ'(2k,0) σ² + (S − 1)/(d S) (φ'(2k,0) − φ'(k,0)²) ‖θ*‖²``;
    ``κ ≤ ρ0²/2 (√(n/d) + 1)² + (ρ0/S) √C ‖θ*‖`` (`subset_c`, ``formula=c_formula``).
    ``num_subsets = 1`` gives Theorem 1's ``D`` and upper bound. Raises ValueError on invalid arguments
    (``num_subsets`` must divide ``n_tr``).
    """
    _check_theory_args(eta, rho, num_steps, sigma, rho0, theta_star_norm)
    _check_data(n_tr, d_in, num_subsets)
    k, s = num_steps, num_subsets
    p = {"eta": eta, "rho": rho, "n_tr": n_tr, "d_in": d_in, "num_subsets": s}
    f2k0, fk0 = phi_prime(2 * k, 0, **p), phi_prime(k, 0, **p)
    diversity = f2k0 * sigma**2 + (s - 1) / (d_in * s) * (f2k0 - fk0**2) * theta_star_norm**2
    c = subset_c(eta=eta, rho=rho, num_steps=k, n_tr=n_tr, d_in=d_in, num_subsets=s, formula=c_formula)
    upper = rho0**2 / 2 * (math.sqrt(n_tr / d_in) + 1) ** 2 + rho0 / s * math.sqrt(max(c, 0.0)) * theta_star_norm
    settings = dict(p, num_steps=num_steps, sigma=sigma, rho0=rho0, theta_star_norm=theta_star_norm,
                    c_formula=c_formula)
    return TheoryPoint(diversity, upper, None, sam_growth_factor(eta, rho, n_tr / s, d_in), settings)


# --------------------------------------------------------------------------- simulation (App. C.3)


def max_quadratic_on_ball(gram: torch.Tensor, grad: torch.Tensor, rho0: float) -> torch.Tensor:
    """Exact ``max_{‖ε‖≤ρ0} ½ εᵀMε + gᵀε`` for symmetric PSD ``M`` (the trust-region problem), batched.

    Args:
        gram: ``(..., d, d)`` symmetric PSD ``M``.
        grad: ``(..., d)`` linear term ``g``.
        rho0: ball radius ≥ 0.

    Returns ``(...)`` maxima (same dtype). Solved in ``M``'s eigenbasis: ``ε = (μI − M)⁻¹ g`` with the
    multiplier ``μ ≥ λ_max`` found by bisection so that ``‖ε‖ = ρ0``. The degenerate "hard case" (``g``
    orthogonal to the top eigenvector) is covered by taking the larger of that value and ``½ λ_max ρ0²``
    (exact for ``g = 0``). Raises ValueError for a negative or non-finite ``rho0``.
    """
    _real("rho0", rho0)
    evals, evecs = torch.linalg.eigh(gram)
    return _trust_region(evals, evecs, grad, rho0)


def _trust_region(evals: torch.Tensor, evecs: torch.Tensor, grad: torch.Tensor, rho0: float,
                  iters: int = 200) -> torch.Tensor:
    """`max_quadratic_on_ball` given the eigendecomposition (``evals`` ascending)."""
    lmax = evals[..., -1]
    if rho0 == 0:
        return torch.zeros_like(lmax)
    gt = (evecs.transpose(-1, -2) @ grad.unsqueeze(-1)).squeeze(-1)
    lo, hi = lmax.clone(), lmax + gt.norm(dim=-1) / rho0 + 1e-300
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_long = (gt / (mid.unsqueeze(-1) - evals).clamp_min(1e-300)).norm(dim=-1) > rho0
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    eps = gt / (hi.unsqueeze(-1) - evals).clamp_min(1e-300)
    eps = eps * (rho0 / eps.norm(dim=-1).clamp_min(1e-300)).clamp(max=1.0).unsqueeze(-1)
    value = 0.5 * (evals * eps**2).sum(-1) + (gt * eps).sum(-1)
    return torch.maximum(value, 0.5 * lmax * rho0**2)


def _ascent(gram: torch.Tensor, grad: torch.Tensor, rho0: float, lr: float, steps: int) -> torch.Tensor:
    """Projected gradient ascent on ``q(ε) = ½ εᵀMε + gᵀε`` over ``‖ε‖ ≤ ρ0`` from ``ε = 0``; best ``q`` seen."""
    eps = torch.zeros_like(grad)
    m_eps = torch.zeros_like(grad)  # M ε, computed once per step
    best = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
    for _ in range(steps):
        eps = eps + lr * (m_eps + grad)
        eps = eps * (rho0 / eps.norm(dim=-1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)
        m_eps = (eps.unsqueeze(-2) @ gram).squeeze(-2)
        best = torch.maximum(best, (eps * (0.5 * m_eps + grad)).sum(-1))
    return best


@dataclass(frozen=True)
class SimulationResult:
    """The App. C.3 simulation of one setting; means over data draws, with standard errors over draws.

    Attributes:
        diversity, diversity_sem: simulated ``D`` (squared output units) and its standard error.
        sharpness, sharpness_sem: ``κ(ρ0)`` by projected gradient ascent (loss units).
        sharpness_exact: ``κ(ρ0)`` by the exact trust-region maximum (`max_quadratic_on_ball`), or ``None``.
        grad_sq: mean ``‖AᵀA(θ̄ − θ*)‖²``, to compare with ``φ(2k,2)‖θ*‖²`` (Thm 1) or ``C‖θ*‖²/S²`` (Thm 2).
        lambda_max: mean largest eigenvalue of ``AᵀA`` (compare ``(√(n/d) + 1)²``); ``nan`` if not computed.
        per_draw: per-draw values (``"diversity"``, ``"sharpness"``, ``"grad_sq"``), float64 CPU tensors.
        finite: False if any weight overflowed to inf/nan.
        seconds: wall time.
        settings: the arguments.
    """

    diversity: float
    diversity_sem: float
    sharpness: float
    sharpness_sem: float
    sharpness_exact: float | None
    grad_sq: float
    lambda_max: float
    per_draw: dict[str, torch.Tensor]
    finite: bool
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _sem(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def simulate(*, eta: float, rho: float, num_steps: int, sigma: float, n_tr: int, d_in: int, rho0: float,
             theta_star_norm: float, num_subsets: int = 1, num_draws: int = 50, num_inits: int = 50,
             n_te: int = 1000, ascent_lr: float = 0.01, ascent_steps: int = 50, mean_weights: str = "exact",
             exact_sharpness: bool = True, seed: int = 0, draw_chunk: int | None = None,
             device: str | torch.device = "cpu") -> SimulationResult:
    """App. C.3: Gaussian data, SAM with unnormalised ascent, diversity over inits, sharpness at mean weights.

    For each of ``num_draws`` data draws (``A``: ``n_tr × d_in``, ``T``: ``n_te × d_in``, entries
    ``N(0, 1/d_in)``; one fixed teacher ``θ*`` of norm ``theta_star_norm``, uniform direction):

    - ``num_subsets = 1`` (Theorem 1): ``num_inits`` models from ``θ0 ~ N(0, σ² I)`` trained on ``A``.
    - ``num_subsets = S > 1`` (Theorem 2): ``A`` is cut into ``S`` consecutive blocks of ``n_tr / S`` rows
      and ``num_inits`` models, each with its own init, are trained on every block (``S · num_inits``
      models: the block is stratified rather than drawn, which has the same uniform law).
    - each model runs ``num_steps`` steps of ``θ ← θ − η ∇f(θ + ρ∇f(θ))`` on its rows, ``f`` the half-sum
      loss (module docstring), in float64.
    - diversity: variance over the models (ddof 1) of ``tθ_k``, averaged over the ``n_te`` test rows
      (computed as ``tr(Cov(θ_k) TᵀT) / n_te``, the same number).
    - sharpness: ``max_{‖ε‖≤ρ0} f(θ̄ + ε; A) − f(θ̄; A)`` on all of ``A`` by projected gradient ascent from
      ``ε = 0`` (``ascent_lr`` 0.01, ``ascent_steps`` 50 as in the paper; best value seen), and exactly
      (``exact_sharpness``). ``mean_weights="exact"``: ``θ̄ = E_{θ0(,s)}[θ_k]`` computed as the run from
      ``θ0 = 0`` (the update is affine in ``θ0`` and ``E[θ0] = 0``), averaged over blocks; ``"empirical"``:
      the mean of the trained models, as a finite-init reading of the paper, which adds
      ``d σ² / num_inits``-size init noise to ``‖θ*‖²`` in the sharpness.

    Vectorised over draws (``draw_chunk`` at a time; default: chunks of ≈ 16M data entries), blocks and
    inits. Results do not depend on ``draw_chunk``: every draw has its own generator from ``seed``.

    Raises ValueError on invalid arguments.
    """
    t_start = time.perf_counter()
    _check_theory_args(eta, rho, num_steps, sigma, rho0, theta_star_norm)
    _check_data(n_tr, d_in, num_subsets)
    _int_at_least("num_draws", num_draws, 1)
    _int_at_least("num_inits", num_inits, 2)
    _int_at_least("n_te", n_te, 1)
    _real("ascent_lr", ascent_lr, positive=True)
    _int_at_least("ascent_steps", ascent_steps, 1)
    _check("mean_weights", mean_weights in MEAN_WEIGHTS, f"one of {MEAN_WEIGHTS}", mean_weights)
    if draw_chunk is not None:
        _int_at_least("draw_chunk", draw_chunk, 1)
    s, d, n_s = num_subsets, d_in, n_tr // num_subsets
    chunk = draw_chunk or max(1, min(num_draws, (1 << 24) // max(1, (n_tr + n_te) * d)))
    dtype = torch.float64
    seeds = np.random.SeedSequence(seed).generate_state(num_draws + 1, dtype=np.uint64)
    g_star = torch.Generator().manual_seed(int(seeds[0] % (1 << 63)))
    theta_star = torch.randn(d, generator=g_star, dtype=dtype)
    theta_star = (theta_star * (theta_star_norm / theta_star.norm())).to(device)
    out: dict[str, list[torch.Tensor]] = {"diversity": [], "sharpness": [], "grad_sq": [], "sharpness_exact": [],
                                          "lambda_max": []}
    finite = True
    for start in range(0, num_draws, chunk):
        idx = range(start, min(num_draws, start + chunk))
        c = len(idx)
        a = torch.empty(c, n_tr, d, dtype=dtype)
        tt = torch.empty(c, n_te, d, dtype=dtype)
        inits = torch.empty(c, s, num_inits, d, dtype=dtype)
        for i, r in enumerate(idx):
            g = torch.Generator().manual_seed(int(seeds[r + 1] % (1 << 63)))
            a[i].normal_(generator=g)
            tt[i].normal_(generator=g)
            inits[i].normal_(generator=g)
        a, tt = a.mul_(1 / math.sqrt(d)).to(device), tt.mul_(1 / math.sqrt(d)).to(device)
        blocks = a.reshape(c, s, n_s, d)
        gram_s = blocks.transpose(-1, -2) @ blocks  # (c, S, d, d)
        gram = gram_s.sum(1)  # (c, d, d) = AᵀA
        # row 0 of every block: the run from θ0 = 0, i.e. E_θ0[θ_k] (the update is affine in θ0)
        theta = torch.cat([torch.zeros(c, s, 1, d, dtype=dtype, device=device),
                           inits.mul_(sigma).to(device)], dim=2)  # (c, S, I+1, d)
        for _ in range(num_steps):
            g1 = (theta - theta_star) @ gram_s  # ∇f(θ) = M_s(θ − θ*), rows of a symmetric M_s
            g2 = g1 + rho * (g1 @ gram_s)  # ∇f(θ + ρ∇f(θ)) = M_s(θ + ρ g1 − θ*)
            theta = theta - eta * g2
        finite = finite and bool(torch.isfinite(theta).all())
        models = theta[:, :, 1:, :].reshape(c, s * num_inits, d)
        centered = models - models.mean(1, keepdim=True)
        cov = centered.transpose(-1, -2) @ centered / (s * num_inits - 1)
        out["diversity"].append((cov * (tt.transpose(-1, -2) @ tt)).sum((-1, -2)) / n_te)
        mean = theta[:, :, 0, :].mean(1) if mean_weights == "exact" else models.mean(1)
        grad = ((mean - theta_star).unsqueeze(-2) @ gram).squeeze(-2)  # AᵀA(θ̄ − θ*)
        out["grad_sq"].append((grad**2).sum(-1))
        out["sharpness"].append(_ascent(gram, grad, rho0, ascent_lr, ascent_steps))
        if exact_sharpness:
            evals, evecs = torch.linalg.eigh(gram)
            out["sharpness_exact"].append(_trust_region(evals, evecs, grad, rho0))
            out["lambda_max"].append(evals[:, -1])
    per = {k: torch.cat(v).double().cpu() for k, v in out.items() if v}
    if not finite:
        logger.warning("simulate: weights overflowed (eta=%g, rho=%g, num_steps=%d, growth factor %.3g)",
                       eta, rho, num_steps, sam_growth_factor(eta, rho, n_s, d))
    settings = {"eta": eta, "rho": rho, "num_steps": num_steps, "sigma": sigma, "n_tr": n_tr, "d_in": d_in,
                "rho0": rho0, "theta_star_norm": theta_star_norm, "num_subsets": s, "num_draws": num_draws,
                "num_inits": num_inits, "n_te": n_te, "ascent_lr": ascent_lr, "ascent_steps": ascent_steps,
                "mean_weights": mean_weights, "seed": seed}
    return SimulationResult(
        diversity=float(per["diversity"].mean()), diversity_sem=_sem(per["diversity"]),
        sharpness=float(per["sharpness"].mean()), sharpness_sem=_sem(per["sharpness"]),
        sharpness_exact=float(per["sharpness_exact"].mean()) if exact_sharpness else None,
        grad_sq=float(per["grad_sq"].mean()),
        lambda_max=float(per["lambda_max"].mean()) if exact_sharpness else float("nan"),
        per_draw={k: per[k] for k in ("diversity", "sharpness", "grad_sq")}, finite=finite,
        seconds=time.perf_counter() - t_start, settings=settings)


def agreement(theory: TheoryPoint, sim: SimulationResult, *, rel_tol: float = 0.1, num_sem: float = 2.0) -> dict[str, Any]:
    """Does the simulation reproduce the theorem at this setting?

    ``diversity_rel_err = D_sim / D_theory − 1``; ``in_bounds``: the simulated (ascent) sharpness lies in
    ``[lower − num_sem·sem, upper + num_sem·sem]`` (no lower limit for Theorem 2), the slack being the
    sampling error over data draws that the paper's Fig. 2 caption mentions; ``reproduces``: the weights
    stayed finite, ``|diversity_rel_err| ≤ rel_tol`` and ``in_bounds``. Raises ValueError for a negative
    ``rel_tol`` or ``num_sem``.
    """
    _real("rel_tol", rel_tol)
    _real("num_sem", num_sem)
    rel = sim.diversity / theory.diversity - 1 if theory.diversity != 0 else float("inf")
    slack = num_sem * (sim.sharpness_sem if math.isfinite(sim.sharpness_sem) else 0.0)
    lower = theory.sharpness_lower if theory.sharpness_lower is not None else -math.inf
    in_bounds = bool(lower - slack <= sim.sharpness <= theory.sharpness_upper + slack)
    ok = bool(sim.finite and math.isfinite(rel) and abs(rel) <= rel_tol and in_bounds)
    return {"diversity_rel_err": rel, "in_bounds": in_bounds, "reproduces": ok}
