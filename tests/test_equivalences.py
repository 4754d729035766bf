"""Exact equivalences between the three methods and between m-member and 1-member runs."""

import torch
from helpers import image_data, make_args, make_trainer, mlp, small_cnn, vector_data


def _train(tmp_path, build, data, **kw):
    trainer = make_trainer(make_args(tmp_path, **kw), build, data)
    trainer.train()
    return trainer


def _weights(trainer, i):
    return [t.detach().clone() for t in trainer.ensemble.members[i].state_dict().values()]


def _assert_members_equal(a, b, i=0, j=0):
    for x, y in zip(_weights(a, i), _weights(b, j), strict=True):
        assert torch.equal(x, y)


def _cnn():
    return small_cnn(dropout=0.2)


COMMON = dict(num_members=2, num_train_epochs=2, per_device_train_batch_size=6, rho=0.2)


def test_rho_zero_equals_plain_step(tmp_path):
    data = image_data(n=18, augment=True)
    sam = _train(tmp_path / "a", _cnn, data, ensemble_method="sam", **{**COMMON, "rho": 0.0})
    plain = _train(tmp_path / "b", _cnn, data, ensemble_method="deep_ensemble", **COMMON)
    for i in range(2):
        _assert_members_equal(sam, plain, i, i)


def test_sharpbalance_with_every_sample_in_sam_set_equals_sam(tmp_path):
    data = image_data(n=18, augment=True)
    sb = _train(tmp_path / "a", _cnn, data, ensemble_method="sharpbalance", sam_fraction=1.0,
                scoring_start_epoch=0, **COMMON)
    assert bool(sb.sam_masks.all()) and sb.scoring_history[0]["epoch"] == 0
    sam = _train(tmp_path / "b", _cnn, data, ensemble_method="sam", **COMMON)
    for i in range(2):
        _assert_members_equal(sb, sam, i, i)


def test_sharpbalance_with_k_zero_from_epoch_zero_equals_deep_ensemble(tmp_path):
    data = image_data(n=18, augment=True)
    sb = _train(tmp_path / "a", _cnn, data, ensemble_method="sharpbalance", sam_fraction=0.0,
                scoring_start_epoch=0, **COMMON)
    assert not bool(sb.sam_masks.any())
    de = _train(tmp_path / "b", _cnn, data, ensemble_method="deep_ensemble", **COMMON)
    for i in range(2):
        _assert_members_equal(sb, de, i, i)


def _member_vs_single(tmp_path, method):
    data = image_data(n=14, augment=True)
    kw = dict(ensemble_method=method, num_train_epochs=2, per_device_train_batch_size=4, rho=0.1)
    three = _train(tmp_path / "m3", _cnn, data, num_members=3, member_seeds=[5, 6, 7], **kw)
    for i, seed in enumerate([5, 6, 7]):
        one = _train(tmp_path / f"m1_{seed}", _cnn, data, num_members=1, member_seeds=[seed], **kw)
        _assert_members_equal(three, one, i, 0)


def test_deep_ensemble_member_equals_single_run(tmp_path):
    _member_vs_single(tmp_path, "deep_ensemble")


def test_sam_ensemble_member_equals_single_run(tmp_path):
    _member_vs_single(tmp_path, "sam")


def test_members_differ(tmp_path):
    """Different seeds give different inits, orders, augmentations: members are not copies."""
    data = image_data(n=14, augment=True)
    t = _train(tmp_path, _cnn, data, ensemble_method="deep_ensemble", num_members=2, num_train_epochs=1)
    assert not torch.equal(_weights(t, 0)[0], _weights(t, 1)[0])


def test_gradient_accumulation_equals_full_batch(tmp_path):
    data = vector_data(n=16)
    kw = dict(ensemble_method="deep_ensemble", num_members=2, num_train_epochs=2, learning_rate=0.2)
    full = _train(tmp_path / "a", mlp, data, per_device_train_batch_size=8, **kw)
    accum = _train(tmp_path / "b", mlp, data, per_device_train_batch_size=4, gradient_accumulation_steps=2, **kw)
    assert full.state.global_step == accum.state.global_step == 4
    for i in range(2):
        for x, y in zip(_weights(full, i), _weights(accum, i)):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_gradient_accumulation_sam_equals_full_batch_sam_per_micro_batch(tmp_path):
    """Under accumulation each micro-batch makes its own ascent; the sum matches two half-batch SAM gradients."""
    data = vector_data(n=8)
    kw = dict(ensemble_method="sam", num_members=1, max_steps=1, learning_rate=0.2, rho=0.3)
    accum = _train(tmp_path / "b", mlp, data, per_device_train_batch_size=4, gradient_accumulation_steps=2, **kw)
    halves = []
    for k in range(2):  # two separate 1-step SAM runs on each half, lr/2 each, from the same init
        t = make_trainer(make_args(tmp_path / f"h{k}", **{**kw, "learning_rate": 0.1}, per_device_train_batch_size=4),
                         mlp, data)
        halves.append(t)
    from sbtrainer.sampling import member_permutation

    perm = member_permutation(8, accum.args.member_seeds[0], 0)
    init = _weights(halves[0], 0)
    deltas = []
    for k, t in enumerate(halves):
        sub = vector_data(n=8)
        sub.x, sub.y = sub.x[perm[4 * k : 4 * k + 4]], sub.y[perm[4 * k : 4 * k + 4]]
        t.train_dataset = sub
        t.args.member_seeds = [10_000 + k]  # order inside a 4-row batch does not change its mean gradient
        t.train()
        deltas.append([w - w0 for w, w0 in zip(_weights(t, 0), init)])
    for w, w0, d0, d1 in zip(_weights(accum, 0), init, *deltas):
        torch.testing.assert_close(w, w0 + d0 + d1, atol=1e-6, rtol=0)
