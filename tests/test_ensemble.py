"""`sbtrainer.ensemble`: shapes, the two reductions, the summed member loss, seeded building, errors, inputs."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TokenDataset, mlp, tiny_albert_factory
from torch import nn

from sbtrainer.ensemble import EnsembleModel, reduce_member_logits


def _ensemble(m=3, **kw):
    return EnsembleModel.from_factory(lambda _s: mlp(dim=5, classes=3), m, **kw)


def test_forward_shapes_and_member_logits():
    ens = _ensemble(3).eval()
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    out = ens(pixel_values=x)
    assert out.loss is None
    assert out.logits.shape == (5, 3) and out.member_logits.shape == (5, 3, 3)
    for i in range(3):
        assert torch.equal(out.member_logits[:, i], ens.members[i](x))
    torch.testing.assert_close(out.logits, out.member_logits.mean(dim=1), rtol=0, atol=0)
    assert ens.num_members == 3


def test_reduce_logits_hand_computed():
    """Two members, two classes: the mean of the logits."""
    member_logits = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (B=1, m=2, C=2)
    assert torch.equal(reduce_member_logits(member_logits, "logits"), torch.tensor([[2.0, -1.0]]))


def test_reduce_probs_hand_computed():
    """Member probabilities (1/2, 1/2) and (3/4, 1/4): the ensemble's are (5/8, 3/8), returned as logs."""
    member_logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    out = reduce_member_logits(member_logits, "probs")
    torch.testing.assert_close(out, torch.tensor([[math.log(0.625), math.log(0.375)]]), rtol=0, atol=1e-7)


def test_reduce_probs_softmax_is_mean_of_member_softmaxes():
    member_logits = 4 * torch.randn(7, 4, 6, generator=torch.Generator().manual_seed(1))
    out = reduce_member_logits(member_logits, "probs")
    assert out.shape == (7, 6)
    torch.testing.assert_close(out.softmax(-1), member_logits.softmax(-1).mean(dim=1), rtol=0, atol=1e-6)
    # the result is already normalised: log-probabilities, logsumexp = 0
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(7), rtol=0, atol=1e-6)


def test_probs_reduction_through_forward():
    ens = _ensemble(2, reduction="probs").eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    out = ens(pixel_values=x)
    probs = torch.stack([ens.members[i](x).softmax(-1) for i in range(2)]).mean(0)
    torch.testing.assert_close(out.logits.softmax(-1), probs, rtol=0, atol=1e-6)


def test_loss_is_sum_of_member_mean_cross_entropies():
    """Hand-computed: members with fixed logits, loss = sum_i mean_b -log softmax(z_ib)[y_b]."""
    ens = _ensemble(2).eval()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 0, 1])
    out = ens(pixel_values=x, labels=labels)
    expected = 0.0
    for i in range(2):
        z = ens.members[i](x).detach().double()
        log_p = z - torch.log(torch.exp(z).sum(-1, keepdim=True))
        expected += float(-log_p[torch.arange(3), labels].mean())
    assert out.loss.shape == ()
    assert abs(out.loss.item() - expected) < 1e-6
    # and each member gets exactly its own gradient: d loss / d theta_i = d CE_i / d theta_i
    out.loss.backward()
    for i in range(2):
        member = ens.members[i]
        own = torch.autograd.grad(F.cross_entropy(member(x), labels), list(member.parameters()))
        for p, g in zip(member.parameters(), own, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-7)


def test_loss_hand_values():
    """Constant members: logits (0, 0) give CE log 2; logits (log 3, 0) with label 0 give log(4/3)."""

    class Const(nn.Module):
        def __init__(self, row):
            super().__init__()
            self.row = torch.tensor(row)

        def forward(self, x):
            return self.row.expand(x.shape[0], -1)

    ens = EnsembleModel([Const([0.0, 0.0]), Const([math.log(3.0), 0.0])])
    out = ens(pixel_values=torch.zeros(2, 1), labels=torch.tensor([0, 0]))
    assert abs(out.loss.item() - (math.log(2.0) + math.log(4.0 / 3.0))) < 1e-6


