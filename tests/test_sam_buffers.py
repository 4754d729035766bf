"""After a SAM / subset-SAM step every buffer is bitwise what the passes at theta leave, whatever class holds it.

SAM steps are built from sam.py's parts on bare modules (no Trainer): ascent at theta, ``sam_epsilon``, the
perturbed pass under ``frozen_buffers``, descent. The references run the same forwards at theta on a copy.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DictDataset
from torch import nn

from sbtrainer.sam import frozen_buffers, frozen_norm_stats, perturbed, sam_epsilon, single_sample_norm_eval
from sbtrainer.scoring import per_sample_sharpness


class HandBatchNorm(nn.Module):
    """A hand-written BatchNorm1d: batch statistics in training mode, running buffers updated in ``forward``.

    ``reassign=True`` updates by rebinding the attribute (``self.running_mean = ...``) instead of in place.
    """

    def __init__(self, c: int, reassign: bool = False, dropout: float = 0.0, momentum: float = 0.1) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.drop = nn.Dropout(dropout)
        self.reassign, self.momentum, self.eps = reassign, momentum, 1e-5

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                m = self.momentum
                if self.reassign:
                    self.running_mean = (1 - m) * self.running_mean + m * mean
                    self.running_var = (1 - m) * self.running_var + m * var
                    self.seen = self.seen + 1
                else:
                    self.running_mean.mul_(1 - m).add_(m * mean)
                    self.running_var.mul_(1 - m).add_(m * var)
                    self.seen.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        return self.drop((x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias)


class StepCounter(nn.Module):
    """Counts its calls (int64) and keeps a float64 running maximum of |x|, in every mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("peak", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            self.calls.add_(1)
            self.peak.copy_(torch.maximum(self.peak, x.abs().max().double()))
        return x


MEMBERS = {
    "hand_bn_inplace": lambda: nn.Sequential(nn.Linear(5, 6), HandBatchNorm(6), nn.Tanh(), nn.Linear(6, 3)),
    "hand_bn_reassign": lambda: nn.Sequential(nn.Linear(5, 6), HandBatchNorm(6, reassign=True), nn.Tanh(),
                                              nn.Linear(6, 3)),
    "torch_bn": lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)),
    "step_counter": lambda: nn.Sequential(nn.Linear(5, 6), StepCounter(), nn.Tanh(), nn.Linear(6, 3)),
}


