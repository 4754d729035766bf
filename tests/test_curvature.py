"""`sbtrainer.curvature`: the input-space loss curvature against closed forms, Spearman on hand data, the Fig. 14 plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sbtrainer.curvature import (
    input_curvature,
    input_curvature_dataset,
    plot_curvature_vs_sharpness,
    rank_correlation,
)


def _half_square(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ``0.5 * ||logits||^2`` (labels unused): with logits ``= diag(sqrt d) x`` the input Hessian is diag(d)."""
    return 0.5 * logits.pow(2).sum(1)


def _ce64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy in float64 (the default loss computes in float32: too coarse for a 1e-5 step)."""
    return F.cross_entropy(logits, labels, reduction="none")


def _diag_model(d: torch.Tensor) -> nn.Module:
    lin = nn.Linear(d.numel(), d.numel(), bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.diag(d.sqrt()))
    return lin


def test_quadratic_loss_rademacher_equals_the_norm_of_the_hessian_diagonal():
    """l(x) = ½ Σ d_i x_i²: H = diag(d), and ||H v|| = ||d|| for EVERY ±1 vector v, so the drawn directions do not
    matter; the forward difference of a quadratic is exact (float64: 1e-9 relative)."""
    d = torch.tensor([0.5, 2.0, 3.0, 0.25, 1.5], dtype=torch.float64)
    batch = {"x": torch.randn(4, 5, dtype=torch.float64), "labels": torch.zeros(4, dtype=torch.long)}
    got = input_curvature(_diag_model(d), batch, input_name="x", loss_fn=_half_square, num_directions=7, seed=3)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((4,), d.norm().item(), dtype=torch.float32), rtol=1e-6, atol=0)


def _softmax_hessian(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Input Hessian of cross-entropy of logits W x + b: H = Wᵀ (diag p − p pᵀ) W, per sample ``(B, D, D)``."""
    p = torch.softmax(x @ w.T + b, dim=1)
    mid = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return w.T.unsqueeze(0) @ mid @ w.unsqueeze(0)


@pytest.fixture
def softmax_case():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 4).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=gen, dtype=torch.float64))
        lin.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 3])
    return lin, {"pixel_values": x, "labels": labels}, _softmax_hessian(lin.weight.detach(), lin.bias.detach(), x)


def test_cross_entropy_linear_model_given_directions(softmax_case):
    """Softmax regression: mean_k ||H_x v_k|| of the closed-form Hessian, within the forward difference's O(h) error
    (h = 1e-5: relative error below 1e-4); with h = 1e-2 the error is visible, and 1000 times larger."""
    model, batch, hess = softmax_case
    v = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.stack([(hess @ v[k].unsqueeze(2)).squeeze(2).norm(dim=1) for k in range(3)]).mean(0)
    fine = input_curvature(model, batch, h=1e-5, directions=v, loss_fn=_ce64).double()
    coarse = input_curvature(model, batch, h=1e-2, directions=v, loss_fn=_ce64).double()
    err_fine = ((fine - expected).abs() / expected).max().item()
    err_coarse = ((coarse - expected).abs() / expected).max().item()
    assert err_fine < 1e-4
    assert 1e-4 < err_coarse < 1e-1 and err_coarse > 100 * err_fine


def test_cross_entropy_linear_model_gradient_direction(softmax_case):
    """``direction="gradient"``: ||H ĝ|| with ĝ = Wᵀ(p − onehot) / ||·||, the unit input-gradient direction."""
    model, batch, hess = softmax_case
    w, b, x = model.weight.detach(), model.bias.detach(), batch["pixel_values"]
    p = torch.softmax(x @ w.T + b, dim=1)
    g = (p - torch.nn.functional.one_hot(batch["labels"], 4).double()) @ w
    unit = g / g.norm(dim=1, keepdim=True)
    expected = (hess @ unit.unsqueeze(2)).squeeze(2).norm(dim=1)
    got = input_curvature(model, batch, h=1e-5, direction="gradient", loss_fn=_ce64).double()
    assert ((got - expected).abs() / expected).max().item() < 1e-4


