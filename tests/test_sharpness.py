"""Tests for sbtrainer.sharpness: closed forms on linear models, restoration, reproducibility, validation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sbtrainer.sharpness import (
    SharpnessResult,
    average_case_sharpness,
    ensemble_sharpness,
    sample_batches,
    worst_case_sharpness,
)

RHO0 = 0.5


class DictDataset(torch.utils.data.Dataset):
    """Examples ``{"pixel_values": x[i], label_key: y[i]}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, label_key: str = "labels"):
        self.x, self.y, self.label_key = x, y, label_key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        y = self.y[i].item() if self.label_key == "label" else self.y[i]
        return {"pixel_values": self.x[i], self.label_key: y}


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½ (f(x) − y)², mean over the batch; ``out (B, 1)``, ``y (B,)``."""
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def linear_problem(d: int = 10, n: int = 1, seed: int = 0):
    """A float64 linear model f(x) = w·x (no bias) and ``n`` samples; returns (model, w, x (n, d), y (n,))."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model, w, x, y


def ball_points(d: int, norm: str, k: int = 64, seed: int = 1) -> torch.Tensor:
    """``k`` random points δ ``(k, d)`` of the ball ‖δ‖_p ≤ ρ0 (uniform for ℓ2 and ℓ∞)."""
    gen = torch.Generator().manual_seed(seed)
    if norm == "linf":
        return (torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 - 1) * RHO0
    u = torch.randn(k, d, generator=gen, dtype=torch.float64)
    radius = RHO0 * torch.rand(k, 1, generator=gen, dtype=torch.float64) ** (1 / d)
    return u / u.norm(dim=1, keepdim=True) * radius


# --------------------------------------------------------------------------- worst case: closed forms


@pytest.mark.parametrize(("norm", "adaptive"), [("l2", True), ("l2", False), ("linf", True)])
def test_worst_case_linear_model_matches_closed_form(norm, adaptive):
    # L(w + ε) − L(w) = ½(r + ε·x)² − ½r² with ε = Tδ: the maximum over ‖δ‖_p ≤ ρ0 puts δ along
    # sign(r)·Tx (ℓ2) or sign(r)·sign(Tx)·ρ0 (ℓ∞): (|r| + ρ0‖Tx‖_q)²/2 − r²/2, q = 2 or 1.
    model, w, x, y = linear_problem()
    x0 = x[0]
    r = float(w @ x0 - y[0])
    tx = (w.abs() if adaptive else torch.ones_like(w)) * x0
    dual = float(tx.norm(p=2 if norm == "l2" else 1))
    expected = (abs(r) + RHO0 * dual) ** 2 / 2 - r**2 / 2

    res = worst_case_sharpness(model, DictDataset(x, y), norm=norm, adaptive=adaptive, loss_fn=sq_loss,
                               batch_size=1, num_batches=1, disable_tqdm=True)  # fmt: skip
    assert isinstance(res, SharpnessResult) and res.stderr is None
    assert res.kind == f"worst_case_{norm}" and res.per_batch == [res.value]
    assert abs(res.value - expected) <= 0.02 * expected
    assert res.value <= expected * (1 + 1e-9)  # a point of the ball never beats the maximum

    deltas = ball_points(len(w), norm)
    increases = 0.5 * (r + (deltas * (tx / x0)) @ x0) ** 2 - 0.5 * r**2  # ε = Tδ
    assert res.value >= float(increases.max())


def test_worst_case_averages_over_batches():
    # 3 samples, batches of 1: the value is the mean of the three closed forms.
    model, w, x, y = linear_problem(d=6, n=3, seed=3)
    r = x @ w - y
    expected = ((r.abs() + RHO0 * (w.abs() * x).norm(dim=1)) ** 2 / 2 - r**2 / 2).mean()
    res = worst_case_sharpness(model, DictDataset(x, y), loss_fn=sq_loss, batch_size=1, num_batches=3,
                               disable_tqdm=True)  # fmt: skip
    assert len(res.per_batch) == 3
    assert res.value == pytest.approx(float(np.mean(res.per_batch)), abs=1e-15)
    assert abs(res.value - float(expected)) <= 0.02 * float(expected)


def test_rho0_zero_gives_zero():
    model, _, x, y = linear_problem()
    res = worst_case_sharpness(model, DictDataset(x, y), rho0=0.0, loss_fn=sq_loss, batch_size=1, num_batches=1,
                               disable_tqdm=True)  # fmt: skip
    assert res.value == 0.0


