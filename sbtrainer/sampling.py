"""Per-member data streams: order, augmentation and dropout seeds that depend only on (member seed, epoch, row).

Independently trained deep-ensemble members see the data in different orders with different
augmentations. Here member ``i`` in epoch ``e`` visits the rows in ``randperm(N, seed=mix(seed_i, e))``
order, and the augmentation of row ``r`` is drawn under the seed ``mix(seed_i, e, r)``. Nothing is
stateful, so a resumed run (mid-epoch or at an epoch boundary) replays exactly the same stream, and
member ``i`` of an m-member run sees exactly what a 1-member run with seed ``seed_i`` sees.

Each step the batch sampler yields the keys ``(member, epoch, row)`` of every member's sub-batch;
:class:`MemberStreamDataset` fetches each row under its seed and tags it with ``sample_index`` (row
position) and ``member_index``.

Batched reads. For a HuggingFace ``datasets.Dataset`` the raw rows of a whole step are read in one
call (one Arrow ``take`` and one feature decode, e.g. of every JPEG), and only what draws random
numbers runs per row: the dataset's ``with_transform``/``set_transform`` function is called on each row
alone, as a one-row batch, under that row's seed, exactly as ``dataset[row]`` calls it. The batched
transform of ``dataset[rows]`` is never used: it would draw one random stream for the whole batch.
Any other dataset is read with ``dataset[row]`` one row at a time (its own ``__getitems__``, if any, is
not used, for the same reason).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


# Format types of `datasets` whose row ``dataset[r]`` equals element r of the batch ``dataset[rows]`` and
# that run no user code: their rows are read in one call, with no seeding.
_PLAIN_HF_FORMATS = (None, "python", "numpy", "torch")


class _PerRowReader:
    """Reads ``dataset[row]`` one row at a time, under the row's seed (any map-style dataset)."""

    needs_seed = True

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def read(self, rows: list[int]) -> list[int]:
        return rows

    def finish(self, raw: int) -> Any:
        return self.dataset[raw]


class _HFTransformReader:
    """A ``datasets.Dataset`` with a ``with_transform`` function: raw rows in one call, the transform per row.

    ``finish`` does what ``datasets`` does for ``dataset[row]`` under a custom format: the transform gets
    the one-row batch ``{column: [value]}`` of the format's columns (in the table's column order), its
    output batch is cut to its first element, and with ``output_all_columns`` the other raw columns are
    added (overwriting outputs of the same name).
    """

    needs_seed = True

    def __init__(self, dataset: Any) -> None:
        fmt = dataset.format
        self.transform: Callable[[dict], dict] = fmt["format_kwargs"]["transform"]
        self.columns = set(fmt["columns"])
        self.output_all_columns = bool(fmt["output_all_columns"])
        self.raw = dataset.with_format(None)  # the decoded rows (PIL images, ints, ...), no transform

    def read(self, rows: list[int]) -> list[dict]:
        return self.raw.__getitems__(rows) if rows else []

    def finish(self, raw: dict) -> dict:
        out = self.transform({c: [v] for c, v in raw.items() if c in self.columns})
        try:
            example = {k: v[0] for k, v in out.items()}
        except Exception as err:
            raise TypeError("the dataset's with_transform function must return a dict of sequences to pick a row "
                            f"from; got {type(out).__name__}") from err
        if self.output_all_columns:
            example.update({c: v for c, v in raw.items() if c not in self.columns})
        return example


class _HFPlainReader:
    """A ``datasets.Dataset`` in a format that runs no user code: ``dataset.__getitems__(rows)``, no seeding."""

    needs_seed = False

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def read(self, rows: list[int]) -> list[dict]:
        return self.dataset.__getitems__(rows) if rows else []

    def finish(self, raw: dict) -> dict:
        return raw


class _DeterministicReader(_HFPlainReader):
    """A dataset that declares ``deterministic = True`` (its rows draw no random numbers, e.g.
    `sbtrainer.data.ImageIndexDataset`): its own ``__getitems__`` (or ``dataset[row]``), no seeding."""

    def read(self, rows: list[int]) -> list[Any]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return getitems(rows) if rows else []
        return [self.dataset[r] for r in rows]


