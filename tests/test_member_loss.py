"""One member loss (`EnsembleModel.loss_fn`, per-sample): training, evaluation, `.loss` and scoring agree on it."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_args, mlp, vector_data
from torch.func import functional_call

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.member_adapter import cross_entropy_per_sample
from sbtrainer.scoring import batch_scores_loop

LR = 0.5


def focal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A per-sample focal loss (gamma 2): ``(B,)``."""
    logp = F.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    return -((1 - logp.exp()) ** 2) * logp


def _ensemble(args, loss_fn=None):
    ens = EnsembleModel.from_factory(lambda _s: mlp(), args.num_members, args.member_seeds)
    if loss_fn is not None:
        ens.loss_fn = loss_fn
    return ens


def test_training_evaluation_and_forward_use_the_ensemble_loss(tmp_path):
    data, ev = vector_data(n=6), vector_data(n=5, seed=2)
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=2, per_device_train_batch_size=6,
                     learning_rate=LR)
    ens = _ensemble(args, focal)
    theta = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in ens.members]
    trainer = SharpBalanceTrainer(model=ens, args=args, train_dataset=data, eval_dataset=ev)
    trainer.train()
    for i, member in enumerate(trainer.ensemble.members):
        params = {k: v.clone().requires_grad_(True) for k, v in theta[i].items()}
        loss = focal(functional_call(member, params, (data.x,)), data.y).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        for name, p in member.named_parameters():
            torch.testing.assert_close(p.detach(), theta[i][name] - LR * grads[name], atol=1e-6, rtol=0)
    metrics = trainer.evaluate()
    with torch.no_grad():
        per_member = [focal(m(ev.x), ev.y).mean() for m in trainer.ensemble.members]
        out = trainer.ensemble(pixel_values=ev.x, labels=ev.y)
    assert metrics["eval_loss"] == pytest.approx(float(sum(per_member) / 2), abs=1e-6)
    assert float(out.loss) == pytest.approx(float(sum(per_member)), abs=1e-6)


def test_scoring_uses_the_nll_unless_a_scoring_loss_is_given(tmp_path):
    data = vector_data(n=8)
    kw = dict(ensemble_method="sharpbalance", num_members=2, num_train_epochs=1, scoring_start_epoch=0,
              sam_fraction=0.5, learning_rate=0.0)
    nll = SharpBalanceTrainer(model=_ensemble(make_args(tmp_path / "a", **kw), focal),
                              args=make_args(tmp_path / "a", **kw), train_dataset=data)
    nll.train()
    custom = SharpBalanceTrainer(model=_ensemble(make_args(tmp_path / "b", **kw)), args=make_args(tmp_path / "b", **kw),
                                 train_dataset=data, score_loss_fn=focal)
    custom.train()
    batch = {"pixel_values": data.x, "labels": data.y}
    for i in range(2):  # lr 0: members stay at their init, so the scores can be recomputed by hand
        member = nll.ensemble.members[i].eval()
        torch.testing.assert_close(nll.sample_scores[i], batch_scores_loop(member, batch, loss_fn=cross_entropy_per_sample),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(custom.sample_scores[i], batch_scores_loop(member, batch, loss_fn=focal),
                                   rtol=1e-5, atol=0)
    assert not torch.allclose(nll.sample_scores, custom.sample_scores)


def test_label_smoothing_with_a_custom_member_loss_is_refused(tmp_path):
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=1, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1 applies to the default member loss only"):
        SharpBalanceTrainer(model=_ensemble(args, focal), args=args, train_dataset=vector_data(n=4))


def test_default_member_loss_with_label_smoothing_is_torch_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(cross_entropy_per_sample(logits, labels, 0.2).mean(),
                               F.cross_entropy(logits, labels, label_smoothing=0.2), rtol=1e-6, atol=0)
