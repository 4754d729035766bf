"""End to end with the real HF Trainer: timm ResNet (CIFAR stem), tiny ALBERT and a plain module, 3-member SharpBalance."""

import pytest
import torch
from helpers import TokenDataset, image_data, make_args, make_trainer, small_cnn, tiny_albert_factory

from sbtrainer.models import cifar_resnet
from sbtrainer.sampling import member_permutation

N, B, EPOCHS, TD = 24, 6, 3, 1
STEPS = N // B


def _narrow_resnet():
    return cifar_resnet("resnet18", num_classes=4, width=4)


CASES = {
    "timm_resnet": (_narrow_resnet, lambda: image_data(n=N, shape=(3, 16, 16), augment=True),
                    lambda: image_data(n=N, shape=(3, 16, 16))),
    "tiny_albert": (tiny_albert_factory(), lambda: TokenDataset(n=N), None),
    "plain_module": (lambda: small_cnn(dropout=0.1), lambda: image_data(n=N, augment=True), lambda: image_data(n=N)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_three_member_sharpbalance_through_td(tmp_path, case):
    build, train_data, eval_view = CASES[case]
    train = train_data()
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=3, num_train_epochs=EPOCHS,
                     scoring_start_epoch=TD, sam_fraction=0.3, per_device_train_batch_size=B, rho=0.1,
                     learning_rate=0.05, eval_strategy="epoch", per_device_eval_batch_size=8)
    trainer = make_trainer(args, build, train, score_dataset=eval_view() if eval_view else None,
                           eval_dataset=eval_view() if eval_view else TokenDataset(n=10, seed=1))
    before = [[p.detach().clone() for p in m.parameters()] for m in trainer.ensemble.members]
    trainer.train()

    # scoring happened once, at the first step of epoch Td
    assert trainer.scoring_history == [{"epoch": TD, "global_step": TD * STEPS}]
    assert trainer.sam_masks.shape == trainer.sample_scores.shape == (3, N)
    assert (trainer.sample_scores > 0).all()

    # logged per-batch SAM fractions agree with trainer.sam_masks and the member's rows of that step
    logs = [log for log in trainer.state.log_history if "loss" in log and "member_0_sam_batch_share" in log]
    assert len(logs) == EPOCHS * STEPS
    for step, log in enumerate(logs):
        epoch, k = divmod(step, STEPS)
        for i, seed in enumerate(args.member_seeds):
            rows = member_permutation(N, seed, epoch)[k * B : (k + 1) * B]
            expected = 1.0 if epoch < TD else trainer.sam_masks[i, rows].sum().item() / B
            assert log[f"member_{i}_sam_batch_share"] == pytest.approx(expected, abs=1e-12)
            assert log[f"member_{i}_loss"] > 0
    assert all(log["skipped_ascents"] == 0 for log in logs)

    # every member's parameters changed
    for member, old in zip(trainer.ensemble.members, before):
        changed = [not torch.equal(p, q) for p, q in zip(member.parameters(), old)]
        assert sum(changed) >= 0.9 * len(changed)

    # evaluation through the stock loop: ensemble metrics with the eval_ prefix
    metrics = trainer.evaluate()
    for key in ("eval_ensemble_accuracy", "eval_member_accuracy", "eval_member_2_accuracy", "eval_eir", "eval_der",
                "eval_variance", "eval_kl", "eval_ensemble_nll", "eval_ensemble_ece", "eval_ensemble_brier"):
        assert key in metrics
    assert 0.0 <= metrics["eval_ensemble_accuracy"] <= 1.0


def test_evaluate_matches_metrics_on_logits(tmp_path):
    """trainer.evaluate() equals sbtrainer.metrics on the members' logits computed by hand."""
    from sbtrainer.metrics import ensemble_metrics

    data = image_data(n=20)
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=3, per_device_eval_batch_size=7,
                     ensemble_reduction="probs")
    trainer = make_trainer(args, small_cnn, data, eval_dataset=data)
    metrics = trainer.evaluate()
    ensemble = trainer.ensemble.eval()
    with torch.no_grad():
        logits = torch.stack([m(data.x) for m in ensemble.members], dim=1)
    expected = ensemble_metrics(logits, data.y, reduction="probs")
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_trains_and_scores_without_the_datasets_package(tmp_path, monkeypatch):
    """The lent GPU machines have no `datasets`: a torch Dataset must train through Td without it."""
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=2,
                     scoring_start_epoch=1, sam_fraction=0.3)
    trainer = make_trainer(args, small_cnn, image_data(n=12))
    trainer.train()
    assert trainer.scoring_history == [{"epoch": 1, "global_step": 3}]
