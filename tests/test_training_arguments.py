"""The audit of the inherited TrainingArguments fields, and config combinations that silently change the method.

Every `transformers.TrainingArguments` field is listed in `sbtrainer.config.INHERITED_FIELDS` (a new
transformers field fails here until audited); every refused field raises a ValueError naming it when the
config is built; the `--help` of the config parses; a few honoured fields are checked by their numbers.
"""

import dataclasses
import logging
import re

import pytest
import safetensors.torch
import torch
from helpers import DictDataset, make_args, make_trainer, mlp, vector_data
from transformers import HfArgumentParser, TrainingArguments

from sbtrainer import SharpBalanceConfig
from sbtrainer import config as config_module
from sbtrainer.config import INHERITED_FIELDS, INHERITED_STATUSES, inherited_fields_markdown

TRAINING_FIELDS = [f.name for f in dataclasses.fields(TrainingArguments)]
# Fields transformers added after the oldest supported version (5.17): audited, absent there.
LATER_FIELDS = {"activation_checkpointing", "activation_checkpointing_kwargs"}


# -- the table covers every field ---------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINING_FIELDS)
def test_every_inherited_field_is_audited(name):
    assert name in INHERITED_FIELDS, f"TrainingArguments.{name} is not audited in sbtrainer.config.INHERITED_FIELDS"
    status, why = INHERITED_FIELDS[name]
    assert status in INHERITED_STATUSES and len(why) > 10


def test_table_lists_only_existing_fields():
    assert sorted(set(INHERITED_FIELDS) - set(TRAINING_FIELDS) - LATER_FIELDS) == []


def test_markdown_table_names_every_field_once():
    table = inherited_fields_markdown()
    rows = table.splitlines()[2:]
    named = [n for row in rows for n in re.findall(r"`(\w+)`", row.split(" | ")[0])]
    assert sorted(set(named) - (LATER_FIELDS - set(TRAINING_FIELDS))) == sorted(TRAINING_FIELDS)
    assert len(named) == len(set(named))
    assert all(row.split(" | ")[1] in INHERITED_STATUSES for row in rows)


# -- every refused field is refused by name --------------------------------------------------------------
def _parallelism_config():
    from accelerate import ParallelismConfig

    return ParallelismConfig()


# field -> the overrides that must be refused with that field named (several inputs for partly refused fields)
REFUSED = {
    "parallelism_config": [lambda: dict(parallelism_config=_parallelism_config())],
    "deepspeed": [lambda: dict(deepspeed={"zero_optimization": {"stage": 2}})],
    "fsdp": [lambda: dict(fsdp=True), lambda: dict(fsdp="full_shard")],
    "torch_compile": [lambda: dict(torch_compile=True)],
    "torch_compile_backend": [lambda: dict(torch_compile_backend="inductor")],
    "torch_compile_mode": [lambda: dict(torch_compile_mode="reduce-overhead")],
    "activation_checkpointing": [lambda: dict(activation_checkpointing=True)],
    "gradient_checkpointing": [lambda: dict(gradient_checkpointing=True)],
    "neftune_noise_alpha": [lambda: dict(neftune_noise_alpha=5.0)],
    "use_liger_kernel": [lambda: dict(use_liger_kernel=True)],
    "auto_find_batch_size": [lambda: dict(auto_find_batch_size=True)],
    "average_tokens_across_devices": [lambda: dict(average_tokens_across_devices=False)],
    "train_sampling_strategy": [lambda: dict(train_sampling_strategy="group_by_length"),
                                lambda: dict(train_sampling_strategy="sequential"),
                                lambda: dict(train_sampling_strategy="batch_rebalance")],
    "optim": [lambda: dict(optim="lomo"), lambda: dict(optim="adalomo"),
              lambda: dict(optim="galore_adamw_layerwise"), lambda: dict(optim="apollo_adamw_layerwise"),
              lambda: dict(optim="schedule_free_sgd"), lambda: dict(optim="schedule_free_adamw")],
    "push_to_hub": [lambda: dict(push_to_hub=True)],
    "hub_strategy": [lambda: dict(push_to_hub=True, hub_strategy="checkpoint"),
                     lambda: dict(push_to_hub=True, hub_strategy="all_checkpoints")],
    "hub_revision": [lambda: dict(hub_revision="dev")],
    "label_names": [lambda: dict(label_names=["labels", "aux"]), lambda: dict(label_names=[])],
    "fp16": [lambda: dict(fp16=True, use_cpu=True)],
    "data_seed": [lambda: dict(data_seed=7)],
    "eval_do_concat_batches": [lambda: dict(eval_do_concat_batches=False)],
    "accelerator_config": [lambda: dict(accelerator_config={"split_batches": True}),
                           lambda: dict(accelerator_config={"dispatch_batches": True})],
}
CASES = [(name, i) for name, makers in REFUSED.items() for i in range(len(makers))]


