"""score_method='hooks' decides exactness by structure: a parameter with more than one use per forward is refused.

Every refused member is scored by 'auto' through its fallback and equals a naive per-sample backward; the relative
errors in the comments are what the hooks method returned for that member before the structural checks.
"""

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from helpers import DictDataset, image_data, small_cnn
from torch import nn
from torch.nn.utils import parametrize

import sbtrainer.scoring as scoring
from sbtrainer.scoring import per_sample_sharpness


def naive_scores(model: nn.Module, data: DictDataset, loss_fn=F.cross_entropy) -> torch.Tensor:
    """||grad||^2 per row from one ordinary backward per row (unique parameters, eval mode)."""
    model.eval()
    out = []
    for i in range(len(data)):
        model.zero_grad()
        loss_fn(model(data.x[i : i + 1]), data.y[i : i + 1]).backward()
        out.append(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None).item())
    model.zero_grad()
    return torch.tensor(out)


class SharedMLP(nn.Module):
    """Two Linear layers holding ONE weight (``b.weight = a.weight``): before, hooks were 14.6% off the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


class FunctionalReuse(nn.Module):
    """``a.weight`` used by ``a`` and again by ``F.linear``: before, 35% off."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(F.linear(h, self.a.weight)))


class FunctionalOnly(nn.Module):
    """``proj`` is never called; its weights are used by ``F.linear`` (as MultiheadAttention does): before, 82% off."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.proj = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.a(x)), self.proj.weight, self.proj.bias)


class BroadcastBranch(nn.Module):
    """A learned branch applied to a (1, 4) constant and broadcast over the batch: before, 31% off."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pos, self.head = nn.Linear(6, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("code", torch.randn(1, 4))

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) + self.pos(self.code)))


class BatchNormAct(nn.BatchNorm1d):
    """A BatchNorm subclass that also applies its activation (like timm's BatchNormAct2d): before, 16% off."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def pruned_mlp() -> nn.Module:
    """``weight = weight_orig * weight_mask`` recomputed by a forward pre-hook: before, 47% off."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    return model


def parametrized_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    parametrize.register_parametrization(model[0], "weight", _Symmetric())
    return model


def bn_act_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), BatchNormAct(6), nn.Linear(6, 3))
    with torch.no_grad():
        model(torch.randn(16, 6) * 2 + 1)  # non-trivial running statistics
    return model


REFUSED = {  # member -> what the NotImplementedError says
    "shared_weight": (SharedMLP, "shared by a.weight and b.weight"),
    "called_twice": (CalledTwice, "called twice"),
    "pruned": (pruned_mlp, "computes its weight from other tensors"),
    "functional_reuse": (FunctionalReuse, "a.weight gets gradient from 2 uses"),
    "functional_only": (FunctionalOnly, "proj.weight gets gradient outside its module"),
    "parametrized": (parametrized_mlp, "computes its weight from other tensors"),
    "bn_subclass_forward": (bn_act_mlp, "overrides torch's forward"),
    "broadcast_branch": (BroadcastBranch, "leading dimension of \\(1,\\)"),
}


def _vector_rows(n: int = 9, seed: int = 1) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.fixture
def calls(monkeypatch):
    """Count the batches each scoring path returned: ``hooks`` (successful) and ``vmap`` (attempted)."""
    counts = {"hooks": 0, "vmap": 0}
    real_hooks, real_vmap = scoring.batch_scores_hooks, scoring.batch_scores_vmap

    def hooks(*args, **kw):
        out = real_hooks(*args, **kw)
        counts["hooks"] += 1
        return out

    def vmap(*args, **kw):
        counts["vmap"] += 1
        return real_vmap(*args, **kw)

    monkeypatch.setattr(scoring, "batch_scores_hooks", hooks)
    monkeypatch.setattr(scoring, "batch_scores_vmap", vmap)
    return counts


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hooks_refuses_by_structure_and_auto_equals_loop(case, calls):
    build, message = REFUSED[case]
    torch.manual_seed(0)
    model, data = build(), _vector_rows()
    expected = naive_scores(model, data)
    with pytest.raises(NotImplementedError, match=message):
        per_sample_sharpness(model, data, batch_size=4, method="hooks", progress=False)
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert calls["hooks"] == 0 and calls["vmap"] >= 1  # refused on the first batch, before any sampled check


def test_shared_weight_refused_without_the_sampled_check():
    """The refusal is structural: with the 2-sample comparison off ('auto-hooks', verify=0) auto still falls back."""
    torch.manual_seed(0)
    model, data = SharedMLP(), _vector_rows(n=4)
    batch = {"pixel_values": data.x, "labels": data.y}
    model.eval()
    got, method = scoring._score_batch(model, batch, "auto-hooks", "pixel_values", F.cross_entropy)
    assert method == "auto-vmap"
    torch.testing.assert_close(got, naive_scores(model, data), rtol=1e-5, atol=1e-10)


class DetachedBranch(nn.Module):
    """A branch whose input does not depend on x (``x.detach()``): its output gradient never reached the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.side, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) + self.side(x.detach() ** 2)))


def test_branch_off_the_input_path_is_scored_exactly_by_hooks(calls):
    """Before: the ``side`` layer's share was silently dropped (55% off); now hooks itself is exact."""
    torch.manual_seed(0)
    model, data = DetachedBranch(), _vector_rows()
    got = per_sample_sharpness(model, data, batch_size=4, method="hooks", progress=False)
    torch.testing.assert_close(got, naive_scores(model, data), rtol=1e-5, atol=1e-10)
    assert calls == {"hooks": 3, "vmap": 0}


def test_custom_loss_is_summed_per_row_not_rescaled():
    """A sum-reduced loss_fn: before, hooks multiplied it by B, giving B^2 = 16x the loop's scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    data = _vector_rows(n=8)

    def summed(logits, y):
        return F.cross_entropy(logits, y, reduction="sum")

    got = per_sample_sharpness(model, data, batch_size=4, method="hooks", loss_fn=summed, progress=False)
    torch.testing.assert_close(got, naive_scores(model, data, summed), rtol=1e-5, atol=1e-10)


def test_batchnorm_cnn_takes_the_hooks_path(calls):
    """A plain Conv/BatchNorm/Linear member passes every structural check: hooks on every batch, no fallback."""
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8) * 2 + 1)  # non-trivial running statistics
    data = image_data(n=10)
    expected = naive_scores(model, data)
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert calls == {"hooks": 3, "vmap": 0}


class SometimesTwice(nn.Module):
    """Calls ``a`` a second time only for batches holding a row with x[0] > 2.5 (data-dependent structure)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool((x[:, 0] > 2.5).any()):
            h = torch.tanh(self.a(h))
        return self.head(h)


def test_auto_falls_back_when_a_later_batch_fails_the_structure(calls):
    """Batch 1 passes (hooks), batch 2 calls ``a`` twice: auto falls back from there instead of raising."""
    torch.manual_seed(0)
    model, data = SometimesTwice(), _vector_rows(n=8)
    data.x[:4, 0] = 0.0
    data.x[6, 0] = 3.0
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, naive_scores(model, data), rtol=1e-5, atol=1e-10)
    assert calls["hooks"] == 1 and calls["vmap"] == 1  # vmap refuses the data-dependent branch; the loop scores it
