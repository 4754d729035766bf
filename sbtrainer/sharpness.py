"""Adaptive worst-case and average-case sharpness of a trained model.

Lu et al., "Sharpness-diversity tradeoff: improving flat ensembles with SharpBalance" (NeurIPS 2024)
measure a member's sharpness with the metrics of Kwon et al. (2021) and Andriushchenko et al. (2023):

- adaptive worst-case sharpness, eq. (3) (ℓ2) and eq. (9), App. E (ℓ∞)::

      max_{‖T⁻¹ε‖_p ≤ ρ0}  L_B(θ + ε) − L_B(θ),      T = diag(|θ|)

- adaptive average-case sharpness, eq. (10), App. E::

      E_{ε ~ N(0, ρ0² T²)} [L_B(θ + ε)] − L_B(θ)

each computed per batch ``B`` and averaged over batches. Defaults follow the paper and its reference
(Andriushchenko et al., 2023): ρ0 = 0.5, 20 ascent steps, 100 batches of 5 training samples, the model
in eval mode (BatchNorm uses its running statistics), no augmentation (pass an un-augmented dataset).

The maximisation writes ``ε = T δ`` and runs projected, normalised gradient ascent on δ in the ball
``‖δ‖_p ≤ ρ0`` (ℓ2: steps along ``Tg/‖Tg‖``, ℓ∞: along ``sign(Tg)``), from a small random δ; it keeps the
largest loss increase seen, ε = 0 included, so the result is ≥ 0 and a lower bound of the true maximum.
(The reference uses Auto-PGD with momentum; plain PGD is enough for the ≤ 2% accuracy tested here.)

Every function restores the model's parameters and buffers bitwise, its train/eval mode and leaves
``.grad`` untouched; randomness comes from local ``torch.Generator``s seeded by ``seed`` (the global RNG is
not used). ``adaptive=False`` gives ``T = I``. Only parameters with ``requires_grad`` are perturbed.
Nothing here knows about the Trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .member_adapter import batch_labels, call_member, cross_entropy_per_sample, model_inputs
from .sam import frozen_buffers

logger = logging.getLogger(__name__)

NORMS = ("l2", "linf")
KINDS = ("worst_case", "average_case")
# The ascent starts at a random δ with ‖δ‖ = _INIT_FRACTION · ρ0 (ℓ2) or |δ_k| ≤ _INIT_FRACTION · ρ0 (ℓ∞).
_INIT_FRACTION = 0.05

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SharpnessResult:
    """A sharpness estimate.

    Attributes:
        value: mean over batches of the per-batch sharpness.
        per_batch: the per-batch values, in batch order (length = number of batches used).
        stderr: Monte Carlo standard error of ``value`` given the batches (average-case only, from the
            spread of the noise draws; ``nan`` with one draw); ``None`` for worst-case sharpness.
        kind: ``"worst_case_l2"``, ``"worst_case_linf"`` or ``"average_case"``.
        config: the settings used (rho0, steps or num_samples, adaptive, batch_size, num_batches, seed).
    """

    value: float
    per_batch: list[float]
    stderr: float | None
    kind: str
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check(name: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}; got {value!r}")


def _validate_common(rho0: float, batch_size: int, num_batches: int) -> None:
    _check("rho0", isinstance(rho0, (int, float)) and math.isfinite(rho0) and rho0 >= 0, "a finite number >= 0", rho0)
    _check("batch_size", isinstance(batch_size, int) and batch_size >= 1, "an integer >= 1", batch_size)
    _check("num_batches", isinstance(num_batches, int) and num_batches >= 1, "an integer >= 1", num_batches)


# --------------------------------------------------------------------------- data


def _is_map_dataset(data: Any) -> bool:
    """True for a dataset of examples (torch map-style ``Dataset`` or HF ``datasets.Dataset``)."""
    if isinstance(data, torch.utils.data.IterableDataset):
        return False
    if isinstance(data, torch.utils.data.Dataset):
        return True
    return hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _collate(examples: list[Any], collate_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Collate dict examples with ``collate_fn`` or ``transformers.default_data_collator`` (``label`` becomes ``labels``)."""
    if not isinstance(examples[0], Mapping):
        raise ValueError(f"data examples must be dicts of columns; got {type(examples[0]).__name__}")
    if collate_fn is None:
        from transformers import default_data_collator

        collate_fn = default_data_collator
    return dict(collate_fn(examples))


