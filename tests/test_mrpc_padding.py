"""Dynamic padding in the MRPC recipe: each batch padded to its longest pair gives the run padded to
``max_seq_length`` (same SharpBalance scores and masks, same trained weights, same validation metrics, same
sharpness), with dropout off so both runs draw no random masks of different shapes. CPU, offline, data made here."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import make_args
from transformers import AlbertForSequenceClassification

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.metrics import make_compute_metrics
from sbtrainer.sharpness import sample_batches, worst_case_sharpness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import albert_mrpc

MAX_LEN = 40


def _pairs(n: int, seed: int) -> datasets.Dataset:
    """Sentence pairs of 2 to 12 words each (so batches differ in length), label 1 when they share a prefix."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    s1, s2, y = [], [], []
    for _ in range(n):
        a = list(rng.choice(words, int(rng.integers(2, 13))))
        label = int(rng.integers(0, 2))
        b = a[:2] + list(rng.choice(words, int(rng.integers(0, 10)))) if label else list(rng.choice(words, 5))
        s1.append(" ".join(a))
        s2.append(" ".join(b))
        y.append(label)
    return datasets.Dataset.from_dict({"sentence1": s1, "sentence2": s2, "label": y})


@pytest.fixture(scope="module")
def raw() -> datasets.DatasetDict:
    return datasets.DatasetDict(train=_pairs(32, 0), validation=_pairs(12, 1))


def _run(tmp_path: Path, raw: datasets.DatasetDict, pad: bool) -> dict:
    tokenizer = albert_mrpc.tiny_tokenizer(list(raw["train"]["sentence1"]) + list(raw["train"]["sentence2"]))
    data = albert_mrpc.tokenize(raw, tokenizer, MAX_LEN, pad)
    collate = albert_mrpc.collator(tokenizer, pad)
    config = albert_mrpc.tiny_albert_config(len(tokenizer), MAX_LEN, tokenizer.pad_token_id)
    config.update({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.0})
    args = make_args(tmp_path / f"pad{pad}", ensemble_method="sharpbalance", num_members=2, member_seeds=[3, 4],
                     num_train_epochs=3, scoring_start_epoch=1, rho=0.05, sam_fraction=0.5, learning_rate=0.05,
                     per_device_train_batch_size=8, per_device_eval_batch_size=5)
    model = EnsembleModel.from_factory(lambda _seed: AlbertForSequenceClassification(config), 2, [3, 4],
                                       input_name="input_ids")
    trainer = SharpBalanceTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                                  data_collator=collate, compute_metrics=make_compute_metrics())
    trainer.train()
    sharp = worst_case_sharpness(trainer.ensemble.members[0], data["train"], input_name="input_ids", batch_size=5,
                                 num_batches=3, steps=3, collate_fn=collate, disable_tqdm=True)
    widths = [b["input_ids"].shape[1] for b in sample_batches(data["train"], 5, 3, torch.Generator().manual_seed(0),
                                                              collate)]
    return {"scores": trainer.sample_scores, "masks": trainer.sam_masks, "metrics": trainer.evaluate(),
            "params": [p.detach().clone() for p in trainer.ensemble.parameters()], "sharpness": sharp.value,
            "widths": widths}


def test_batches_padded_to_their_longest_pair_train_like_max_length_padding(tmp_path, raw):
    dynamic, fixed = _run(tmp_path, raw, pad=False), _run(tmp_path, raw, pad=True)
    assert set(fixed["widths"]) == {MAX_LEN} and max(dynamic["widths"]) < MAX_LEN  # the padding really differs
    torch.testing.assert_close(dynamic["scores"], fixed["scores"], rtol=1e-4, atol=1e-6)
    assert torch.equal(dynamic["masks"], fixed["masks"]) and 0 < dynamic["masks"].float().mean() < 1
    for a, b in zip(dynamic["params"], fixed["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key in ("eval_ensemble_accuracy", "eval_member_accuracy", "eval_der"):
        assert dynamic["metrics"][key] == fixed["metrics"][key]
    for key in ("eval_ensemble_nll", "eval_variance", "eval_kl"):
        assert dynamic["metrics"][key] == pytest.approx(fixed["metrics"][key], rel=1e-4, abs=1e-7)
    assert dynamic["sharpness"] == pytest.approx(fixed["sharpness"], rel=1e-4, abs=1e-7)
    assert dynamic["sharpness"] > 0


def test_tokenize_leaves_pairs_unpadded_unless_asked(raw):
    tokenizer = albert_mrpc.tiny_tokenizer(list(raw["train"]["sentence1"]) + list(raw["train"]["sentence2"]))
    ragged = albert_mrpc.tokenize(raw, tokenizer, MAX_LEN, pad_to_max_length=False)["train"]
    padded = albert_mrpc.tokenize(raw, tokenizer, MAX_LEN, pad_to_max_length=True)["train"]
    lengths = [len(ids) for ids in ragged["input_ids"]]
    assert len(set(lengths)) > 1 and {len(ids) for ids in padded["input_ids"]} == {MAX_LEN}
    first = ragged[0]
    assert padded[0]["input_ids"][: lengths[0]] == first["input_ids"]
    assert set(padded[0]["input_ids"][lengths[0]:]) <= {tokenizer.pad_token_id}
    rows = [ragged[i] for i in range(4)]
    batch = albert_mrpc.collator(tokenizer, False)(rows)
    assert batch["input_ids"].shape == (4, max(lengths[:4])) and batch["labels"].tolist() == ragged["labels"][:4]
    assert batch["attention_mask"].sum(1).tolist() == lengths[:4]
