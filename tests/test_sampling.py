"""`sbtrainer.sampling`: the order, augmentation and dropout streams of each member.

Every stream depends only on (member seed, epoch or step, row), never on the other members or on what
was fetched before: member ``i`` of an m-member run sees exactly what a 1-member run with seed ``seed_i``
sees. The m-vs-1 equality of whole training runs (dropout and augmentation on) is in
``test_equivalences.py``; here each stream is checked on its own, against the seed it must be drawn under.
"""

import random

import numpy as np
import pytest
import torch
from helpers import image_data, make_args, make_trainer, random_crop_flip
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sbtrainer.sampling import (
    TAG_AUGMENT,
    TAG_DROPOUT,
    TAG_ORDER,
    MemberBatchSampler,
    MemberStreamDataset,
    SeededRowsDataset,
    member_permutation,
    mix_seed,
)

SEEDS = [5, 6, 7]


# -- mix_seed ----------------------------------------------------------------------------------------
def test_mix_seed_pinned_values():
    """Values computed once; a change would silently change every stream (and break resuming old runs)."""
    assert mix_seed(1, 2, 3) == 2623250113353451629
    assert mix_seed(5, 0, TAG_ORDER) == 1364955043045171637
    assert mix_seed(-1) == 6514504133438201533
    # One value: the splitmix64 step of state 2 * golden, i.e. splitmix64's second output from seed 0
    # (0x6E789E6AA1B965F4, the published reference sequence), shifted to 63 bits.
    assert mix_seed(0) == 0x6E789E6AA1B965F4 >> 1 == 3980143261097177850
    assert mix_seed() == 0x9E3779B97F4A7C15 >> 1


def test_mix_seed_range_and_sensitivity():
    values = [mix_seed(s, e, r, t) for s in range(4) for e in range(3) for r in range(5) for t in (TAG_ORDER, TAG_AUGMENT)]
    assert all(0 <= v < 2**63 for v in values)
    assert len(set(values)) == len(values)  # 120 distinct inputs, 120 distinct seeds
    assert mix_seed(1, 2) != mix_seed(2, 1)  # order matters
    assert mix_seed(3, 0) != mix_seed(3)  # a trailing zero matters
    assert mix_seed(2**64 + 7) == mix_seed(7)  # values are taken mod 2**64


# -- the order stream ---------------------------------------------------------------------------------
def test_member_permutation_is_a_seeded_permutation():
    perm = member_permutation(11, seed=5, epoch=2)
    assert perm.dtype == torch.int64 and perm.shape == (11,)
    assert torch.equal(perm.sort().values, torch.arange(11))
    assert torch.equal(perm, member_permutation(11, 5, 2))
    gen = torch.Generator().manual_seed(mix_seed(5, 2, TAG_ORDER))
    assert torch.equal(perm, torch.randperm(11, generator=gen))
    # differs across epochs and seeds (the chance of two equal permutations of 11 rows is 1/11!)
    assert not torch.equal(perm, member_permutation(11, 5, 3))
    assert not torch.equal(perm, member_permutation(11, 6, 2))


def test_member_permutation_does_not_touch_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    member_permutation(50, 1, 0)
    assert torch.equal(torch.get_rng_state(), state)


