"""`sbtrainer.sam.subset_sam_step` on a bare module (no Trainer), and `sbtrainer.scoring.score_members` reading rows once."""

import math

import torch
import torch.nn.functional as F
from helpers import mlp
from torch.func import functional_call
from torch.utils.data import Dataset

from sbtrainer.partition import partition, partition_statistics, sam_sets, top_k_masks
from sbtrainer.sam import sam_epsilon, subset_sam_step
from sbtrainer.scoring import batch_scores_loop, per_sample_sharpness, score_members

RHO = 0.3


def _member(seed=0):
    torch.manual_seed(seed)
    return mlp()


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 5, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _loss_of(member):
    return lambda batch, rows: F.cross_entropy(member(batch["pixel_values"]), batch["labels"])


def _grads(member, params, x, y):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(functional_call(member, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _sam_grads(member, params, x, y, rho):
    g = _grads(member, params, x, y)
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    return _grads(member, {k: params[k] + rho * g[k] / norm for k in params}, x, y)


def test_subset_step_equals_the_formula():
    member, batch = _member(), _data()
    mask = torch.tensor([True, False, True, True, False, False])
    theta = {k: v.detach().clone() for k, v in member.named_parameters()}
    result = subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 6)
    x, y = batch["pixel_values"], batch["labels"]
    g_s = _sam_grads(member, theta, x[mask], y[mask], RHO)
    g_n = _grads(member, theta, x[~mask], y[~mask])
    for name, p in member.named_parameters():
        torch.testing.assert_close(p.grad, 3 / 6 * g_s[name] + 3 / 6 * g_n[name], atol=1e-6, rtol=0)
        assert torch.equal(p.detach(), theta[name])  # weights restored bitwise
    full_loss = F.cross_entropy(functional_call(member, theta, (x,)), y)
    torch.testing.assert_close(result.loss, full_loss.detach(), atol=1e-6, rtol=0)
    assert result.sam_rows == 3 and result.ascent_norm is not None


def test_all_rows_in_s_is_sam_and_no_rows_or_rho_zero_is_plain():
    batch = _data()
    sam_member, plain_member, rho0_member = _member(), _member(), _member()
    subset_sam_step(sam_member, _loss_of(sam_member), batch, torch.ones(6, dtype=torch.bool), RHO, row_weight=1 / 6)
    res = subset_sam_step(plain_member, _loss_of(plain_member), batch, torch.zeros(6, dtype=torch.bool), RHO,
                          row_weight=1 / 6)
    subset_sam_step(rho0_member, _loss_of(rho0_member), batch, torch.ones(6, dtype=torch.bool), 0.0, row_weight=1 / 6)
    theta = {k: v.detach().clone() for k, v in _member().named_parameters()}
    g_sam = _sam_grads(_member(), theta, batch["pixel_values"], batch["labels"], RHO)
    g = _grads(_member(), theta, batch["pixel_values"], batch["labels"])
    for (name, a), b, c in zip(sam_member.named_parameters(), plain_member.parameters(), rho0_member.parameters()):
        torch.testing.assert_close(a.grad, g_sam[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(b.grad, g[name], atol=1e-6, rtol=0)
        assert torch.equal(b.grad, c.grad)  # rho = 0 is bitwise the plain pass
    assert res.ascent_norm is None and res.sam_rows == 0


def test_accumulated_grad_is_kept_apart_from_the_ascent_and_the_row_weight_scales():
    member, batch = _member(), _data()
    for p in member.parameters():
        p.grad = torch.full_like(p, 0.25)
    mask = torch.tensor([True, True, False, False, True, False])
    theta = {k: v.detach().clone() for k, v in member.named_parameters()}
    subset_sam_step(member, _loss_of(member), batch, mask, RHO, row_weight=1 / 12)  # the window has 12 rows
    x, y = batch["pixel_values"], batch["labels"]
    g_s, g_n = _sam_grads(member, theta, x[mask], y[mask], RHO), _grads(member, theta, x[~mask], y[~mask])
    for name, p in member.named_parameters():
        torch.testing.assert_close(p.grad, 0.25 + 3 / 12 * g_s[name] + 3 / 12 * g_n[name], atol=1e-6, rtol=0)


def test_seams_backward_unscale_and_ascent_rule():
    """A loss scale in `backward` leaves ε unchanged; `unscale` reports the true norm; a custom ascent is used."""
    batch, mask = _data(), torch.ones(6, dtype=torch.bool)
    ref, scaled = _member(), _member()
    r = subset_sam_step(ref, _loss_of(ref), batch, mask, RHO, row_weight=1 / 6)
    s = subset_sam_step(scaled, _loss_of(scaled), batch, mask, RHO, row_weight=1 / 6,
                        backward=lambda loss: (loss * 512.0).backward(), unscale=lambda v: v / 512.0)
    for a, b in zip(ref.parameters(), scaled.parameters()):
        torch.testing.assert_close(b.grad / 512.0, a.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.ascent_norm, r.ascent_norm, rtol=1e-6, atol=0)
    calls = []

    def no_ascent(params, grads, rho, adaptive):
        calls.append(rho)
        eps, norm, ok = sam_epsilon(params, grads, rho, adaptive)
        return [torch.zeros_like(e) for e in eps], norm, ok

    zero, plain = _member(), _member()
    subset_sam_step(zero, _loss_of(zero), batch, mask, RHO, row_weight=1 / 6, ascent=no_ascent)
    subset_sam_step(plain, _loss_of(plain), batch, torch.zeros(6, dtype=torch.bool), RHO, row_weight=1 / 6)
    assert calls == [RHO]
    for a, b in zip(zero.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=0)


class CountingDataset(Dataset):
    def __init__(self, n=10):
        self.data, self.reads = _data(n), 0

    def __len__(self):
        return len(self.data["labels"])

    def __getitem__(self, i):
        self.reads += 1
        return {k: v[i] for k, v in self.data.items()}


def test_score_members_reads_each_row_once_and_equals_per_member_scores():
    members = [_member(s) for s in range(3)]
    ds = CountingDataset(10)
    scores = score_members(members, ds, batch_size=4, method="loop", progress=False)
    assert ds.reads == 10 and scores.shape == (3, 10)
    for i, member in enumerate(members):
        torch.testing.assert_close(scores[i], batch_scores_loop(member, ds.data), rtol=1e-6, atol=0)
        torch.testing.assert_close(per_sample_sharpness(member, ds, batch_size=3, progress=False), scores[i],
                                   rtol=1e-5, atol=0)
    sub = score_members(members[1:], ds, rows=[7, 2, 5], batch_size=2, method="loop", progress=False)
    torch.testing.assert_close(sub, scores[1:, [7, 2, 5]], rtol=1e-6, atol=0)


def test_partition_is_top_k_then_sam_sets_and_statistics_use_both():
    scores = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4], [4, 1, 3, 2]])
    top = top_k_masks(scores, 0.5)
    masks = sam_sets(top)
    assert torch.equal(masks, partition(scores, 0.5))
    # T_0 = {0, 1}, T_1 = {2, 3}, T_2 = {0, 2}: D_0 = {0,2,3}, D_1 = {0,1,2}, D_2 = {0,1,2,3}
    assert masks.tolist() == [[True, False, True, True], [True, True, True, False], [True, True, True, True]]
    stats = partition_statistics(scores, top, masks)
    assert stats["scoring/member_2_sam_set_fraction"] == 1.0
    # Jaccard: (0,1) 0, (0,2) 1/3, (1,2) 1/3
    assert abs(stats["scoring/top_k_pairwise_jaccard"] - (2 / 3) / 3) < 1e-12
