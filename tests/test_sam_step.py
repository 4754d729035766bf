"""A SAM / ASAM / subset-SAM step through the real Trainer equals the formula of paper Sec. 4.3 (README "What a step does") computed by hand."""

import math

import torch
import torch.nn.functional as F
from helpers import make_args, make_trainer, mlp, vector_data
from torch.func import functional_call

from sbtrainer import EnsembleModel
from sbtrainer.sampling import member_permutation

LR, RHO = 0.1, 0.3


def _loss_and_grad(model, params, x, y):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss, dict(zip(params, grads))


def _sam_grad(model, params, x, y, rho, adaptive=False):
    """∇L(θ + ε) with ε = ρ T²g/‖Tg‖ (T = |θ| if adaptive else I), written out."""
    _, g = _loss_and_grad(model, params, x, y)
    t = {k: params[k].abs() if adaptive else torch.ones_like(params[k]) for k in params}
    norm = math.sqrt(sum(((t[k] * g[k]) ** 2).sum().item() for k in g))
    shifted = {k: params[k] + rho * t[k] ** 2 * g[k] / norm for k in params}
    return _loss_and_grad(model, shifted, x, y)[1]


def _initial(factory, seed):
    ens = EnsembleModel.from_factory(lambda _seed: factory(), 1, [seed])
    return ens.members[0], {k: v.detach().clone() for k, v in ens.members[0].named_parameters()}


def _one_step(tmp_path, method, n=8, batch=8, **kw):
    data = vector_data(n=n)
    args = make_args(tmp_path, ensemble_method=method, num_members=kw.pop("num_members", 1), rho=RHO,
                     per_device_train_batch_size=batch, max_steps=1, learning_rate=LR, **kw)
    trainer = make_trainer(args, mlp, data)
    return trainer, data


def test_sam_step_equals_formula(tmp_path):
    trainer, data = _one_step(tmp_path, "sam")
    model, theta = _initial(mlp, trainer.args.member_seeds[0])
    g = _sam_grad(model, theta, data.x, data.y, RHO)
    trainer.train()
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * g[name], atol=1e-6, rtol=0)


def test_asam_step_equals_formula(tmp_path):
    trainer, data = _one_step(tmp_path, "sam", adaptive=True)
    model, theta = _initial(mlp, trainer.args.member_seeds[0])
    g = _sam_grad(model, theta, data.x, data.y, RHO, adaptive=True)
    trainer.train()
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * g[name], atol=1e-6, rtol=0)


def test_subset_sam_step_equals_formula(tmp_path):
    """g = (|S|/|B|) ∇L_S(θ+ε_S) + (|N|/|B|) ∇L_N(θ) with S from hand-installed masks (member 1 of 2)."""
    n, batch = 12, 6
    trainer, data = _one_step(tmp_path, "sharpbalance", n=n, batch=batch, num_members=2,
                              scoring_start_epoch=50)  # masks installed by hand, no scoring within max_steps
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[1, [0, 3, 4, 7, 10]] = True
    trainer.set_sam_masks(masks)
    seed = trainer.args.member_seeds[1]
    rows = member_permutation(n, seed, 0)[:batch]
    s_rows, n_rows = rows[masks[1, rows]], rows[~masks[1, rows]]
    assert 0 < len(s_rows) < batch
    model, theta = _initial(mlp, seed)
    g_s = _sam_grad(model, theta, data.x[s_rows], data.y[s_rows], RHO)
    g_n = _loss_and_grad(model, theta, data.x[n_rows], data.y[n_rows])[1]
    trainer.train()
    for name, p in trainer.ensemble.members[1].named_parameters():
        g = len(s_rows) / batch * g_s[name] + len(n_rows) / batch * g_n[name]
        torch.testing.assert_close(p.detach(), theta[name] - LR * g, atol=1e-6, rtol=0)
    assert trainer.state.log_history[0]["member_1_sam_batch_share"] == len(s_rows) / batch


def test_sgd_step_equals_formula(tmp_path):
    trainer, data = _one_step(tmp_path, "deep_ensemble")
    model, theta = _initial(mlp, trainer.args.member_seeds[0])
    g = _loss_and_grad(model, theta, data.x, data.y)[1]
    trainer.train()
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * g[name], atol=1e-6, rtol=0)
