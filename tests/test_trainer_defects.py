"""Trainer-side defects found by trying the product as a new user (issue 8), each checked against the right value.

Kinds: micro-batches averaged as if equal in size; aliased tensors in checkpoints; a per-process reduction before
padding duplicates are dropped (see test_distributed_eval.py); inherited options accepted but not honoured;
gradient quantities read while loss-scaled; configs that silently disable the method; one fact with two homes;
a transform's columns dropped by the Trainer.
"""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DictDataset, make_args, make_trainer, mlp, vector_data
from torch import nn
from torch.func import functional_call

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.metrics import ensemble_metrics
from sbtrainer.sampling import member_permutation

LR = 0.5


def _init(build, seed):
    ens = EnsembleModel.from_factory(lambda _s: build(), 1, [seed])
    return ens.members[0], {k: v.detach().clone() for k, v in ens.members[0].named_parameters()}


def _grad(model, params, x, y):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _sam_grad(model, params, x, y, rho):
    _, g = _grad(model, params, x, y)
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    return _grad(model, {k: params[k] + rho * g[k] / norm for k in params}, x, y)[1]


# -- kind: micro-batches averaged as if they had equal sizes ------------------------------------------------
def _accumulated(tmp_path, method, **kw):
    data = vector_data(n=5)
    args = make_args(tmp_path, ensemble_method=method, num_members=1, per_device_train_batch_size=2,
                     gradient_accumulation_steps=3, learning_rate=LR, **kw)
    trainer = make_trainer(args, mlp, data)
    trainer.train()
    return trainer, data


def test_accumulation_with_unequal_micro_batches_weighs_every_row_equally(tmp_path):
    trainer, data = _accumulated(tmp_path, "deep_ensemble")
    assert trainer.state.global_step == 1  # micro-batches of 2, 2 and 1 rows, one optimizer step
    model, theta = _init(mlp, trainer.args.member_seeds[0])
    loss, g = _grad(model, theta, data.x, data.y)  # the mean loss over all 5 rows
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * g[name], atol=1e-6, rtol=0)
    logged = next(log for log in trainer.state.log_history if "loss" in log)
    assert logged["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert logged["member_0_loss"] == pytest.approx(float(loss), abs=1e-6)
    # batch 6 x accumulation 1 (one batch of all 5 rows) gives the same weights
    full = make_trainer(make_args(tmp_path / "full", ensemble_method="deep_ensemble", num_members=1,
                                  per_device_train_batch_size=6, learning_rate=LR), mlp, data)
    full.train()
    for a, b in zip(trainer.ensemble.parameters(), full.ensemble.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_accumulated_sam_weighs_each_micro_batch_by_its_rows(tmp_path):
    """SAM: ε stays per micro-batch; micro-batch k's SAM gradient weighs |B_k| / 5."""
    trainer, data = _accumulated(tmp_path, "sam", rho=0.3)
    model, theta = _init(mlp, trainer.args.member_seeds[0])
    perm = member_permutation(5, trainer.args.member_seeds[0], 0)
    expected = {k: v.clone() for k, v in theta.items()}
    for rows in (perm[0:2], perm[2:4], perm[4:5]):
        g = _sam_grad(model, theta, data.x[rows], data.y[rows], 0.3)
        for k in expected:
            expected[k] -= LR * len(rows) / 5 * g[k]
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=0)


# -- kind: aliased tensors in what the Trainer writes -------------------------------------------------------
class TiedNet(nn.Module):
    """An input embedding tied to the output layer (as HF language models tie lm_head to the embeddings)."""

    def __init__(self, dim: int = 5, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, classes, bias=False)
        self.mix = nn.Linear(classes, dim)
        self.out = nn.Linear(dim, classes)
        self.out.weight = self.embed.weight  # one tensor, two names in the state dict

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.embed(x))))


def _tied_args(path, **kw):
    return make_args(path, ensemble_method="sam", num_members=2, num_train_epochs=2, per_device_train_batch_size=4,
                     rho=0.1, optim="adamw_torch", learning_rate=0.01, save_strategy="steps", save_steps=1, **kw)