def test_from_factory_seeds_each_member():
    seeds = [4, 11, 4]
    draws = []

    def factory(seed):
        draws.append((seed, random.random(), float(np.random.rand())))
        return mlp(dim=5, classes=3, dropout=0.1)

    ens = EnsembleModel.from_factory(factory, 3, seeds=seeds)
    assert ens.seeds == seeds and ens.num_members == 3
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        ref = mlp(dim=5, classes=3, dropout=0.1)
        for a, b in zip(ens.members[i].state_dict().values(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert draws[i] == (seed, random.Random(seed).random(), float(np.random.RandomState(seed).rand()))
    assert not torch.equal(ens.members[0][0].weight, ens.members[1][0].weight)
    assert torch.equal(ens.members[0][0].weight, ens.members[2][0].weight)  # same seed, same init
    assert _ensemble(2).seeds == [0, 1]  # default seeds range(num_members)
    assert EnsembleModel([mlp()]).seeds is None


def test_errors():
    with pytest.raises(ValueError, match=r"EnsembleModel.members must hold at least one module; got 0"):
        EnsembleModel([])
    with pytest.raises(ValueError, match=r"EnsembleModel.reduction must be one of \('logits', 'probs'\); got 'mean'"):
        EnsembleModel([mlp()], reduction="mean")
    with pytest.raises(ValueError, match=r"EnsembleModel.seeds must have one seed per member \(2\); got \[1\]"):
        EnsembleModel([mlp(), mlp()], seeds=[1])
    with pytest.raises(ValueError, match=r"from_factory: seeds must have num_members=3 entries; got \[0, 1\]"):
        EnsembleModel.from_factory(lambda s: mlp(), 3, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"reduction must be one of \('logits', 'probs'\); got 'max'"):
        reduce_member_logits(torch.zeros(1, 2, 3), "max")
    with pytest.raises(KeyError, match=r"no input column 'pixel_values'"):
        _ensemble(1)(input_ids=torch.zeros(1, 5))


ALBERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"]


def test_input_names_plain_hf_and_mixed():
    assert _ensemble(2).input_names() == ["pixel_values"]
    assert EnsembleModel([mlp()], input_name="features").input_names() == ["features"]
    albert = tiny_albert_factory()
    names = EnsembleModel([albert(), albert()]).input_names()
    assert names[:3] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "labels" not in names and len(names) == len(set(names))
    assert set(ALBERT_INPUTS) <= set(names)
    mixed = EnsembleModel([mlp(), albert()]).input_names()
    assert mixed == ["pixel_values", *names]


def test_member_forward_ignores_extra_columns():
    ens = _ensemble(2).eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    batch = {"pixel_values": x, "labels": torch.zeros(4, dtype=torch.long), "sample_index": torch.arange(4),
             "member_index": torch.zeros(4, dtype=torch.long), "input_ids": torch.zeros(4, 3), "note": "x"}
    for i in range(2):
        assert torch.equal(ens.member_forward(i, batch), ens.members[i](x))


def test_hf_member_forward_and_loss():
    torch.manual_seed(0)
    albert = tiny_albert_factory(dropout=0.0)
    ens = EnsembleModel([albert(), albert()]).eval()
    rows = [TokenDataset(n=4)[j] for j in range(4)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch.update(sample_index=torch.arange(4), member_index=torch.zeros(4, dtype=torch.long), note="x")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        refs = [ens.members[i](**inputs).logits for i in range(2)]
        for i in range(2):
            assert torch.equal(ens.member_forward(i, batch), refs[i])
        out = ens(**{k: v for k, v in batch.items() if k != "note"})
    assert out.member_logits.shape == (4, 2, 3) and out.logits.shape == (4, 3)
    expected = sum(F.cross_entropy(r, batch["labels"]) for r in refs)
    assert abs(out.loss.item() - expected.item()) < 1e-6
    assert not torch.equal(refs[0], refs[1])  # two inits, two members
