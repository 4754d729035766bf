"""Every invalid SharpBalanceConfig value raises one ValueError naming the field, the rule and the value."""

import pytest
from helpers import make_args

from sbtrainer import SharpBalanceConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(sam_fraction=1.5), "sam_fraction"),
        (dict(sam_fraction=-0.1), "sam_fraction"),
        (dict(rho=-0.01), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(num_members=1, ensemble_method="sharpbalance"), "num_members"),
        (dict(num_members=0, ensemble_method="deep_ensemble"), "num_members"),
        (dict(num_train_epochs=4, scoring_start_epoch=4), "scoring_start_epoch"),
        (dict(scoring_start_epoch=-1), "scoring_start_epoch"),
        (dict(num_members=3, member_rhos=[0.1, 0.2]), "member_rhos"),
        (dict(num_members=2, member_rhos=[0.1, -0.2]), "member_rhos"),
        (dict(num_members=3, member_seeds=[1, 2]), "member_seeds"),
        (dict(ensemble_method="swa"), "ensemble_method"),
        (dict(selection="random"), "selection"),
        (dict(residual="all"), "residual"),
        (dict(ensemble_reduction="vote"), "ensemble_reduction"),
        (dict(score_batch_size=0), "score_batch_size"),
        (dict(rescore_every=0), "rescore_every"),
        (dict(score_method="fast"), "score_method"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
    ],
)
def test_invalid_value_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field) as err:
        make_args(tmp_path, **{"num_train_epochs": 2, **overrides})
    assert "got" in str(err.value)


def test_defaults(tmp_path):
    args = SharpBalanceConfig(output_dir=str(tmp_path), num_train_epochs=200, seed=13, report_to="none")
    assert args.ensemble_method == "sharpbalance" and args.num_members == 3
    assert args.member_seeds == [13, 14, 15]
    assert args.rho == 0.05 and args.sam_fraction == 0.5 and args.scoring_start_epoch == 100
    assert args.selection == "highest" and args.residual == "none" and args.ensemble_reduction == "logits"
    assert args.max_grad_norm == 0.0 and args.rescore_every is None and args.score_batch_size == 64
    assert args.rho_of(2) == 0.05
    assert SharpBalanceConfig(output_dir=str(tmp_path), num_members=2, member_rhos=[0.1, 0.3],
                              report_to="none").rho_of(1) == 0.3


def test_scoring_epoch_not_checked_against_epochs_when_max_steps_bounds_training(tmp_path):
    args = make_args(tmp_path, num_train_epochs=1, max_steps=5, scoring_start_epoch=3)
    assert args.scoring_start_epoch == 3


def test_parses_from_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SharpBalanceConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--num_members", "2", "--member_seeds", "3", "9", "--rho", "0.2",
         "--ensemble_method", "sam", "--report_to", "none"])
    assert args.member_seeds == [3, 9] and args.rho == 0.2 and args.ensemble_method == "sam"