def test_tied_weights_checkpoint_and_resume_bitwise(tmp_path):
    data = vector_data(n=12, classes=5)
    full = make_trainer(_tied_args(tmp_path / "full"), TiedNet, data)
    full.train()
    assert full.state.global_step == 6
    resumed = make_trainer(_tied_args(tmp_path / "resumed"), TiedNet, data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-4"))
    for a, b in zip(resumed.ensemble.state_dict().values(), full.ensemble.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for member in resumed.ensemble.members:
        assert member.out.weight is member.embed.weight  # the tie still holds after the reload


def test_load_best_model_at_end_with_tied_weights(tmp_path):
    """load_best_model_at_end reloads the best checkpoint's weights through the same (alias-aware) path."""
    data = vector_data(n=12, classes=5)
    args = _tied_args(tmp_path, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="loss", greater_is_better=False)
    trainer = make_trainer(args, TiedNet, data, eval_dataset=vector_data(n=6, classes=5, seed=1))
    trainer.train()
    from safetensors.torch import load_file

    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    for name, value in trainer.ensemble.state_dict().items():
        source = name if name in best else name.replace("out.weight", "embed.weight")
        assert torch.equal(value, best[source]), name
    assert trainer.ensemble.members[0].out.weight is trainer.ensemble.members[0].embed.weight


def test_resume_with_a_different_model_says_what_to_fix(tmp_path):
    data = vector_data(n=12, classes=5)
    make_trainer(_tied_args(tmp_path / "a"), TiedNet, data).train()
    other = make_trainer(_tied_args(tmp_path / "b"), lambda: TiedNet(classes=5, dim=5).requires_grad_(True), data)
    other.ensemble.members[0].mix = nn.Linear(5, 7)  # a different width
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: the weights .* do not fit this ensemble") as err:
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert "\n" not in str(err.value)


# -- kind: inherited TrainingArguments accepted but not honoured -------------------------------------------
class TargetDataset(DictDataset):
    """The same rows with the label column named ``target``."""

    def __getitem__(self, i):
        row = super().__getitem__(i)
        return {"pixel_values": row["pixel_values"], "target": row["labels"]}


def test_label_names_with_another_label_column_trains_and_evaluates_like_labels(tmp_path):
    base, ev = vector_data(n=12), vector_data(n=7, seed=3)
    kw = dict(ensemble_method="sharpbalance", num_members=2, num_train_epochs=2, scoring_start_epoch=1,
              sam_fraction=0.5, rho=0.2)
    ref = make_trainer(make_args(tmp_path / "ref", **kw), mlp, base, eval_dataset=ev)
    ref.train()
    target = make_trainer(make_args(tmp_path / "t", label_names=["target"], **kw), mlp, TargetDataset(base.x, base.y),
                          eval_dataset=TargetDataset(ev.x, ev.y))
    target.train()
    for a, b in zip(target.ensemble.parameters(), ref.ensemble.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(target.sam_masks, ref.sam_masks)
    got, want = target.evaluate(), ref.evaluate()
    for key, value in want.items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert got[key] == pytest.approx(value, abs=1e-9), key


def test_label_smoothing_factor_is_applied_to_the_training_loss(tmp_path):
    data = vector_data(n=6)
    trainer = make_trainer(make_args(tmp_path, ensemble_method="deep_ensemble", num_members=1, label_smoothing_factor=0.2,
                                     per_device_train_batch_size=6, learning_rate=LR), mlp, data)
    model, theta = _init(mlp, trainer.args.member_seeds[0])
    trainer.train()
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    loss = F.cross_entropy(functional_call(model, params, (data.x,)), data.y, label_smoothing=0.2)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * grads[name], atol=1e-6, rtol=0)


# -- kind: a gradient quantity read while still loss-scaled ------------------------------------------------
def _sam_run(tmp_path, scaler=None, **kw):
    args = make_args(tmp_path, ensemble_method="sam", num_members=1, max_steps=1, per_device_train_batch_size=8,
                     rho=0.3, **kw)
    trainer = make_trainer(args, mlp, vector_data(n=8))
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # accelerate makes none on CPU: install one by hand
    trainer.train()
    return trainer, next(log for log in trainer.state.log_history if "loss" in log)


@pytest.mark.parametrize("max_grad_norm", [0.0, 100.0], ids=["no-clipping", "clipping"])
def test_logged_gradient_norms_are_unscaled_under_a_grad_scaler(tmp_path, max_grad_norm):
    plain, plain_log = _sam_run(tmp_path / "plain", max_grad_norm=max_grad_norm)
    scaled, scaled_log = _sam_run(tmp_path / "scaled", torch.amp.GradScaler("cpu", init_scale=1024.0),
                                  max_grad_norm=max_grad_norm)
    assert scaled_log["member_0_ascent_grad_norm"] == pytest.approx(plain_log["member_0_ascent_grad_norm"], rel=1e-5)
    assert scaled_log["grad_norm"] == pytest.approx(plain_log["grad_norm"], rel=1e-5)
    for a, b in zip(scaled.ensemble.parameters(), plain.ensemble.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- kind: a config combination that silently disables the method ------------------------------------------
def test_sharpbalance_that_would_never_score_is_refused(tmp_path):
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=3, max_steps=4,
                     per_device_train_batch_size=1)
    assert args.scoring_start_epoch == 1
    trainer = make_trainer(args, mlp, vector_data(n=10))  # 10 steps per epoch: the run ends at epoch 0.4
    with pytest.raises(ValueError, match=r"scoring_start_epoch=1 with max_steps=4") as err:
        trainer.train()
    assert trainer.state.global_step == 0 and "steps per epoch" in str(err.value).replace("optimizer steps", "steps")


def test_sharpbalance_with_masks_set_by_hand_may_stop_before_td(tmp_path):
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=3, max_steps=1,
                     per_device_train_batch_size=4)
    trainer = make_trainer(args, mlp, vector_data(n=8))
    trainer.set_sam_masks(torch.zeros(2, 8, dtype=torch.bool))
    trainer.train()
    assert trainer.state.global_step == 1


def test_sharpbalance_whose_top_k_sets_are_empty_is_refused(tmp_path):
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=2, sam_fraction=0.05)
    with pytest.raises(ValueError, match=r"sam_fraction=0.05 .* 10 training rows"):
        make_trainer(args, mlp, vector_data(n=10))  # floor(0.05 * 10) = 0: no member would ever use SAM