def _steps(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batch_sampler_layout_and_coverage():
    """N=10 rows, B=4, 3 members: 3 steps of 4+4+4 keys, the last one 2+2+2, member-major, in permutation order."""
    sampler = MemberBatchSampler(10, 4, SEEDS)
    assert len(sampler) == 3 and sampler.batch_size is None and sampler.member_batch_size == 4
    for epoch in (0, 1):
        steps = _steps(sampler, epoch)
        assert [len(s) for s in steps] == [12, 12, 6]
        for keys in steps:
            per = len(keys) // 3
            assert [k[0] for k in keys] == [0] * per + [1] * per + [2] * per
            assert {k[1] for k in keys} == {epoch}
        for i, seed in enumerate(SEEDS):
            rows = [r for keys in steps for (m, _, r) in keys if m == i]
            assert rows == member_permutation(10, seed, epoch).tolist()  # each row once, in the member's order
            for step in range(3):
                assert [r for (m, _, r) in steps[step] if m == i] == sampler.member_rows(i, epoch, step).tolist()
    assert _steps(sampler, 0) != _steps(sampler, 1)


def test_batch_sampler_drop_last():
    sampler = MemberBatchSampler(10, 4, SEEDS, drop_last=True)
    assert len(sampler) == 2
    steps = _steps(sampler, 3)
    assert [len(s) for s in steps] == [12, 12]
    for i, seed in enumerate(SEEDS):
        rows = [r for keys in steps for (m, _, r) in keys if m == i]
        assert rows == member_permutation(10, seed, 3).tolist()[:8]
    assert len(MemberBatchSampler(12, 4, SEEDS, drop_last=True)) == len(MemberBatchSampler(12, 4, SEEDS)) == 3
    assert len(MemberBatchSampler(3, 4, SEEDS)) == 1 and len(MemberBatchSampler(3, 4, SEEDS, drop_last=True)) == 0


def test_batch_sampler_member_equals_single_member_sampler():
    """m-vs-1 at the sampler level: member i's keys are those of a 1-member sampler with seed_i."""
    many = MemberBatchSampler(10, 4, SEEDS)
    for epoch in range(3):
        steps = _steps(many, epoch)
        for i, seed in enumerate(SEEDS):
            single = _steps(MemberBatchSampler(10, 4, [seed]), epoch)
            mine = [[(0, e, r) for (m, e, r) in keys if m == i] for keys in steps]
            assert mine == single


@pytest.mark.parametrize(("rows", "batch"), [(0, 4), (10, 0)])
def test_batch_sampler_rejects_empty(rows, batch):
    with pytest.raises(ValueError, match=rf"num_rows >= 1 and batch_size >= 1; got {rows}, {batch}"):
        MemberBatchSampler(rows, batch, SEEDS)


# -- the augmentation stream ----------------------------------------------------------------------------
def _expected_augmented(data, seed, epoch, row):
    torch.manual_seed(mix_seed(seed, epoch, row, TAG_AUGMENT))
    return random_crop_flip(data.x[row], data.pad)


def _global_draws():
    return torch.rand(3), random.random(), np.random.rand()


def test_stream_dataset_augments_under_the_row_seed():
    data = image_data(n=12, augment=True)
    stream = MemberStreamDataset(data, SEEDS)
    assert len(stream) == 12
    torch.manual_seed(1)
    ex = stream[(2, 4, 9)]
    assert set(ex) == {"pixel_values", "labels", "sample_index", "member_index"}
    assert ex["sample_index"] == 9 and ex["member_index"] == 2 and ex["labels"] == data.y[9]
    assert torch.equal(ex["pixel_values"], _expected_augmented(data, 7, 4, 9))
    assert not torch.equal(ex["pixel_values"], data.x[9])  # augmentation did happen for this key


def test_stream_dataset_order_independent_and_member_independent():
    """The same key gives bitwise the same row whatever was fetched before, alone or in a batch, in any order."""
    data = image_data(n=12, augment=True)
    stream = MemberStreamDataset(data, SEEDS)
    keys = [(m, e, r) for m in range(3) for e in (0, 1) for r in (0, 5, 11)]
    alone = {k: stream[k]["pixel_values"] for k in keys}
    batched = stream.__getitems__(keys[::-1])
    for k, ex in zip(keys[::-1], batched, strict=True):
        assert torch.equal(ex["pixel_values"], alone[k])
        assert (ex["member_index"], ex["sample_index"]) == (k[0], k[2])
    torch.manual_seed(99)
    random.seed(99)
    shuffled = random.sample(keys, len(keys))
    for k in shuffled:
        assert torch.equal(stream[k]["pixel_values"], alone[k])
    # member 1 of a 3-member stream fetches what member 0 of a 1-member stream with seed 6 fetches
    single = MemberStreamDataset(data, [6])
    for r in range(12):
        assert torch.equal(stream[(1, 3, r)]["pixel_values"], single[(0, 3, r)]["pixel_values"])


def test_stream_dataset_other_epochs_and_seeds_differ():
    """Crop offsets (5 x 5) and a flip: 50 outcomes, so two draws agree with chance 1/50 per row."""
    data = image_data(n=12, augment=True)
    stream = MemberStreamDataset(data, SEEDS)
    other_epoch = sum(not torch.equal(stream[(0, 0, r)]["pixel_values"], stream[(0, 1, r)]["pixel_values"])
                      for r in range(12))
    other_member = sum(not torch.equal(stream[(0, 0, r)]["pixel_values"], stream[(1, 0, r)]["pixel_values"])
                       for r in range(12))
    assert other_epoch >= 10 and other_member >= 10


def test_stream_dataset_leaves_global_rng_unchanged():
    data = image_data(n=6, augment=True)
    stream = MemberStreamDataset(data, SEEDS)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    stream[(0, 0, 1)]
    stream.__getitems__([(1, 2, 3), (2, 0, 5)])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


class _RandomRows(Dataset):
    """Rows holding one draw of each global RNG (a stand-in for python/numpy/torch based transforms)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, row: int) -> dict:
        return {"torch": torch.rand(()).item(), "python": random.random(), "numpy": float(np.random.rand()),
                "labels": row}


def test_stream_dataset_seeds_torch_python_and_numpy():
    stream = MemberStreamDataset(_RandomRows(), [11, 12])
    ex = stream[(1, 2, 3)]
    seed = mix_seed(12, 2, 3, TAG_AUGMENT)
    assert ex["torch"] == torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    assert ex["python"] == random.Random(seed).random()
    assert ex["numpy"] == np.random.RandomState(seed % 2**32).rand()


def test_stream_dataset_through_dataloader():
    """A DataLoader over (sampler, stream) gives member-major batches whose tags are the sampler's keys."""
    data = image_data(n=10, augment=True)
    sampler = MemberBatchSampler(10, 4, SEEDS)
    sampler.set_epoch(2)
    loader = DataLoader(MemberStreamDataset(data, SEEDS), batch_sampler=sampler)
    batches, keys = list(loader), list(sampler)
    assert len(batches) == 3
    stream = MemberStreamDataset(data, SEEDS)
    for batch, step_keys in zip(batches, keys, strict=True):
        assert batch["member_index"].tolist() == [m for m, _, _ in step_keys]
        assert batch["sample_index"].tolist() == [r for _, _, r in step_keys]
        expected = torch.stack([stream[k]["pixel_values"] for k in step_keys])
        assert torch.equal(batch["pixel_values"], expected)
        assert torch.equal(batch["labels"], data.y[batch["sample_index"]])


def test_seeded_rows_dataset_is_a_fixed_transform():
    data = image_data(n=8, augment=True)
    seeded = SeededRowsDataset(data, seed=42)
    assert len(seeded) == 8
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [seeded[r]["pixel_values"] for r in range(8)]
    assert torch.equal(torch.get_rng_state(), state)
    for r in reversed(range(8)):
        assert torch.equal(seeded[r]["pixel_values"], first[r])
        torch.manual_seed(mix_seed(42, r, TAG_AUGMENT))
        assert torch.equal(first[r], random_crop_flip(data.x[r], data.pad))
    other = SeededRowsDataset(data, seed=43)
    assert sum(not torch.equal(other[r]["pixel_values"], first[r]) for r in range(8)) >= 6


# -- the dropout stream ---------------------------------------------------------------------------------
class _RandProbe(nn.Module):
    """A linear member that records two draws of the global torch RNG at every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 4)
        self.draws: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.draws.append(torch.rand(2))
        return self.lin(x.flatten(1))


def _dropout_expected(seed, step, micro, forwards):
    gen = torch.Generator().manual_seed(mix_seed(seed, step, micro, TAG_DROPOUT))
    return [torch.rand(2, generator=gen) for _ in range(forwards)]


@pytest.mark.parametrize(("method", "forwards"), [("deep_ensemble", 1), ("sam", 2)])
def test_dropout_stream_is_seeded_by_member_step_and_micro_step(tmp_path, method, forwards):
    """Member i's in-model randomness at (global step g, micro-step u) is drawn from ``mix(seed_i, g, u, TAG_DROPOUT)``.

    8 rows, B=4, accumulation 2: 1 optimizer step per epoch with micro-steps 0 and 1; 2 epochs. Under SAM the
    ascent and the descent forward draw consecutively from the same stream (different dropout masks).
    """
    args = make_args(tmp_path, ensemble_method=method, num_members=2, member_seeds=[3, 9], num_train_epochs=2,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2, rho=0.1)
    trainer = make_trainer(args, _RandProbe, image_data(n=8))
    trainer.train()
    assert trainer.state.global_step == 2
    for i, seed in enumerate([3, 9]):
        draws = trainer.ensemble.members[i].draws
        expected = [d for g in range(2) for u in range(2) for d in _dropout_expected(seed, g, u, forwards)]
        assert len(draws) == len(expected) == 4 * forwards
        for got, want in zip(draws, expected, strict=True):
            assert torch.equal(got, want)