def sample_batches(
    data: Any,
    batch_size: int = 5,
    num_batches: int = 100,
    generator: torch.Generator | None = None,
    collate_fn: Callable | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The batches a sharpness estimate runs on.

    Args:
        data: a dataset of dict examples (torch map-style ``Dataset``, HF ``datasets.Dataset``): then
            ``num_batches * batch_size`` rows are drawn without replacement with ``generator`` (all rows if
            the dataset is smaller) and collated into batches of ``batch_size``. Anything else (a list of
            batch dicts, a ``DataLoader``, a generator) is taken as batches: the first ``num_batches``.
        batch_size: rows per batch (datasets only).
        num_batches: number of batches.
        generator: a CPU ``torch.Generator`` for the row sampling; the global RNG is never used.
        collate_fn: batches the sampled examples of a dataset (e.g. a ``DataCollatorWithPadding`` for
            unpadded token ids); default ``transformers.default_data_collator``. Unused for batch iterables.

    Returns a list of batch dicts of tensors (batch dimension first).
    """
    if _is_map_dataset(data):
        n = len(data)
        take = min(n, batch_size * num_batches)
        if take < batch_size * num_batches:
            logger.info("dataset has %d rows < num_batches * batch_size = %d: using all", n, batch_size * num_batches)
        rows = torch.randperm(n, generator=generator)[:take].tolist()
        batches = [_collate([data[i] for i in rows[s : s + batch_size]], collate_fn) for s in range(0, take, batch_size)]
    else:
        batches = list(itertools.islice(iter(data), num_batches))
        for b in batches:
            if not isinstance(b, Mapping):
                raise ValueError(f"data must yield batch dicts; got {type(b).__name__}")
    if not batches:
        raise ValueError("data must provide at least one example; got an empty dataset or iterable")
    return batches


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- perturbing a model


class _Perturber:
    """Sets ``θ = θ0 + T δ`` on a model's trainable parameters and restores ``θ0`` (and buffers) bitwise.

    ``δ`` is a list of tensors shaped like the parameters; ``T = |θ0|`` (adaptive) or ``I``.
    """

    def __init__(self, model: nn.Module, adaptive: bool):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model must have at least one parameter with requires_grad=True; got none")
        self.origin = [p.detach().clone() for p in self.params]
        self._buffers = contextlib.ExitStack()  # every buffer, reassigned or updated in place, restored bitwise
        self._buffers.enter_context(frozen_buffers(model))
        self.scale = [o.abs() for o in self.origin] if adaptive else None
        self.was_training = model.training

    def scaled(self, delta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``T δ`` per parameter."""
        return list(delta) if self.scale is None else [s * d for s, d in zip(self.scale, delta)]

    @torch.no_grad()
    def set(self, delta: Sequence[torch.Tensor] | None) -> None:
        """Parameters ← ``θ0 + T δ`` (``θ0`` itself for ``delta=None``)."""
        if delta is None:
            for p, o in zip(self.params, self.origin):
                p.copy_(o)
            return
        for p, o, e in zip(self.params, self.origin, self.scaled(delta)):
            p.copy_(o + e)

    @torch.no_grad()
    def restore(self) -> None:
        """Original parameters, buffers and train/eval mode."""
        self.set(None)
        self._buffers.close()
        self.model.train(self.was_training)


def _loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn, input_name: str) -> torch.Tensor:
    """Scalar loss of ``model`` on ``batch`` (logits ``(B, C)`` from :func:`call_member`)."""
    logits = call_member(model, model_inputs(batch, model, input_name), input_name)
    return loss_fn(logits, batch_labels(batch)).mean()  # a per-sample member loss (B,) or a batch mean


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))