# -- kind: one fact, two homes (the ensemble's reduction) --------------------------------------------------
@pytest.mark.parametrize("reduction", ["logits", "probs"])
def test_evaluation_saved_model_and_card_agree_on_the_reduction(tmp_path, reduction):
    ev = vector_data(n=16, seed=4)
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=3, num_train_epochs=1,
                     ensemble_reduction=reduction)
    trainer = make_trainer(args, mlp, vector_data(n=12), eval_dataset=ev)  # ensemble built without reduction=
    assert trainer.ensemble.reduction == reduction
    metrics = trainer.evaluate()
    trainer.ensemble.save_pretrained(str(tmp_path / "saved"))
    loaded = EnsembleModel.from_pretrained(str(tmp_path / "saved"), factory=lambda _s: mlp())
    assert loaded.reduction == reduction
    with torch.no_grad():
        out = loaded(pixel_values=ev.x)
    expected = ensemble_metrics(out.member_logits, ev.y, reduction=reduction)
    assert metrics["eval_ensemble_accuracy"] == pytest.approx(expected["ensemble_accuracy"], abs=1e-12)
    assert metrics["eval_ensemble_nll"] == pytest.approx(expected["ensemble_nll"], abs=1e-6)
    assert float((out.logits.argmax(-1) == ev.y).double().mean()) == pytest.approx(expected["ensemble_accuracy"])
    card = (tmp_path / "saved" / "README.md").read_text()
    assert reduction in card and ("probs" if reduction == "logits" else "mean of logits") not in card


