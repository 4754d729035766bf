"""Resume equals no interruption: mid-epoch and epoch-boundary checkpoints, before and after Td, augmentation on."""

import pytest
import torch
from helpers import image_data, make_args, make_trainer, small_cnn

STEPS_PER_EPOCH = 5  # 20 rows, 4 per member per step


def _args(path, **kw):
    return make_args(path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=3, scoring_start_epoch=1,
                     sam_fraction=0.3, per_device_train_batch_size=4, optim="adamw_torch", learning_rate=0.01,
                     lr_scheduler_type="linear", save_strategy="steps", save_steps=1, **kw)


def _build():
    return small_cnn(dropout=0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full")
    trainer = make_trainer(_args(path), _build, image_data(n=20, augment=True))
    trainer.train()
    return path, trainer


@pytest.mark.parametrize("step", [STEPS_PER_EPOCH, 7, 2 * STEPS_PER_EPOCH, 12], ids=["boundary-before-Td", "mid-epoch-after-Td", "boundary-after-Td", "mid-epoch-2"])
def test_resume_is_bitwise_equal(uninterrupted, tmp_path, step):
    path, full = uninterrupted
    resumed = make_trainer(_args(tmp_path), _build, image_data(n=20, augment=True))
    resumed.train(resume_from_checkpoint=str(path / "out" / f"checkpoint-{step}"))
    assert resumed.state.global_step == full.state.global_step == 3 * STEPS_PER_EPOCH
    for a, b in zip(resumed.ensemble.state_dict().values(), full.ensemble.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.sam_masks, full.sam_masks)
    assert torch.equal(resumed.sample_scores, full.sample_scores)
    assert resumed.scoring_history == full.scoring_history == [{"epoch": 1, "global_step": STEPS_PER_EPOCH}]


def test_checkpoint_holds_sharpbalance_state(uninterrupted):
    path, full = uninterrupted
    before = torch.load(path / "out" / "checkpoint-4" / "sharpbalance_state.pt", weights_only=True)
    after = torch.load(path / "out" / "checkpoint-6" / "sharpbalance_state.pt", weights_only=True)
    assert before["sam_masks"] is None and before["last_scored_epoch"] is None
    assert after["last_scored_epoch"] == 1 and after["sam_masks"].shape == (2, 20)
    assert after["member_seeds"] == full.args.member_seeds
