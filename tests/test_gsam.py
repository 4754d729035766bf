"""GSAM (Zhuang et al., ICLR 2022) in `subset_sam_step` and through the Trainer equals its formula computed by hand.

With g = ∇L_S(θ), ε = ρ g/‖g‖ (ASAM: ρ T²g/‖Tg‖, T = |θ|), g_p = ∇L_S(θ+ε) and
g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p, the step's gradient is (|S|/|B|)(g_p − α g_⊥) + (|N|/|B|) ∇L_N(θ).
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_args, make_trainer, mlp, vector_data
from torch.func import functional_call

from sbtrainer import config as config_module
from sbtrainer.sam import gsam_descent_, subset_sam_step
from sbtrainer.sampling import member_permutation

RHO, ALPHA = 0.3, 0.4


# -- the hand formula ---------------------------------------------------------------------------------
def _grads(model, params, x, y):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _dot(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


def _gsam_grads(model, params, x, y, rho, alpha, adaptive=False):
    """(d, g_p): d = g_p − α (g − ⟨g,g_p⟩/‖g_p‖² g_p), every quantity written out with autograd."""
    g = _grads(model, params, x, y)
    t = {k: params[k].abs() if adaptive else torch.ones_like(params[k]) for k in params}
    norm = math.sqrt(sum(float(((t[k] * g[k]) ** 2).sum()) for k in g))
    g_p = _grads(model, {k: params[k] + rho * t[k] ** 2 * g[k] / norm for k in params}, x, y)
    coef = _dot(g, g_p) / _dot(g_p, g_p)
    return {k: g_p[k] - alpha * (g[k] - coef * g_p[k]) for k in g}, g_p


def _member(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return mlp().to(dtype)


def _data(n=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 5, generator=g).to(dtype), "labels": torch.randint(0, 3, (n,), generator=g)}


def _loss_of(member):
    return lambda batch, rows: F.cross_entropy(member(batch["pixel_values"]), batch["labels"])


def _theta(member):
    return {k: v.detach().clone() for k, v in member.named_parameters()}


# -- the bare step (float64) -------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_step_equals_the_formula(adaptive):
    """S = B: .grad = d = g_p − α g_⊥ (1e-6); with ASAM the ε is ASAM's and g_⊥ uses the plain g."""
    member, batch = _member(), _data()
    theta = _theta(member)
    subset_sam_step(member, _loss_of(member), batch, torch.ones(6, dtype=torch.bool), RHO, row_weight=1 / 6,
                    adaptive=adaptive, variant="gsam", gsam_alpha=ALPHA)
    d, g_p = _gsam_grads(member, theta, batch["pixel_values"], batch["labels"], RHO, ALPHA, adaptive)
    for name, p in member.named_parameters():
        torch.testing.assert_close(p.grad, d[name], atol=1e-6, rtol=0)
        assert torch.equal(p.detach(), theta[name])  # weights restored bitwise
    # the correction is not negligible here (so the test can tell GSAM from SAM) ...
    assert max(float((d[k] - g_p[k]).abs().max()) for k in d) > 1e-3
    # ... and it is orthogonal to g_p: ⟨d, g_p⟩ = ‖g_p‖² (GSAM leaves the perturbed loss's descent unchanged)
    assert _dot(d, g_p) == pytest.approx(_dot(g_p, g_p), rel=1e-10)


def test_sharpbalance_mix_equals_the_formula():
    """S a strict subset: .grad = (|S|/|B|) d_S + (|N|/|B|) ∇L_N(θ), g, ε, g_p those of L_S; row_weight 1/|B|."""
    member, batch = _member(), _data()
    mask = torch.tensor([True, False, True, True, False, False])
    theta = _theta(member)
    subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 6, variant="gsam", gsam_alpha=ALPHA)
    x, y = batch["pixel_values"], batch["labels"]
    d_s, _ = _gsam_grads(member, theta, x[mask], y[mask], RHO, ALPHA)
    g_n = _grads(member, theta, x[~mask], y[~mask])
    for name, p in member.named_parameters():
        torch.testing.assert_close(p.grad, 3 / 6 * d_s[name] + 3 / 6 * g_n[name], atol=1e-6, rtol=0)


def test_accumulated_grad_and_a_window_row_weight():
    """Accumulated .grad is kept apart; row_weight 1/12 (a 12-row window) weighs d_S by |S|/12."""
    member, batch = _member(), _data()
    for p in member.parameters():
        p.grad = torch.full_like(p, 0.25)
    mask = torch.tensor([True, True, False, False, True, False])
    theta = _theta(member)
    subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 12, variant="gsam", gsam_alpha=ALPHA)
    x, y = batch["pixel_values"], batch["labels"]
    d_s, _ = _gsam_grads(member, theta, x[mask], y[mask], RHO, ALPHA)
    g_n = _grads(member, theta, x[~mask], y[~mask])
    for name, p in member.named_parameters():
        torch.testing.assert_close(p.grad, 0.25 + 3 / 12 * d_s[name] + 3 / 12 * g_n[name], atol=1e-6, rtol=0)