# -- what a user reads: eval_loss is the mean member loss ---------------------------------------------------
def test_eval_loss_is_the_mean_over_members_of_each_member_loss(tmp_path):
    ev = vector_data(n=7, seed=5)
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=3, num_train_epochs=1,
                     per_device_eval_batch_size=2)
    trainer = make_trainer(args, mlp, vector_data(n=12), eval_dataset=ev)
    trainer.train()
    metrics = trainer.evaluate()
    with torch.no_grad():
        losses = [F.cross_entropy(m(ev.x), ev.y) for m in trainer.ensemble.members]
    assert metrics["eval_loss"] == pytest.approx(float(sum(losses) / 3), abs=1e-6)


def test_prediction_loss_only_gives_the_same_eval_loss(tmp_path):
    ev = vector_data(n=7, seed=5)
    kw = dict(ensemble_method="deep_ensemble", num_members=2, num_train_epochs=1, per_device_eval_batch_size=2)
    full = make_trainer(make_args(tmp_path / "a", **kw), mlp, vector_data(n=12), eval_dataset=ev).evaluate()
    only = make_trainer(make_args(tmp_path / "b", prediction_loss_only=True, **kw), mlp, vector_data(n=12),
                        eval_dataset=ev).evaluate()
    assert only["eval_loss"] == pytest.approx(full["eval_loss"], abs=1e-7)
    assert "eval_ensemble_accuracy" not in only


# -- kind: the Trainer drops the columns a transform reads -------------------------------------------------
def _transformed_dataset():
    datasets = pytest.importorskip("datasets", reason="needs the `datasets` package")
    raw = datasets.Dataset.from_dict({"img": [[0.0] * 5, [1.0] * 5], "label": [0, 1]})

    def to_model(batch):
        return {"pixel_values": [torch.tensor(v) for v in batch["img"]], "labels": batch["label"]}

    return raw.with_transform(to_model)


@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_with_transform_dataset_and_remove_unused_columns_is_refused_at_construction(tmp_path, which):
    ds = _transformed_dataset()
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=1)
    assert args.remove_unused_columns
    kwargs = {"train_dataset": vector_data(n=4), which: ds}
    model = EnsembleModel.from_factory(lambda _s: mlp(), 1, args.member_seeds)
    with pytest.raises(ValueError, match=r"remove_unused_columns=True .* set remove_unused_columns=False"):
        SharpBalanceTrainer(model=model, args=args, **kwargs)


def test_with_transform_dataset_trains_with_remove_unused_columns_false(tmp_path):
    ds = _transformed_dataset()
    args = make_args(tmp_path, ensemble_method="deep_ensemble", num_members=1, remove_unused_columns=False,
                     per_device_train_batch_size=2, learning_rate=LR)
    trainer = make_trainer(args, mlp, ds)
    model, theta = _init(mlp, args.member_seeds[0])
    trainer.train()
    x, y = torch.tensor([[0.0] * 5, [1.0] * 5]), torch.tensor([0, 1])
    _, g = _grad(model, theta, x, y)
    for name, p in trainer.ensemble.members[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - LR * g[name], atol=1e-6, rtol=0)