def _draw(sampler: Callable, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``sampler`` (``torch.rand``/``torch.randn``) shaped like ``like``, drawn on ``gen``'s device."""
    out = sampler(like.shape, generator=gen, device=gen.device, dtype=like.dtype)
    return out.to(like.device)


def _random_start(params: Sequence[torch.Tensor], norm: str, rho0: float, gen: torch.Generator) -> list[torch.Tensor]:
    """A small random δ: ℓ2 norm ``_INIT_FRACTION·ρ0`` (l2) or uniform in ``±_INIT_FRACTION·ρ0`` (linf)."""
    radius = _INIT_FRACTION * rho0
    if norm == "linf":
        return [(_draw(torch.rand, p, gen) * 2 - 1) * radius for p in params]
    delta = [_draw(torch.randn, p, gen) for p in params]
    factor = radius / max(float(_global_norm(delta)), 1e-30)
    return [d * factor for d in delta]


def _ascent_step(delta: list[torch.Tensor], direction: list[torch.Tensor], norm: str, step: float, rho0: float) -> bool:
    """One projected normalised-gradient step on δ in place; False if the direction is zero."""
    if norm == "linf":
        for d, g in zip(delta, direction):
            d.add_(g.sign(), alpha=step).clamp_(-rho0, rho0)
        return any(bool(g.any()) for g in direction)
    gnorm = float(_global_norm(direction))
    if gnorm == 0.0:
        return False
    for d, g in zip(delta, direction):
        d.add_(g, alpha=step / gnorm)
    dnorm = float(_global_norm(delta))
    if dnorm > rho0:
        for d in delta:
            d.mul_(rho0 / dnorm)
    return True


def _worst_case_batch(
    pert: _Perturber, batch: Mapping, loss_fn: LossFn, input_name: str,
    rho0: float, norm: str, steps: int, step: float, gen: torch.Generator,
) -> float:  # fmt: skip
    """max over the ascent path (ε = 0 included) of ``L_B(θ0 + Tδ) − L_B(θ0)`` for one batch."""
    model = pert.model
    with torch.no_grad():
        pert.set(None)
        base = float(_loss(model, batch, loss_fn, input_name))
    best = 0.0
    if rho0 == 0:
        return best
    delta = _random_start(pert.params, norm, rho0, gen)
    for _ in range(steps):
        pert.set(delta)
        loss = _loss(model, batch, loss_fn, input_name)
        grads = torch.autograd.grad(loss, pert.params, allow_unused=True)
        best = max(best, float(loss.detach()) - base)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(pert.params, grads)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            logger.warning("non-finite gradient during the sharpness ascent: stopping this batch early")
            return best
        # dL/dδ = T ∇L(θ0 + Tδ)
        if not _ascent_step(delta, pert.scaled(grads), norm, step, rho0):
            break
    with torch.no_grad():
        pert.set(delta)
        best = max(best, float(_loss(model, batch, loss_fn, input_name)) - base)
    return best


def _setup(model: nn.Module, data: Any, seed: int, batch_size: int, num_batches: int, adaptive: bool,
           collate_fn: Callable | None):
    """Batches (sampled with a CPU generator), the perturber, and a noise generator on the model's device."""
    batches = sample_batches(data, batch_size, num_batches, torch.Generator().manual_seed(seed), collate_fn)
    pert = _Perturber(model, adaptive)
    device = pert.params[0].device
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    return [_to_device(b, device) for b in batches], pert, noise_gen


def worst_case_sharpness(
    model: nn.Module,
    data: Any,
    *,
    rho0: float = 0.5,
    norm: str = "l2",
    steps: int = 20,
    step_size: float | None = None,
    adaptive: bool = True,
    loss_fn: LossFn | None = None,
    input_name: str = "pixel_values",
    batch_size: int = 5,
    num_batches: int = 100,
    seed: int = 0,
    collate_fn: Callable | None = None,
    disable_tqdm: bool = False,
    desc: str | None = None,
) -> SharpnessResult:
    """Adaptive worst-case sharpness, eq. (3) (``norm="l2"``) or eq. (9) (``norm="linf"``).

    Args:
        model: an HF ``PreTrainedModel`` or a module mapping ``batch[input_name]`` to logits ``(B, C)``.
        data: a dataset of dict examples (sampled: ``num_batches * batch_size`` rows without replacement)
            or an iterable of batch dicts (the first ``num_batches`` used); see :func:`sample_batches`.
            Pass it without augmentation. Each batch needs a ``labels``/``label`` column.
        rho0: radius of the ball ``‖T⁻¹ε‖_p ≤ rho0`` (>= 0).
        norm: ``"l2"`` or ``"linf"``.
        steps: ascent steps per batch (>= 1), each one forward and backward pass.
        step_size: ascent step length in the scaled space; default ``2 * rho0 / steps``.
        adaptive: ``T = diag(|θ|)`` if True, else ``T = I``.
        loss_fn: the member loss ``loss_fn(logits (B, C), labels (B,)) -> (B,)`` (or its batch mean), averaged over
            the batch; default per-sample cross-entropy (`sbtrainer.member_adapter`).
        input_name: the input column for plain modules (see :mod:`sbtrainer.member_adapter`).
        batch_size, num_batches: see ``data``.
        seed: seeds the row sampling and the random start (local generators).
        collate_fn: batches the sampled rows of a dataset (see :func:`sample_batches`).
        disable_tqdm: hide the progress bar (one step per batch, written to stderr).
        desc: the progress bar's label (default: the kind of sharpness).

    Returns a :class:`SharpnessResult` with ``value`` = mean over batches (>= 0) and ``stderr = None``.
    """
    _validate_common(rho0, batch_size, num_batches)
    _check("norm", norm in NORMS, f"one of {NORMS}", norm)
    _check("steps", isinstance(steps, int) and steps >= 1, "an integer >= 1", steps)
    if step_size is not None:
        _check("step_size", step_size > 0, "> 0 (or None for 2 * rho0 / steps)", step_size)
    step = step_size if step_size is not None else 2.0 * rho0 / steps
    loss_fn = loss_fn or cross_entropy_per_sample
    batches, pert, gen = _setup(model, data, seed, batch_size, num_batches, adaptive, collate_fn)
    per_batch: list[float] = []
    try:
        model.eval()
        with torch.enable_grad():  # the ascent needs gradients even if the caller is under no_grad
            for batch in tqdm(batches, desc=desc or f"worst-case sharpness ({norm})", disable=disable_tqdm):
                per_batch.append(_worst_case_batch(pert, batch, loss_fn, input_name, rho0, norm, steps, step, gen))
    finally:
        pert.restore()
    config = {"rho0": rho0, "norm": norm, "steps": steps, "step_size": step, "adaptive": adaptive,
              "batch_size": batch_size, "num_batches": len(batches), "seed": seed}  # fmt: skip
    return SharpnessResult(float(np.mean(per_batch)), per_batch, None, f"worst_case_{norm}", config)


def _average_case_batch(
    pert: _Perturber, batch: Mapping, loss_fn: LossFn, input_name: str,
    rho0: float, num_samples: int, gen: torch.Generator,
) -> np.ndarray:  # fmt: skip
    """Loss increases ``L_B(θ0 + ρ0 T z) − L_B(θ0)``, ``z ~ N(0, I)``, for ``num_samples`` draws: ``(num_samples,)``."""
    model = pert.model
    pert.set(None)
    base = float(_loss(model, batch, loss_fn, input_name))
    diffs = np.empty(num_samples)
    for k in range(num_samples):
        noise = [_draw(torch.randn, p, gen) * rho0 for p in pert.params]
        pert.set(noise)
        diffs[k] = float(_loss(model, batch, loss_fn, input_name)) - base
    return diffs


@dataclass(frozen=True)
class _Sampling:
    """The options `average_case_sharpness` shares with `worst_case_sharpness` (same defaults and meaning)."""

    adaptive: bool = True
    loss_fn: LossFn | None = None
    input_name: str = "pixel_values"
    batch_size: int = 5
    num_batches: int = 100
    seed: int = 0
    collate_fn: Callable | None = None
    disable_tqdm: bool = False
    desc: str | None = None


def average_case_sharpness(
    model: nn.Module, data: Any, *, rho0: float = 0.5, num_samples: int = 100, **kwargs: Any
) -> SharpnessResult:
    """Adaptive average-case sharpness, eq. (10): ``E_{ε~N(0, ρ0² T²)} L_B(θ+ε) − L_B(θ)``, by Monte Carlo.

    Args:
        model, data: as in :func:`worst_case_sharpness`.
        **kwargs: ``adaptive``, ``loss_fn``, ``input_name``, ``batch_size``, ``num_batches``, ``seed``,
            ``collate_fn``, ``disable_tqdm``, ``desc``, as in :func:`worst_case_sharpness` (an unknown name is a TypeError).
        rho0: noise scale (>= 0): ``ε = rho0 · T z``, ``z ~ N(0, I)``.
        num_samples: noise draws per batch (>= 1), one forward pass each.

    Returns a :class:`SharpnessResult`: ``value`` = mean over batches of the per-batch Monte Carlo means;
    ``stderr`` = its Monte Carlo standard error given the batches,
    ``sqrt(sum_b s_b² / num_samples) / num_batches`` with ``s_b`` the per-batch sample std (``nan`` if
    ``num_samples == 1``). The spread over batches is in ``per_batch``.
    """
    o = _Sampling(**kwargs)
    _validate_common(rho0, o.batch_size, o.num_batches)
    _check("num_samples", isinstance(num_samples, int) and num_samples >= 1, "an integer >= 1", num_samples)
    loss_fn = o.loss_fn or cross_entropy_per_sample
    batches, pert, gen = _setup(model, data, o.seed, o.batch_size, o.num_batches, o.adaptive, o.collate_fn)
    draws: list[np.ndarray] = []
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc=o.desc or "average-case sharpness", disable=o.disable_tqdm):
                draws.append(_average_case_batch(pert, batch, loss_fn, o.input_name, rho0, num_samples, gen))
    finally:
        pert.restore()
    per_batch = [float(d.mean()) for d in draws]
    if num_samples > 1:
        stderr = math.sqrt(sum(float(d.var(ddof=1)) for d in draws) / num_samples) / len(draws)
    else:
        stderr = float("nan")
    config = {"rho0": rho0, "num_samples": num_samples, "adaptive": o.adaptive,
              "batch_size": o.batch_size, "num_batches": len(batches), "seed": o.seed}  # fmt: skip
    return SharpnessResult(float(np.mean(per_batch)), per_batch, stderr, "average_case", config)