def test_rademacher_directions_are_seeded_signs_and_the_dataset_version_matches(softmax_case):
    """The default draw is ``K`` sign tensors from a CPU generator seeded with ``seed``: passing those signs as
    ``directions`` gives the same numbers; the dataset version (one generator through the batches) equals the
    batch version when the rows fit one batch."""
    model, batch, _ = softmax_case
    signs = 2 * torch.randint(0, 2, (4, 5, 6), generator=torch.Generator().manual_seed(11)) - 1
    drawn = input_curvature(model, batch, num_directions=4, seed=11)
    given = input_curvature(model, batch, directions=signs.double())
    assert torch.equal(drawn, given)
    assert not torch.equal(drawn, input_curvature(model, batch, num_directions=4, seed=12))
    rows = [{"pixel_values": batch["pixel_values"][i], "labels": batch["labels"][i]} for i in range(5)]
    whole = input_curvature_dataset(model, rows, batch_size=8, num_directions=4, seed=11)
    assert torch.equal(whole, drawn)
    picked = input_curvature_dataset(model, rows, rows=[1, 3], batch_size=8, directions=signs[:, [1, 3]].double())
    torch.testing.assert_close(picked, given[[1, 3]], rtol=1e-12, atol=0)


def test_model_state_is_left_alone():
    """Eval mode inside (BatchNorm running statistics: rows independent), train mode, buffers and .grad restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 16, 3)).double().train()
    model[1].running_mean.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"pixel_values": torch.randn(3, 3, 4, 4, dtype=torch.float64), "labels": torch.tensor([0, 1, 2])}
    together = input_curvature(model, batch, directions=torch.ones(1, 3, 3, 4, 4), loss_fn=_ce64)
    alone = torch.cat([input_curvature(model, {"pixel_values": batch["pixel_values"][i:i + 1],
                                               "labels": batch["labels"][i:i + 1]},
                                       directions=torch.ones(1, 1, 3, 4, 4), loss_fn=_ce64) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=0)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "field"), [({"h": 0.0}, "h"), ({"h": float("nan")}, "h"),
                                                ({"num_directions": 0}, "num_directions"),
                                                ({"direction": "gaussian"}, "direction")])
def test_bad_settings_are_refused(softmax_case, kwargs, field):
    model, batch, _ = softmax_case
    with pytest.raises(ValueError, match=f"input_curvature: {field} must"):
        input_curvature(model, batch, **kwargs)


def test_integer_inputs_and_wrong_shapes_are_refused(softmax_case):
    model, batch, _ = softmax_case
    with pytest.raises(ValueError, match="pixel_values must be a floating-point tensor"):
        input_curvature(model, {"pixel_values": torch.ones(2, 6, dtype=torch.long), "labels": torch.zeros(2).long()})
    with pytest.raises(ValueError, match=r"directions must have shape \(K, \*\(5, 6\)\)"):
        input_curvature(model, batch, directions=torch.ones(2, 5, 7))
    with pytest.raises(ValueError, match="loss_fn must return the per-sample loss"):
        input_curvature(model, batch, loss_fn=lambda logits, y: logits.sum())


def test_spearman_on_hand_data_with_ties():
    """a = [1, 2, 2, 3] ranks [1, 2.5, 2.5, 4]; b = [10, 30, 20, 40] ranks [1, 3, 2, 4]: Pearson of the ranks is
    4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)."""
    assert rank_correlation([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert rank_correlation(torch.tensor([3.0, 1.0, 2.0]), np.array([0.1, 0.9, 0.5])) == pytest.approx(-1.0, abs=1e-12)
    # monotone transforms do not change ranks
    x = np.array([0.3, 5.0, 1.2, 1.2, 9.0, 0.0])
    assert rank_correlation(x, np.exp(x)) == pytest.approx(1.0, abs=1e-12)


def test_spearman_refusals_and_constant_input():
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="same length >= 2"):
        rank_correlation([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="must be finite"):
        rank_correlation([1.0, float("nan")], [1.0, 2.0])


def test_plot_has_labelled_axes_and_the_correlation(tmp_path):
    curv = np.array([0.1, 0.5, 0.3, 2.0, 1.1])
    sharp = np.array([10.0, 40.0, 35.0, 300.0, 20.0])
    path = plot_curvature_vs_sharpness(curv, sharp, tmp_path / "fig" / "curvature.png", title="member 0")
    image = Image.open(path)
    assert image.size == (500, 400)
    (axes,) = json.loads(image.text["Axes"])
    assert axes["xlabel"].startswith("Loss curvature around the input")
    assert axes["ylabel"].startswith("Sharpness (Fisher trace")
    assert axes["title"] == "member 0"
    assert axes["legend"] == [f"Spearman ρ = {rank_correlation(curv, sharp):.2f} (N = 5)"] == ["Spearman ρ = 0.70 (N = 5)"]
