"""EoA (moving averages of each member's weights): the hand average, BatchNorm re-estimation, resume, composition."""

import pytest
import torch
from helpers import image_data, make_args, make_trainer, small_cnn, vector_data
from torch.optim.swa_utils import AveragedModel
from transformers import TrainerCallback

from sbtrainer.averaging import MemberAverages


class RecordWeights(TrainerCallback):
    """Each member's parameters after every optimizer step, keyed by ``state.global_step``."""

    def __init__(self, trainer=None) -> None:
        self.trainer, self.weights = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)  # t = 0: the initial weights

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = [[p.detach().clone() for p in m.parameters()]
                                           for m in self.trainer.ensemble.members]


def _train(tmp_path, method: str, start: int, build=small_cnn, data=None, **kw):
    data = data if data is not None else image_data(n=16)
    extra = dict(sam_fraction=0.5, scoring_start_epoch=1) if method == "sharpbalance" else {}
    args = make_args(tmp_path, ensemble_method=method, num_members=2, num_train_epochs=2, rho=0.05,
                     moving_average_start_step=start, **extra, **kw)
    rec = RecordWeights()
    trainer = make_trainer(args, build, data, callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    return trainer, rec


@pytest.mark.parametrize(("method", "start"), [("deep_ensemble", 0), ("deep_ensemble", 3), ("sam", 3),
                                               ("sharpbalance", 3)])
def test_average_equals_hand_average_of_per_step_weights(tmp_path, method, start):
    trainer, rec = _train(tmp_path, method, start=start, build=lambda: torch.nn.Linear(5, 3), data=vector_data(n=16))
    steps = sorted(rec.weights)
    assert steps == list(range(0, 9))  # the initial weights, then 16 rows, 4 per member per step, 2 epochs
    assert trainer.member_averages.num_averaged == [9 - start] * 2  # t = start..8
    for i, member in enumerate(trainer.ensemble.members):
        hand = [torch.stack([rec.weights[t][i][j] for t in steps if t >= start]).mean(0)
                for j in range(len(rec.weights[1][i]))]
        last = rec.weights[8][i]
        for got, want, live in zip(member.parameters(), hand, last, strict=True):  # installed after train()
            torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
            assert not torch.allclose(got.detach(), live)  # the average, not the last weights


def test_batchnorm_statistics_recomputed_on_the_training_rows(tmp_path):
    data = image_data(n=16)
    trainer, _ = _train(tmp_path, "deep_ensemble", start=0, data=data, per_device_eval_batch_size=5)
    for member in trainer.ensemble.members:
        bn = member[1]
        # Hand: the averaged convolution's outputs on all 16 rows; update_bn's cumulative average over batches
        # of 5, 5, 5, 1 rows weighs each batch's mean equally per batch (momentum None: a running mean of batch stats).
        conv = member[0]
        with torch.no_grad():
            feats = [conv(data.x[lo:lo + 5]) for lo in range(0, 16, 5)]
        means = torch.stack([f.mean((0, 2, 3)) for f in feats])
        vars_ = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats])
        torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, vars_.mean(0), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 4


def test_resume_keeps_the_average_bitwise(tmp_path):
    def args(path):
        return make_args(path, ensemble_method="sam", num_members=2, num_train_epochs=2, rho=0.05,
                         moving_average_start_step=2, save_strategy="steps", save_steps=1)

    full = make_trainer(args(tmp_path / "a"), small_cnn, image_data(n=16, augment=True))
    full.train()
    for step in (1, 3, 5):  # before the start, just after it, mid-epoch 2
        resumed = make_trainer(args(tmp_path / f"r{step}"), small_cnn, image_data(n=16, augment=True))
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / f"checkpoint-{step}"))
        assert resumed.member_averages.num_averaged == full.member_averages.num_averaged == [7, 7]
        for a, b in zip(resumed.ensemble.state_dict().values(), full.ensemble.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(resumed.member_averages.state_dict().values(), full.member_averages.state_dict().values(),
                        strict=True):
            for x, y in zip(a.values(), b.values(), strict=True):
                assert torch.equal(x, y)


def test_off_by_default_and_refusals(tmp_path):
    args = make_args(tmp_path, num_members=2)
    assert args.moving_average_start_step is None
    trainer = make_trainer(args, small_cnn, image_data(n=8))
    trainer.train()
    assert trainer.member_averages is None
    with pytest.raises(ValueError, match=r"moving_average_start_step.*load_best_model_at_end"):
        make_trainer(make_args(tmp_path, num_members=2, moving_average_start_step=0, load_best_model_at_end=True,
                               eval_strategy="steps", save_strategy="steps"), small_cnn, image_data(n=8),
                     eval_dataset=image_data(n=4))


def test_member_averages_matches_averaged_model():
    members = [torch.nn.Linear(3, 2) for _ in range(2)]
    avg = MemberAverages(members, start_step=2)
    ref = AveragedModel(members[0], use_buffers=False)
    for step in range(1, 6):
        with torch.no_grad():
            for m in members:
                m.weight.add_(step)
        if avg.update(members, step):
            ref.update_parameters(members[0])
    assert avg.num_averaged == [4, 4]
    assert torch.equal(avg.averages[0].module.weight, ref.module.weight)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        MemberAverages(members, start_step=-1)
