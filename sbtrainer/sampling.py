"""Per-member data streams: order, augmentation and dropout seeds that depend only on (member seed, epoch, row).

Independently trained deep-ensemble members see the data in different orders with different
augmentations. Here member ``i`` in epoch ``e`` visits the rows in ``randperm(N, seed=mix(seed_i, e))``
order, and the augmentation of row ``r`` is drawn under the seed ``mix(seed_i, e, r)``. Nothing is
stateful, so a resumed run (mid-epoch or at an epoch boundary) replays exactly the same stream, and
member ``i`` of an m-member run sees exactly what a 1-member run with seed ``seed_i`` sees.

Each step the batch sampler yields the keys ``(member, epoch, row)`` of every member's sub-batch;
:class:`MemberStreamDataset` fetches each row under its seed and tags it with ``sample_index`` (row
position) and ``member_index``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1
TAG_ORDER, TAG_AUGMENT, TAG_DROPOUT = 0x0D, 0xA6, 0xD0

SampleKey = tuple[int, int, int]  # (member, epoch, row)


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 chain): stable across processes and Python runs."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def member_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """Row order ``(num_rows,)`` int64 of the member with ``seed`` in ``epoch``."""
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch, TAG_ORDER))
    return torch.randperm(num_rows, generator=gen)


class MemberBatchSampler:
    """Yields one list of keys per step: member 0's sub-batch keys, then member 1's, ...

    Args:
        num_rows: N, rows of the training set.
        batch_size: B, rows per member per step.
        member_seeds: one seed per member.
        drop_last: drop each member's last incomplete sub-batch.
    """

    def __init__(self, num_rows: int, batch_size: int, member_seeds: Sequence[int], drop_last: bool = False) -> None:
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"MemberBatchSampler needs num_rows >= 1 and batch_size >= 1; got {num_rows}, {batch_size}")
        self.num_rows = num_rows
        self.member_batch_size = batch_size
        # Each yielded list holds m * B keys (fewer at the end): to accelerate's BatchSamplerShard this is a
        # sampler of variable-length batches, so it shards whole steps and never splits or refills one.
        self.batch_size = None
        self.member_seeds = list(member_seeds)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.member_batch_size
        return -(-self.num_rows // self.member_batch_size)

    def member_rows(self, member: int, epoch: int, step: int) -> torch.Tensor:
        """Rows ``(B,)`` that ``member`` trains on at ``step`` of ``epoch``."""
        perm = member_permutation(self.num_rows, self.member_seeds[member], epoch)
        return perm[step * self.member_batch_size : (step + 1) * self.member_batch_size]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.epoch
        perms = [member_permutation(self.num_rows, s, epoch).tolist() for s in self.member_seeds]
        for step in range(len(self)):
            lo, hi = step * self.member_batch_size, (step + 1) * self.member_batch_size
            yield [(m, epoch, row) for m, perm in enumerate(perms) for row in perm[lo:hi]]


class _GlobalRngGuard:
    """Save the CPU torch, python and numpy global RNG states once; restore them on exit."""

    def __enter__(self) -> _GlobalRngGuard:
        self.torch_state = torch.get_rng_state()
        self.py_state = random.getstate()
        self.np_state = np.random.get_state()
        return self

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.torch_state)
        random.setstate(self.py_state)
        np.random.set_state(self.np_state)


def _seed_globals(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class MemberStreamDataset(Dataset):
    """Wraps a map-style dataset of dict examples; indexed by :data:`SampleKey`.

    ``dataset[row]`` is fetched with the global RNGs (torch CPU, python, numpy) seeded from
    ``(member_seed, epoch, row)``, so on-the-fly augmentation (``set_transform``, torchvision, timm)
    draws the member's own stream. The global RNG states are restored afterwards.
    """

    def __init__(self, dataset: Dataset, member_seeds: Sequence[int]) -> None:
        self.dataset = dataset
        self.member_seeds = list(member_seeds)

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, key: SampleKey) -> dict:
        member, epoch, row = key
        _seed_globals(mix_seed(self.member_seeds[member], epoch, row, TAG_AUGMENT))
        example = dict(self.dataset[row])
        example["sample_index"] = row
        example["member_index"] = member
        return example

    def __getitem__(self, key: SampleKey) -> dict:
        with _GlobalRngGuard():
            return self._fetch(key)

    def __getitems__(self, keys: list[SampleKey]) -> list[dict]:
        with _GlobalRngGuard():
            return [self._fetch(k) for k in keys]


class SeededRowsDataset(Dataset):
    """``dataset[row]`` fetched under the seed ``mix(seed, row)``: any random transform becomes a fixed one.

    Used to score a training set that carries augmentation when no eval view was given, so scores
    (and a resumed run) stay reproducible.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        with _GlobalRngGuard():
            _seed_globals(mix_seed(self.seed, row, TAG_AUGMENT))
            return self.dataset[row]