def test_loss_scale_seam():
    """A loss scale in `backward` scales g and g_p alike: the GSAM gradient is the unscaled one times the scale."""
    mask = torch.tensor([True, False, True, True, False, True])
    ref, scaled = _member(), _member()
    batch = _data()
    subset_sam_step(ref, _loss_of(ref), batch, mask, RHO, row_weight=1 / 6, variant="gsam", gsam_alpha=ALPHA)
    subset_sam_step(scaled, _loss_of(scaled), batch, mask, RHO, row_weight=1 / 6, variant="gsam", gsam_alpha=ALPHA,
                    backward=lambda loss: (loss * 1024.0).backward(), unscale=lambda v: v / 1024.0)
    for a, b in zip(ref.parameters(), scaled.parameters()):
        torch.testing.assert_close(b.grad / 1024.0, a.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_alpha_zero_is_sam_bitwise_after_an_optimizer_step(adaptive):
    """variant='gsam' with α = 0 and variant='sam': bitwise equal weights after two SGD-momentum steps (float32)."""
    batch = _data(dtype=torch.float32)
    mask = torch.tensor([True, False, True, True, False, True])
    weights = []
    for variant in ("sam", "gsam"):
        member = _member(dtype=torch.float32)
        opt = torch.optim.SGD(member.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            opt.zero_grad()
            subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 6, adaptive=adaptive,
                            variant=variant, gsam_alpha=0.0)
            opt.step()
        weights.append([p.detach().clone() for p in member.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    gsam = _member(dtype=torch.float32)
    subset_sam_step(gsam, _loss_of(gsam), batch, mask, RHO, row_weight=1 / 6, variant="gsam", gsam_alpha=ALPHA)
    sam = _member(dtype=torch.float32)
    subset_sam_step(sam, _loss_of(sam), batch, mask, RHO, row_weight=1 / 6, variant="sam", gsam_alpha=ALPHA)
    assert not all(torch.equal(a.grad, b.grad) for a, b in zip(gsam.parameters(), sam.parameters()))


def test_bad_variant_or_alpha_is_refused():
    member, batch = _member(), _data()
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"variant.*'asam'"):
        subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 6, variant="asam")
    with pytest.raises(ValueError, match=r"gsam_alpha.*-0\.1"):
        subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 6, variant="gsam",
                        gsam_alpha=-0.1)


# -- gsam_descent_ on vectors: the numbers and the guards ------------------------------------------------
def test_gsam_descent_on_two_vectors():
    """g = (1, 0), g_p = (1, 1): ⟨g,g_p⟩/‖g_p‖² = 1/2, g_⊥ = (1/2, −1/2), d = g_p − α g_⊥ = (1 − α/2, 1 + α/2)."""
    descent = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    applied = gsam_descent_(descent, [torch.tensor([1.0, 0.0], dtype=torch.float64)], 0.5)
    assert bool(applied)
    assert descent[0].tolist() == [0.75, 1.25]


@pytest.mark.parametrize("case", ["g_p zero", "g nan", "g_p inf", "ok false", "alpha zero"])
def test_gsam_descent_guards_leave_g_p_bitwise(case):
    g_p = torch.tensor([0.3, -1.7, 2.0])
    g = torch.tensor([1.0, 2.0, -0.5])
    ok = None
    alpha = 0.7
    if case == "g_p zero":
        g_p = torch.zeros(3)
    elif case == "g nan":
        g = torch.tensor([1.0, float("nan"), 0.0])
    elif case == "g_p inf":
        g_p = torch.tensor([float("inf"), 1.0, 0.0])
    elif case == "ok false":
        ok = torch.tensor(False)
    else:
        alpha = 0.0
    before = g_p.clone()
    descent = [g_p]
    applied = gsam_descent_(descent, [g], alpha, ok)
    assert not bool(applied)
    assert torch.equal(descent[0], before)  # inf == inf: a non-finite g_p stays visible to a scaler


# -- the config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(sam_variant="asam"), "sam_variant"),
        (dict(gsam_alpha=-0.01), "gsam_alpha"),
        (dict(gsam_alpha=float("nan")), "gsam_alpha"),
        (dict(gsam_alpha=float("inf")), "gsam_alpha"),
        (dict(ensemble_method="deep_ensemble", sam_variant="gsam"), "sam_variant"),
        (dict(moving_average_start_step=-1), "moving_average_start_step"),
        (dict(moving_average_start_step=1.5), "moving_average_start_step"),
        (dict(max_steps=5, moving_average_start_step=6), "moving_average_start_step"),
    ],
)
def test_invalid_value_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field) as err:
        make_args(tmp_path, **{"num_train_epochs": 2, **overrides})
    assert "got" in str(err.value)