def test_adaptive_sharpness_is_invariant_to_relu_rescaling():
    # Scaling layer 1 (weight, bias) by 4 and layer 2's weight by 1/4 keeps f; with T = |θ| the loss as a
    # function of δ is the same, so adaptive sharpness is unchanged; plain (T = I) sharpness changes.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    scaled = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    scaled.load_state_dict(net.state_dict())
    with torch.no_grad():
        scaled[0].weight.mul_(4), scaled[0].bias.mul_(4), scaled[2].weight.div_(4)
    gen = torch.Generator().manual_seed(0)
    data = DictDataset(torch.randn(20, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen))
    kw = {"rho0": 0.3, "steps": 5, "batch_size": 5, "num_batches": 2, "disable_tqdm": True}
    a, b = worst_case_sharpness(net, data, **kw), worst_case_sharpness(scaled, data, **kw)
    assert a.value > 0 and b.value == pytest.approx(a.value, rel=1e-9)
    plain_a = worst_case_sharpness(net, data, adaptive=False, **kw)
    plain_b = worst_case_sharpness(scaled, data, adaptive=False, **kw)
    assert abs(plain_a.value - plain_b.value) > 0.05 * plain_a.value


# --------------------------------------------------------------------------- average case: closed form


@pytest.mark.parametrize("adaptive", [True, False])
def test_average_case_linear_model_matches_closed_form(adaptive):
    # L(w + ε) − L(w) = mean_i [r_i ε·x_i + ½(ε·x_i)²]; with ε ~ N(0, ρ0² T²) the expectation is
    # ½ρ0² mean_i Σ_j T_j² x_ij² = ρ0² tr(T H T)/2, H = mean_i x_i x_iᵀ.
    model, w, x, y = linear_problem(d=5, n=8, seed=2)
    t = w.abs() if adaptive else torch.ones_like(w)
    h = x.T @ x / len(x)
    expected = float(RHO0**2 * torch.trace(torch.diag(t) @ h @ torch.diag(t)) / 2)
    res = average_case_sharpness(model, DictDataset(x, y), adaptive=adaptive, num_samples=2000, loss_fn=sq_loss,
                                 batch_size=8, num_batches=1, disable_tqdm=True)  # fmt: skip
    assert res.kind == "average_case" and res.config["num_samples"] == 2000
    assert 0 < res.stderr < 0.1 * expected
    assert abs(res.value - expected) < 3 * res.stderr


def test_average_case_stderr_over_batches():
    # stderr = sqrt(sum_b s_b² / S) / B: with B = 2 batches it is below either batch's own s_b/sqrt(S).
    model, _, x, y = linear_problem(d=5, n=8, seed=2)
    res = average_case_sharpness(model, DictDataset(x, y), num_samples=50, loss_fn=sq_loss, batch_size=4,
                                 num_batches=2, disable_tqdm=True)  # fmt: skip
    assert len(res.per_batch) == 2 and res.value == pytest.approx(sum(res.per_batch) / 2, abs=1e-15)
    assert math.isfinite(res.stderr) and res.stderr > 0


# --------------------------------------------------------------------------- restoration, reproducibility


def bn_net() -> tuple[nn.Module, DictDataset]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 4) * 2 + 1)
    gen = torch.Generator().manual_seed(1)
    data = DictDataset(torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,), generator=gen), "label")
    return net, data


CALLS = {
    "worst_l2": lambda m, d, s: worst_case_sharpness(m, d, steps=3, batch_size=5, num_batches=3, seed=s,
                                                     disable_tqdm=True),
    "worst_linf": lambda m, d, s: worst_case_sharpness(m, d, norm="linf", steps=3, batch_size=5, num_batches=3,
                                                       seed=s, disable_tqdm=True),
    "average": lambda m, d, s: average_case_sharpness(m, d, num_samples=4, batch_size=5, num_batches=3, seed=s,
                                                      disable_tqdm=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CALLS))
def test_weights_buffers_mode_grad_and_rng_untouched(name):
    net, data = bn_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bn_modes = []
    net[1].register_forward_pre_hook(lambda mod, _inp: bn_modes.append(mod.training))
    rng = torch.get_rng_state()
    res = CALLS[name](net, data, 0)
    assert res.value > 0 and bn_modes and not any(bn_modes)  # BatchNorm ran in eval mode
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and all(p.grad is None for p in net.parameters())
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # bitwise: weights and running stats
    # same seed, same value; another seed, another value
    again = CALLS[name](net, data, 0)
    assert again.value == res.value and again.per_batch == res.per_batch
    assert CALLS[name](net, data, 1).value != res.value