def test_refused_cases_cover_every_refused_row():
    refused_rows = {n for n, (status, _) in INHERITED_FIELDS.items() if status in ("refused", "partly refused")}
    assert refused_rows == set(REFUSED)


@pytest.mark.parametrize(("name", "case"), CASES)
def test_refused_field_raises_value_error_naming_it(tmp_path, name, case):
    if name not in TRAINING_FIELDS:
        pytest.skip(f"TrainingArguments.{name} does not exist in this transformers version")
    overrides = REFUSED[name][case]()
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, **overrides)
    message = str(err.value)
    assert name in message and "got" in message
    assert message.startswith("SharpBalanceConfig.")


def test_fp16_on_cpu_names_fp16_and_use_cpu_and_points_to_bf16(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, fp16=True, use_cpu=True)
    assert all(word in str(err.value) for word in ("fp16", "use_cpu", "bf16=True", "float32"))
    # The same kind: fp16 from `accelerate launch --mixed_precision fp16 --cpu` (the environment), fp16=False.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"fp16 .*ACCELERATE_MIXED_PRECISION='fp16', use_cpu=True"):
        make_args(tmp_path, use_cpu=True)


def test_deepspeed_from_the_accelerate_environment_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"SharpBalanceConfig\.deepspeed"):
        make_args(tmp_path)


@pytest.mark.parametrize("overrides", [
    dict(bf16=True), dict(optim="adamw_torch"), dict(optim="sgd", optim_args="momentum=0.9"),
    dict(label_names=["target"]), dict(push_to_hub=True, hub_strategy="end"),
    dict(accelerator_config={"even_batches": False}), dict(label_smoothing_factor=0.1),
    dict(train_sampling_strategy="random"), dict(dataloader_drop_last=True),
])
def test_honoured_values_are_accepted(tmp_path, overrides):
    args = make_args(tmp_path, **overrides)
    for key, value in overrides.items():
        if key != "accelerator_config":
            assert getattr(getattr(args, key), "value", getattr(args, key)) == value


# -- combinations that make the method another one -----------------------------------------------------
@pytest.mark.parametrize(("overrides", "name"), [
    (dict(ensemble_method="deep_ensemble", num_members=2, member_rhos=[0.1, 0.2]), "member_rhos"),
    (dict(ensemble_method="deep_ensemble", adaptive=True), "adaptive"),
])
def test_sam_option_of_a_method_without_sam_is_refused(tmp_path, overrides, name):
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, num_train_epochs=2, **overrides)
    assert str(err.value).startswith(f"SharpBalanceConfig.{name} ") and "got" in str(err.value)