def test_defaults_and_command_line(tmp_path):
    from transformers import HfArgumentParser

    from sbtrainer import SharpBalanceConfig

    args = make_args(tmp_path)
    assert args.sam_variant == "sam" and args.gsam_alpha == 0.01 and args.moving_average_start_step is None
    assert make_args(tmp_path, max_steps=5, moving_average_start_step=5).moving_average_start_step == 5
    (parsed,) = HfArgumentParser(SharpBalanceConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_variant", "gsam", "--gsam_alpha", "0.2", "--adaptive", "true",
         "--moving_average_start_step", "3", "--report_to", "none"])
    assert parsed.sam_variant == "gsam" and parsed.gsam_alpha == 0.2 and parsed.adaptive
    assert parsed.moving_average_start_step == 3


def test_unread_or_limit_values_are_warned(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(config_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sbtrainer.config"):
        make_args(tmp_path, ensemble_method="sam", gsam_alpha=0.3)
        make_args(tmp_path, ensemble_method="sam", sam_variant="gsam", gsam_alpha=0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "SharpBalanceConfig.gsam_alpha=0.3 is read only with sam_variant='gsam'; it has no effect with "
        "sam_variant='sam'.",
        "SharpBalanceConfig.gsam_alpha=0.0 with sam_variant='gsam': the GSAM correction is zero, i.e. this run is "
        "sam_variant='sam' (exactly).",
    ]


# -- through the Trainer --------------------------------------------------------------------------------
LR, N, BATCH = 0.1, 8, 4


def _run(tmp_path, method, masks=None, **kw):
    args = make_args(tmp_path, ensemble_method=method, num_members=2, rho=RHO, per_device_train_batch_size=BATCH,
                     max_steps=2, learning_rate=LR, scoring_start_epoch=50, **kw)
    trainer = make_trainer(args, mlp, vector_data(n=N))
    if masks is not None:
        trainer.set_sam_masks(masks)
    trainer.train()
    return trainer


def _masks():
    masks = torch.zeros(2, N, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[1, [0, 3, 4, 7]] = True
    return masks


@pytest.mark.parametrize("method", ["sam", "sharpbalance"])
def test_two_trainer_steps_equal_the_hand_formula(tmp_path, method):
    """Two SGD steps of every member through the real Trainer equal θ ← θ − lr · [(|S|/|B|) d_S + (|N|/|B|) ∇L_N]."""
    masks = _masks() if method == "sharpbalance" else torch.ones(2, N, dtype=torch.bool)
    trainer = _run(tmp_path, method, masks=masks if method == "sharpbalance" else None, sam_variant="gsam",
                   gsam_alpha=ALPHA)
    data = vector_data(n=N)
    for i, seed in enumerate(trainer.args.member_seeds):
        torch.manual_seed(seed)
        model = mlp()
        theta = _theta(model)
        order = member_permutation(N, seed, 0)
        for step in range(2):
            rows = order[step * BATCH:(step + 1) * BATCH]
            s_rows, n_rows = rows[masks[i, rows]], rows[~masks[i, rows]]
            grad = {k: torch.zeros_like(v) for k, v in theta.items()}
            if len(s_rows):
                d_s, _ = _gsam_grads(model, theta, data.x[s_rows], data.y[s_rows], RHO, ALPHA)
                grad = {k: grad[k] + len(s_rows) / BATCH * d_s[k] for k in grad}
            if len(n_rows):
                g_n = _grads(model, theta, data.x[n_rows], data.y[n_rows])
                grad = {k: grad[k] + len(n_rows) / BATCH * g_n[k] for k in grad}
            theta = {k: theta[k] - LR * grad[k] for k in theta}
        for name, p in trainer.ensemble.members[i].named_parameters():
            torch.testing.assert_close(p.detach(), theta[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["sam", "sharpbalance"])
def test_trainer_alpha_zero_is_sam_bitwise_and_alpha_positive_differs(tmp_path, method):
    masks = _masks() if method == "sharpbalance" else None
    runs = {name: _run(tmp_path / name, method, masks=masks, **kw) for name, kw in (
        ("sam", dict(sam_variant="sam")), ("gsam0", dict(sam_variant="gsam", gsam_alpha=0.0)),
        ("gsam", dict(sam_variant="gsam", gsam_alpha=ALPHA)))}
    weights = {name: [p.detach() for p in t.ensemble.parameters()] for name, t in runs.items()}
    assert all(torch.equal(a, b) for a, b in zip(weights["sam"], weights["gsam0"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights["sam"], weights["gsam"]))


def test_deep_ensemble_refuses_gsam_and_ignores_alpha(tmp_path):
    """'Deep Ensemble + GSAM' is ensemble_method='sam' with GSAM; gsam_alpha alone leaves a deep ensemble as it is."""
    with pytest.raises(ValueError, match=r"sam_variant.*ensemble_method='sam'"):
        make_args(tmp_path, ensemble_method="deep_ensemble", sam_variant="gsam")
    plain = _run(tmp_path / "a", "deep_ensemble")
    with_alpha = _run(tmp_path / "b", "deep_ensemble", gsam_alpha=ALPHA)
    assert all(torch.equal(a, b) for a, b in zip(plain.ensemble.parameters(), with_alpha.ensemble.parameters()))
