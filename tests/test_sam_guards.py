"""SAM safety rules: BatchNorm stats untouched by the perturbed pass, bitwise restore, NaN ascent skipped, tiny S."""

import torch
from helpers import image_data, make_args, make_trainer, small_cnn, vector_data
from torch import nn

import sbtrainer.sam as sam_module
from sbtrainer.sam import frozen_norm_stats, perturbed, sam_epsilon
from sbtrainer.sampling import member_permutation


def test_sam_epsilon_matches_definition_and_guards():
    p = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    eps, norm, ok = sam_epsilon(p, g, rho=0.5)
    assert ok and norm.item() == 5.0
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(eps[1], torch.tensor([[0.4]]))
    eps, norm, _ = sam_epsilon(p, g, rho=0.5, adaptive=True)  # T g = (3, 0, 12), ‖T g‖ = sqrt(153)
    torch.testing.assert_close(norm, torch.tensor(153.0).sqrt())
    torch.testing.assert_close(eps[0], 0.5 * torch.tensor([3.0, 0.0]) / 153**0.5)
    torch.testing.assert_close(eps[1], 0.5 * torch.tensor([[36.0]]) / 153**0.5)
    for bad in (float("nan"), float("inf")):
        eps, _, ok = sam_epsilon(p, [torch.tensor([bad, 1.0]), torch.tensor([[1.0]])], rho=0.5)
        assert not ok and all(torch.equal(e, torch.zeros_like(e)) for e in eps)
    eps, _, ok = sam_epsilon(p, [torch.zeros(2), torch.zeros(1, 1)], rho=0.5)  # zero gradient: no step
    assert not ok and all(not e.any() for e in eps)
    eps, _, _ = sam_epsilon(p, g, rho=0.0)
    assert all(not e.any() for e in eps)


def test_perturbed_restores_bitwise_and_frozen_norm_stats_keeps_buffers():
    torch.manual_seed(0)
    model = small_cnn()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    eps = [torch.randn_like(p) * 1e-3 for p in params]
    with perturbed(params, eps), frozen_norm_stats(model):
        assert not torch.equal(params[0], before[0])
        model.train()
        model(torch.randn(5, 3, 8, 8)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))


def test_sam_step_updates_batchnorm_stats_only_at_theta(tmp_path):
    """After one SAM step the running stats equal one train-mode forward at θ on the member's batch."""
    data = image_data(n=8)
    trainer = make_trainer(make_args(tmp_path, ensemble_method="sam", num_members=1, max_steps=1,
                                     per_device_train_batch_size=8, rho=0.5), small_cnn, data)
    reference = small_cnn()
    reference.load_state_dict(trainer.ensemble.members[0].state_dict())
    reference.train()
    rows = member_permutation(8, trainer.args.member_seeds[0], 0)
    with torch.no_grad():
        reference(data.x[rows])
    trainer.train()
    bn = trainer.ensemble.members[0][1]
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean, atol=0, rtol=0)
    torch.testing.assert_close(bn.running_var, reference[1].running_var, atol=0, rtol=0)
    assert bn.num_batches_tracked.item() == 1


def test_weights_bitwise_restored_after_perturbed_pass(tmp_path):
    """With lr = 0 a SAM step must leave every weight bitwise as it was."""
    data = image_data(n=8)
    trainer = make_trainer(make_args(tmp_path, ensemble_method="sam", num_members=2, max_steps=2, learning_rate=0.0,
                                     per_device_train_batch_size=4, rho=1.0), small_cnn, data)
    before = [p.detach().clone() for p in trainer.ensemble.parameters()]
    trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(trainer.ensemble.parameters(), before))


def test_nan_ascent_gradient_is_skipped_and_counted(tmp_path, monkeypatch):
    data = vector_data(n=8)
    from helpers import mlp

    def build():
        return mlp()

    args = make_args(tmp_path, ensemble_method="sam", num_members=1, max_steps=1, per_device_train_batch_size=8)
    trainer = make_trainer(args, build, data)
    plain = make_trainer(make_args(tmp_path / "p", ensemble_method="deep_ensemble", num_members=1, max_steps=1,
                                   per_device_train_batch_size=8), build, data)
    real = sam_module.sam_epsilon

    def nan_epsilon(params, grads, rho, adaptive=False):
        return real(params, [torch.full_like(g, float("nan")) for g in grads], rho, adaptive)

    monkeypatch.setattr(sam_module, "sam_epsilon", nan_epsilon)
    trainer.train()
    plain.train()
    log = trainer.state.log_history[0]
    assert log["skipped_ascents"] == 1.0
    for p, q in zip(trainer.ensemble.parameters(), plain.ensemble.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)  # eps = 0: the step is the plain step


def _bn_mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_single_sample_sam_set_with_batchnorm(tmp_path):
    """|S| = 1 and |N| = 1 with BatchNorm1d (undefined batch statistics) train without error."""
    n = 6
    data = vector_data(n=n)
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, max_steps=3,
                     per_device_train_batch_size=2, scoring_start_epoch=9)
    trainer = make_trainer(args, _bn_mlp, data)
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[:, ::2] = True
    trainer.set_sam_masks(masks)
    before = [p.detach().clone() for p in trainer.ensemble.parameters()]
    trainer.train()
    fractions = [log[f"member_{i}_sam_batch_share"] for log in trainer.state.log_history if "loss" in log
                 for i in range(2)]
    assert 0.5 in fractions  # some batches had exactly one SAM sample and one plain sample
    assert all(torch.isfinite(p).all() for p in trainer.ensemble.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(trainer.ensemble.parameters(), before))


def test_bf16_on_cpu_trains_close_to_fp32(tmp_path):
    data = image_data(n=16)
    runs = {}
    for bf16 in (False, True):
        args = make_args(tmp_path / str(bf16), ensemble_method="sam", num_members=2, num_train_epochs=1, bf16=bf16)
        trainer = make_trainer(args, small_cnn, data)
        trainer.train()
        runs[bf16] = trainer
    p32 = torch.cat([p.flatten() for p in runs[False].ensemble.parameters()])
    p16 = torch.cat([p.flatten() for p in runs[True].ensemble.parameters()])
    assert p16.dtype == torch.float32 and torch.isfinite(p16).all()
    assert not torch.equal(p16, p32)  # bf16 autocast really ran
    torch.testing.assert_close(p16, p32, atol=0.05, rtol=0)