@pytest.mark.parametrize(("overrides", "says"), [
    (dict(ensemble_method="sam", rho=0.0), "rho=0.0 with ensemble_method='sam'"),
    (dict(ensemble_method="sharpbalance", rho=0.0), "rho=0.0 with ensemble_method='sharpbalance'"),
    (dict(ensemble_method="sam", num_members=2, member_rhos=[0.0, 0.0]), "member_rhos=[0.0, 0.0]"),
    (dict(ensemble_method="sharpbalance", sam_fraction=1.0), "sam_fraction=1.0"),
    (dict(ensemble_method="sharpbalance", sam_fraction=0.0), "sam_fraction=0.0"),
])
def test_explicit_limit_that_changes_the_method_is_warned_not_refused(tmp_path, overrides, says, caplog, monkeypatch):
    """rho=0 is exactly the plain step and k=1 exactly SAM: the equivalence tests rely on both, so they only warn."""
    monkeypatch.setattr(config_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sbtrainer.config"):
        make_args(tmp_path, num_train_epochs=2, **overrides)
    assert any(says in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("overrides", [
    dict(ensemble_method="sam", num_members=2, rho=0.0, member_rhos=[0.0, 0.1]),  # SAM+ with one plain member
    dict(ensemble_method="sharpbalance", sam_fraction=0.0, residual="round_robin"),  # R[i::m]: disjoint sets
    dict(ensemble_method="sharpbalance", sam_fraction=0.0, residual="complement"),
    dict(ensemble_method="sharpbalance", sam_fraction=0.99),
    dict(ensemble_method="deep_ensemble", rho=0.0),
])
def test_combinations_that_keep_the_method_are_accepted(tmp_path, overrides):
    make_args(tmp_path, num_train_epochs=2, **overrides)


def test_field_ignored_by_the_method_warns_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(config_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sbtrainer.config"):
        make_args(tmp_path, ensemble_method="sam", selection="lowest", rescore_every=2, num_train_epochs=2)
        make_args(tmp_path, ensemble_method="sam", selection="lowest", rescore_every=2, num_train_epochs=2)
        make_args(tmp_path, ensemble_method="sharpbalance", selection="lowest", rescore_every=2, num_train_epochs=2)
    messages = sorted(r.getMessage() for r in caplog.records)
    assert messages == [
        "SharpBalanceConfig.rescore_every=2 is read only by ensemble_method 'sharpbalance'; it has no effect with 'sam'.",
        "SharpBalanceConfig.selection='lowest' is read only by ensemble_method 'sharpbalance'; it has no effect with "
        "'sam'.",
    ]


# -- --help ----------------------------------------------------------------------------------------
def test_help_formats_and_lists_every_field(capsys):
    parser = HfArgumentParser(SharpBalanceConfig)
    text = parser.format_help()
    for f in dataclasses.fields(SharpBalanceConfig):
        if f.init:
            assert f"--{f.name}" in text, f.name
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(["--help"])
    assert exit_info.value.code == 0
    assert "--sam_fraction" in capsys.readouterr().out


def test_no_help_string_has_a_bare_percent():
    """argparse %-formats help text: a single '%' must be written '%%' (or avoided)."""
    for f in dataclasses.fields(SharpBalanceConfig):
        assert not re.search(r"%(?!%)", re.sub("%%", "", f.metadata.get("help", ""))), f.name


# -- honoured fields that touch the data, the loss or saving, by their numbers ---------------------------
def _weights(trainer):
    return [t.detach().clone() for t in trainer.ensemble.state_dict().values()]


class _TargetColumn(DictDataset):
    """The same rows with the label column named ``target``."""

    def __getitem__(self, i: int) -> dict:
        row = super().__getitem__(i)
        row["target"] = row.pop("labels")
        return row


def test_label_names_with_a_target_column_equals_the_labels_column(tmp_path):
    data = vector_data(n=10)
    target = _TargetColumn(data.x, data.y)
    kw = dict(ensemble_method="sam", num_members=2, num_train_epochs=2, per_device_train_batch_size=4, rho=0.1)
    ref = make_trainer(make_args(tmp_path / "a", **kw), mlp, data, eval_dataset=data)
    new = make_trainer(make_args(tmp_path / "b", label_names=["target"], **kw), mlp, target, eval_dataset=target)
    ref.train()
    new.train()
    for x, y in zip(_weights(ref), _weights(new), strict=True):
        assert torch.equal(x, y)
    a, b = ref.evaluate(), new.evaluate()
    for key in ("eval_loss", "eval_ensemble_accuracy", "eval_ensemble_nll"):
        assert a[key] == b[key]


def test_dataloader_drop_last_drops_each_members_last_sub_batch(tmp_path):
    data = vector_data(n=10)  # batch 4: ceil(10/4) = 3 steps, floor(10/4) = 2 with drop_last
    for drop, steps in ((False, 3), (True, 2)):
        trainer = make_trainer(make_args(tmp_path / str(drop), ensemble_method="deep_ensemble", num_members=2,
                                         dataloader_drop_last=drop), mlp, data)
        trainer.train()
        assert trainer.state.global_step == steps


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    data, held_out = vector_data(n=16), vector_data(n=12, seed=3)
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=2, num_train_epochs=4, learning_rate=2.0,
                     eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                     metric_for_best_model="loss")
    trainer = make_trainer(args, mlp, data, eval_dataset=held_out)
    trainer.train()
    evals = [(log["step"], log["eval_loss"]) for log in trainer.state.log_history if "eval_loss" in log]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step != evals[-1][0]  # lr 2.0 overshoots: the last epoch is not the best, so loading matters
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    saved = safetensors.torch.load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    for name, tensor in trainer.ensemble.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best_loss, abs=1e-6)


def test_readme_audit_table_is_the_generated_one():
    """The README's table is `inherited_fields_markdown()` verbatim (one home: `INHERITED_FIELDS`)."""
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert config_module.inherited_fields_markdown().strip() in readme