def _row_reader(dataset: Dataset, batched: bool) -> _PerRowReader | _HFTransformReader | _HFPlainReader:
    """The fastest reader of ``dataset`` that gives bitwise the rows ``dataset[row]`` gives under the row's seed."""
    if getattr(dataset, "deterministic", False) is True:
        return _DeterministicReader(dataset)
    if not batched:
        return _PerRowReader(dataset)
    try:
        import datasets as hf_datasets  # lazy: optional dependency (absent on the lent GPU machines)
    except ImportError:
        return _PerRowReader(dataset)
    if not isinstance(dataset, hf_datasets.Dataset):
        return _PerRowReader(dataset)
    fmt = dataset.format
    if fmt["type"] == "custom" and callable(fmt["format_kwargs"].get("transform")):
        return _HFTransformReader(dataset)
    if fmt["type"] in _PLAIN_HF_FORMATS:
        return _HFPlainReader(dataset)
    return _PerRowReader(dataset)  # pandas, arrow, polars, ...: a row is not an element of the batch


class _ReaderMixin:
    """Builds the row reader on first use (in each DataLoader worker), never pickles it."""

    dataset: Dataset
    batched_reads: bool
    _reader: Any = None

    @property
    def reader(self) -> _PerRowReader | _HFTransformReader | _HFPlainReader:
        if self._reader is None:
            self._reader = _row_reader(self.dataset, self.batched_reads)
        return self._reader

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_reader", None)
        return state

    def _read_seeded(self, rows: list[int], seeds: list[int]) -> list[Any]:
        """``dataset[rows[j]]`` under ``seeds[j]`` for every j; the raw rows read in one call where possible."""
        reader = self.reader
        if not reader.needs_seed:
            return [reader.finish(raw) for raw in reader.read(rows)]
        with _GlobalRngGuard():
            raws = reader.read(rows)
            out = []
            for raw, seed in zip(raws, seeds, strict=True):
                if reader.needs_seed:
                    _seed_globals(seed)
                out.append(reader.finish(raw))
            return out


class MemberStreamDataset(_ReaderMixin, Dataset):
    """Wraps a map-style dataset of dict examples; indexed by :data:`SampleKey`.

    ``dataset[row]`` is fetched with the global RNGs (torch CPU, python, numpy) seeded from
    ``(member_seed, epoch, row)``, so on-the-fly augmentation (``set_transform``, torchvision, timm)
    draws the member's own stream. The global RNG states are restored afterwards.

    ``__getitems__`` (what a ``DataLoader`` with a batch sampler calls once per step) reads the raw rows
    of all the step's keys in one call when ``dataset`` is a ``datasets.Dataset`` and ``batched_reads``
    (the default), then runs the dataset's ``with_transform`` function on each row alone under its seed:
    bitwise the examples of the per-row fetch, with one Arrow read and decode per step instead of one
    per row. ``batched_reads=False`` fetches ``dataset[row]`` row by row (the reference path).
    """

    def __init__(self, dataset: Dataset, member_seeds: Sequence[int], batched_reads: bool = True) -> None:
        self.dataset = dataset
        self.member_seeds = list(member_seeds)
        self.batched_reads = batched_reads

    def __len__(self) -> int:
        return len(self.dataset)

    def _seed(self, key: SampleKey) -> int:
        member, epoch, row = key
        return mix_seed(self.member_seeds[member], epoch, row, TAG_AUGMENT)

    def _fetch(self, key: SampleKey) -> dict:
        member, _, row = key
        _seed_globals(self._seed(key))
        example = dict(self.dataset[row])
        example["sample_index"] = row
        example["member_index"] = member
        return example

    def __getitem__(self, key: SampleKey) -> dict:
        with _GlobalRngGuard():
            return self._fetch(key)

    def __getitems__(self, keys: list[SampleKey]) -> list[dict]:
        keys = [tuple(k) for k in keys]
        seeds = [self._seed(k) for k in keys] if self.reader.needs_seed else [0] * len(keys)
        examples = self._read_seeded([row for _, _, row in keys], seeds)
        out = []
        for (member, _, row), example in zip(keys, examples, strict=True):
            example = dict(example)
            example["sample_index"] = row
            example["member_index"] = member
            out.append(example)
        return out


class SeededRowsDataset(_ReaderMixin, Dataset):
    """``dataset[row]`` fetched under the seed ``mix(seed, row)``: any random transform becomes a fixed one.

    Used to score a training set that carries augmentation when no eval view was given, so scores
    (and a resumed run) stay reproducible. ``__getitems__`` reads a ``datasets.Dataset``'s raw rows in
    one call and runs its transform per row under the row's seed, like :class:`MemberStreamDataset`.
    """

    def __init__(self, dataset: Dataset, seed: int, batched_reads: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.batched_reads = batched_reads

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        with _GlobalRngGuard():
            _seed_globals(mix_seed(self.seed, row, TAG_AUGMENT))
            return self.dataset[row]

    def __getitems__(self, rows: list[int]) -> list[dict]:
        rows = [int(r) for r in rows]
        return self._read_seeded(rows, [mix_seed(self.seed, r, TAG_AUGMENT) for r in rows])