def ensemble_sharpness(
    members: Iterable[nn.Module] | Any, data: Any, *, kind: str = "worst_case", **kwargs: Any
) -> dict[str, float]:
    """Sharpness of each member and their mean, on the same batches (same ``seed``).

    Args:
        members: the member modules (a list, an ``nn.ModuleList``, or an object with a ``.members`` attribute).
        data: as in :func:`worst_case_sharpness`.
        kind: ``"worst_case"`` (:func:`worst_case_sharpness`) or ``"average_case"`` (:func:`average_case_sharpness`).
        **kwargs: passed on (rho0, norm, steps, num_samples, seed, disable_tqdm, ...). Each member is
            logged at INFO and gets a progress bar labelled with its index unless ``disable_tqdm``.

    Returns ``{"sharpness": mean over members, "sharpness_member_{i}": value_i}`` and, for
    ``average_case``, ``"sharpness_member_{i}_stderr"``.
    """
    _check("kind", kind in KINDS, f"one of {KINDS}", kind)
    members = list(getattr(members, "members", members))
    _check("members", len(members) >= 1, "a non-empty sequence of modules", members)
    fn = worst_case_sharpness if kind == "worst_case" else average_case_sharpness
    out: dict[str, float] = {}
    values = []
    for i, member in enumerate(members):
        logger.info("sharpness (%s) of member %d of %d", kind, i + 1, len(members))
        result = fn(member, data, **{"desc": f"sharpness, member {i + 1}/{len(members)}", **kwargs})
        values.append(result.value)
        out[f"sharpness_member_{i}"] = result.value
        if result.stderr is not None:
            out[f"sharpness_member_{i}_stderr"] = result.stderr
    return {"sharpness": float(np.mean(values)), **out}


__all__ = [
    "SharpnessResult",
    "average_case_sharpness",
    "ensemble_sharpness",
    "sample_batches",
    "worst_case_sharpness",
]