def _rows(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def _sam_step(member: nn.Module, x, y, sam_rows, guard=frozen_buffers, rho: float = 0.5, lr: float = 0.1) -> None:
    """One SAM step on ``x[sam_rows]`` plus a plain pass on the other rows (subset-SAM when not all rows)."""
    params = [p for p in member.parameters() if p.requires_grad]
    s = torch.zeros(len(y), dtype=torch.bool)
    s[sam_rows] = True
    ascent = torch.autograd.grad(F.cross_entropy(member(x[s]), y[s]), params)  # at theta: updates the state
    eps, _, ok = sam_epsilon(params, list(ascent), rho)
    assert ok
    with perturbed(params, eps), guard(member):
        descent = torch.autograd.grad(F.cross_entropy(member(x[s]), y[s]), params)  # at theta + eps
    if (~s).any():
        plain = torch.autograd.grad(F.cross_entropy(member(x[~s]), y[~s]), params)  # at theta: updates the state
        descent = [(s.sum() * d + (~s).sum() * q) / len(y) for d, q in zip(descent, plain)]
    with torch.no_grad():
        for p, d in zip(params, descent):
            p.sub_(lr * d)


def _reference_buffers(member: nn.Module, x, y, sam_rows) -> dict[str, torch.Tensor]:
    """The buffers after the passes at theta alone: S rows, then the other rows (if any)."""
    ref = copy.deepcopy(member)
    s = torch.zeros(len(y), dtype=torch.bool)
    s[sam_rows] = True
    with torch.no_grad():
        ref(x[s])
        if (~s).any():
            ref(x[~s])
    return dict(ref.named_buffers())


def _assert_bitwise(member: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = dict(member.named_buffers())
    assert got.keys() == expected.keys()
    for name, buf in got.items():
        assert buf.dtype == expected[name].dtype, name
        assert torch.equal(buf, expected[name]), (name, buf, expected[name])


@pytest.mark.parametrize("sam_rows", [list(range(8)), [0, 3, 4, 7]], ids=["sam", "subset_sam"])
@pytest.mark.parametrize("kind", sorted(MEMBERS))
def test_sam_step_leaves_every_buffer_as_the_passes_at_theta(kind, sam_rows):
    torch.manual_seed(0)
    member = MEMBERS[kind]().train()
    x, y = _rows()
    expected = _reference_buffers(member, x, y, sam_rows)
    unguarded = copy.deepcopy(member)
    _sam_step(member, x, y, sam_rows)
    _assert_bitwise(member, expected)
    # The test is sensitive: without the guard the perturbed pass changes the state a second time.
    _sam_step(unguarded, x, y, sam_rows, guard=lambda m: contextlib.nullcontext())
    assert any(not torch.equal(b, expected[n]) for n, b in unguarded.named_buffers())


def test_hand_written_batchnorm_error_without_the_guard_and_old_name():
    """``frozen_norm_stats`` (the trainer's name) is ``frozen_buffers``; unguarded, the running mean is off by > 1e-2."""
    assert frozen_norm_stats is frozen_buffers
    torch.manual_seed(0)
    member = MEMBERS["hand_bn_inplace"]().train()
    x, y = _rows()
    expected = _reference_buffers(member, x, y, range(8))
    unguarded = copy.deepcopy(member)
    _sam_step(member, x, y, range(8), guard=frozen_norm_stats)
    _assert_bitwise(member, expected)
    _sam_step(unguarded, x, y, range(8), guard=lambda m: contextlib.nullcontext())
    off = (unguarded[1].running_mean - expected["1.running_mean"]).abs().max().item()
    assert off > 1e-2 and unguarded[1].seen.item() == 2


def test_frozen_buffers_undoes_reassignment_and_new_buffers():
    """A rebound buffer gets its original tensor object back; a buffer registered inside the block is removed."""
    bn = HandBatchNorm(3, reassign=True).train()
    original, value = bn.running_mean, bn.running_mean.clone()
    with frozen_buffers(bn):
        bn(torch.randn(4, 3))
        bn.register_buffer("extra", torch.ones(2), persistent=False)
        assert bn.running_mean is not original
    assert bn.running_mean is original and torch.equal(original, value)
    assert "extra" not in dict(bn.named_buffers()) and "extra" not in bn._non_persistent_buffers_set


class PositionTable(nn.Module):
    """Like an HF embeddings module: an int64 ``position_ids`` and a non-persistent float cache, and functional
    dropout keyed on ``self.training``. Neither buffer holds data statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("position_ids", torch.arange(4).unsqueeze(0), persistent=False)
        self.register_buffer("inv_freq", torch.ones(3), persistent=False)

    def forward(self, x):
        return F.dropout(x, 0.5, training=self.training)


def test_single_sample_norm_eval_switches_by_state_not_class():
    torch.manual_seed(0)
    hand = HandBatchNorm(64, dropout=0.5).train()
    torch_bn = nn.BatchNorm1d(64).train()
    table = PositionTable().train()
    member = nn.Sequential(hand, torch_bn, table).train()
    with torch.no_grad():
        hand(torch.randn(32, 64) * 3 + 2)  # non-trivial running statistics
        torch_bn(torch.randn(32, 64) * 3 + 2)
    before = {n: b.clone() for n, b in member.named_buffers()}
    one = torch.randn(1, 64)
    with single_sample_norm_eval(member):
        assert not hand.training and not torch_bn.training  # own running statistics: switched
        assert hand.drop.training  # its Dropout child keeps train mode (not recursive)
        assert table.training and member.training  # index tables / caches only, or no buffers: untouched
        out = hand(one)
        torch_bn(one)  # in train mode a 1-sample BatchNorm1d raises "Expected more than 1 value per channel"
    normed = (one - before["0.running_mean"]) / torch.sqrt(before["0.running_var"] + hand.eps)
    kept = out != 0
    assert (~kept).any() and kept.any()  # dropout really ran
    torch.testing.assert_close(out[kept], 2 * normed[kept], rtol=1e-6, atol=1e-6)  # running stats, 1/(1-p) scale
    assert all(torch.equal(b, before[n]) for n, b in member.named_buffers())  # no statistics update
    assert hand.training and torch_bn.training and hand.drop.training  # flags restored


def test_scoring_leaves_the_member_state_untouched():
    """Scoring runs forwards (loop: one per row); a forward that updates state in eval mode leaves no trace."""
    torch.manual_seed(0)
    member = MEMBERS["step_counter"]()
    g = torch.Generator().manual_seed(1)
    data = DictDataset(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    before = {n: b.clone() for n, b in member.named_buffers()}
    per_sample_sharpness(member, data, batch_size=4, method="loop", progress=False)
    assert member[1].calls.item() == 0 and member[1].peak.item() == 0.0
    assert all(torch.equal(b, before[n]) for n, b in member.named_buffers())