# -- kind: a state guard keyed on class instead of on the state the forward mutates -------------------------
class HandBatchNorm(nn.Module):
    """A BatchNorm written by hand: running statistics updated in ``forward`` (not a torch _BatchNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mean)
                self.running_var.mul_(0.9).add_(0.1 * var)
                self.updates += 1
            return (x - mean) / torch.sqrt(var + 1e-5)
        return (x - self.running_mean) / torch.sqrt(self.running_var + 1e-5)


def _hand_bn_net():
    return nn.Sequential(nn.Linear(5, 6), HandBatchNorm(6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("method", ["sam", "sharpbalance"])
def test_sam_step_leaves_every_buffer_as_the_pass_at_theta_leaves_it(tmp_path, method):
    data = vector_data(n=8)
    kw = dict(scoring_start_epoch=0, sam_fraction=0.5) if method == "sharpbalance" else {}
    args = make_args(tmp_path, ensemble_method=method, num_members=1 if method == "sam" else 2, max_steps=1,
                     per_device_train_batch_size=8, rho=0.3, learning_rate=0.0, **kw)
    trainer = make_trainer(args, _hand_bn_net, data)
    reference = _init(_hand_bn_net, args.member_seeds[0])[0].train()
    perm = member_permutation(8, args.member_seeds[0], 0)
    trainer.train()
    if method == "sam":
        reference(data.x[perm])  # the one pass at θ (the perturbed pass must leave no trace)
    else:  # the passes at θ: S (the ascent), then N; scoring at Td = 0 runs in eval mode
        mask = trainer.sam_masks[0, perm]
        assert 0 < int(mask.sum()) < 8
        reference(data.x[perm[mask]])
        reference(data.x[perm[~mask]])
    for (name, got), want in zip(trainer.ensemble.members[0].named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(got, want), name


# ----------------------------------------------------------------------------- dataloader_drop_last


def test_drop_last_drops_training_rows_only_evaluation_and_prediction_keep_every_row(tmp_path):
    """transformers applies dataloader_drop_last to evaluation too: 10 rows at eval batch 4 would score 8 (or,
    with 3 rows, none and no metric at all). Ours: the same metrics and predictions as without it."""
    from helpers import image_data, small_cnn

    train, held = image_data(12, seed=0), image_data(10, seed=1)
    out = {}
    for drop in (False, True):
        args = make_args(tmp_path / str(drop), num_members=2, member_seeds=[0, 1], max_steps=2,
                         per_device_eval_batch_size=4, dataloader_drop_last=drop, ensemble_method="deep_ensemble")
        trainer = make_trainer(args, small_cnn, train)
        trainer.train()
        assert args.dataloader_drop_last is drop  # restored after building the loaders
        out[drop] = (trainer.evaluate(held), trainer.predict(held), trainer.evaluate(image_data(3, seed=2)))
    metrics = {k: v for k, v in out[True][0].items() if "runtime" not in k and "per_second" not in k}
    assert metrics == {k: v for k, v in out[False][0].items() if k in metrics} and "eval_ensemble_accuracy" in metrics
    assert out[True][1].label_ids.shape == (10,)
    for got, want in zip(out[True][1].predictions, out[False][1].predictions, strict=True):
        np.testing.assert_array_equal(got, want)
    assert out[True][2]["eval_ensemble_accuracy"] == out[False][2]["eval_ensemble_accuracy"]


@pytest.mark.parametrize("rows,batch,drop,norm,warned", [
    (17, 8, False, True, True),     # last batch 1 < 8/4, BatchNorm: warned
    (17, 8, True, True, False),     # dropped
    (18, 8, False, True, False),    # last batch 2 = 8/4: not under a quarter
    (17, 8, False, False, False),   # no BatchNorm
])
def test_small_last_batch_with_batchnorm_is_warned(tmp_path, caplog, rows, batch, drop, norm, warned):
    from helpers import image_data, small_cnn

    data = image_data(rows, shape=(3, 8, 8)) if norm else vector_data(rows)
    args = make_args(tmp_path, num_members=1, member_seeds=[0], max_steps=1, per_device_train_batch_size=batch,
                     dataloader_drop_last=drop, ensemble_method="deep_ensemble")
    trainer = make_trainer(args, small_cnn if norm else mlp, data)
    with caplog.at_level(logging.WARNING, logger="sbtrainer"):
        trainer.train()
    hits = [r.getMessage() for r in caplog.records if "Each epoch ends on a batch of" in r.getMessage()]
    assert bool(hits) is warned
    if warned:
        assert hits[0].startswith(f"Each epoch ends on a batch of {rows % batch} of {batch} rows ({rows} training rows)")