def test_hf_model_and_iterable_of_batches():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16, num_labels=3)  # fmt: skip
    model = AlbertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 30, (4, 6), generator=gen), "attention_mask": torch.ones(4, 6, dtype=torch.long),
         "labels": torch.randint(0, 3, (4,), generator=gen)}
        for _ in range(3)
    ]  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = worst_case_sharpness(model, batches, steps=3, num_batches=2, disable_tqdm=True)
    assert len(res.per_batch) == 2 and res.value > 0 and math.isfinite(res.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    avg = average_case_sharpness(model, batches, num_samples=3, num_batches=2, disable_tqdm=True)
    assert math.isfinite(avg.value)


# --------------------------------------------------------------------------- batching and ensembles


def test_sample_batches_without_replacement_and_seeded():
    data = DictDataset(torch.arange(20.0)[:, None], torch.arange(20))
    batches = sample_batches(data, batch_size=3, num_batches=4, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([b["labels"] for b in batches]).tolist()
    assert [len(b["labels"]) for b in batches] == [3, 3, 3, 3] and len(set(rows)) == 12
    assert all(torch.equal(b["pixel_values"][:, 0], b["labels"].float()) for b in batches)
    same = sample_batches(data, batch_size=3, num_batches=4, generator=torch.Generator().manual_seed(0))
    assert rows == torch.cat([b["labels"] for b in same]).tolist()
    # fewer rows than asked: all rows, last batch short
    small = sample_batches(data, batch_size=8, num_batches=5, generator=torch.Generator().manual_seed(0))
    assert [len(b["labels"]) for b in small] == [8, 8, 4]
    assert sorted(torch.cat([b["labels"] for b in small]).tolist()) == list(range(20))
    # an iterable of batches: the first num_batches, as given
    assert sample_batches(iter(batches), num_batches=2) == batches[:2]


def test_ensemble_sharpness_mean_over_members():
    # Two linear members with different weights on one shared sample: each member's value is its own
    # closed form (as in test_worst_case_linear_model_matches_closed_form); "sharpness" is their mean.
    members = [linear_problem(seed=seed)[0] for seed in (0, 1)]
    data = DictDataset(torch.randn(1, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    x0, y0 = data.x[0], 0.0
    expected = []
    for m in members:
        w = m.weight.detach()[0]
        r = float(w @ x0 - y0)
        expected.append((abs(r) + RHO0 * float((w.abs() * x0).norm())) ** 2 / 2 - r**2 / 2)
    out = ensemble_sharpness(nn.ModuleList(members), data, loss_fn=sq_loss, batch_size=1, num_batches=1,
                             disable_tqdm=True)  # fmt: skip
    assert set(out) == {"sharpness", "sharpness_member_0", "sharpness_member_1"}
    for i, e in enumerate(expected):
        assert abs(out[f"sharpness_member_{i}"] - e) <= 0.02 * e
    assert out["sharpness"] == pytest.approx((out["sharpness_member_0"] + out["sharpness_member_1"]) / 2)
    avg = ensemble_sharpness(members, data, kind="average_case", num_samples=10, loss_fn=sq_loss, batch_size=1,
                             num_batches=1, disable_tqdm=True)  # fmt: skip
    assert "sharpness_member_1_stderr" in avg and avg["sharpness"] > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho0": -0.1}, r"rho0 must be a finite number >= 0; got -0.1"),
        ({"steps": 0}, r"steps must be an integer >= 1; got 0"),
        ({"norm": "l1"}, r"norm must be one of \('l2', 'linf'\); got 'l1'"),
        ({"batch_size": 0}, r"batch_size must be .*got 0"),
        ({"num_batches": 0}, r"num_batches must be .*got 0"),
        ({"step_size": -1.0}, r"step_size must be > 0"),
    ],
)
def test_worst_case_bad_input(kwargs, match):
    model, _, x, y = linear_problem()
    with pytest.raises(ValueError, match=match):
        worst_case_sharpness(model, DictDataset(x, y), loss_fn=sq_loss, disable_tqdm=True, **kwargs)


def test_other_bad_input():
    model, _, x, y = linear_problem()
    data = DictDataset(x, y)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1; got 0"):
        average_case_sharpness(model, data, num_samples=0, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"rho0 must be .*got -1"):
        average_case_sharpness(model, data, rho0=-1, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"kind must be one of .*'best'"):
        ensemble_sharpness([model], data, kind="best")
    with pytest.raises(ValueError, match=r"label column"):
        worst_case_sharpness(model, [{"pixel_values": x}], loss_fn=sq_loss, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"at least one example"):
        worst_case_sharpness(model, [], loss_fn=sq_loss, disable_tqdm=True)
