"""Batched raw reads in `sbtrainer.sampling`: one Arrow read per step, the augmentation still per row under its seed.

The reference is the per-row fetch (``batched_reads=False``): ``dataset[row]`` under the seed
``mix(member seed, epoch, row, TAG_AUGMENT)``. Every test compares the batched path with it bitwise, on a
CIFAR-like HuggingFace dataset made here (32x32 RGB images stored as an ``Image`` feature, a
``ClassLabel``) carrying the recipes' training transform (random crop 32 with padding 4, horizontal flip,
to tensor, normalise; torchvision draws from torch's global RNG) through ``with_transform``.
"""

import pickle
import random

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from helpers import image_data, make_args, make_trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import default_data_collator

import sbtrainer.sampling as sampling
from sbtrainer.sampling import (
    TAG_AUGMENT,
    MemberBatchSampler,
    MemberStreamDataset,
    SeededRowsDataset,
    mix_seed,
)

SEEDS = [5, 6, 7]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TRAIN_TF = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def _cifar_like(n: int = 40, classes: int = 10, seed: int = 0) -> datasets.Dataset:
    """``n`` random 32x32 RGB images (column ``img``, PNG-encoded by the Image feature) and labels (``label``)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes),
                               "extra": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"img": list(x), "label": rng.integers(0, classes, n).tolist(),
                                       "extra": list(range(100, 100 + n))}, features=feats)


def _augment(batch: dict) -> dict:
    """The recipes' ``batch_transform``: PIL images -> ``pixel_values`` (3, 32, 32), ``label`` -> ``labels``."""
    return {"pixel_values": [TRAIN_TF(im.convert("RGB")) for im in batch["img"]], "labels": batch["label"]}


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    return _cifar_like().with_transform(_augment)


class _ArrowReads:
    """Counts Arrow table queries (one per ``dataset[...]`` call of a ``datasets.Dataset``)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = datasets.arrow_dataset.query_table

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(datasets.arrow_dataset, "query_table", counting)


def _loader(dataset, epoch: int, batched: bool, seeds=SEEDS, batch: int = 8, workers: int = 0) -> DataLoader:
    sampler = MemberBatchSampler(len(dataset), batch, seeds)
    sampler.set_epoch(epoch)
    return DataLoader(MemberStreamDataset(dataset, seeds, batched_reads=batched), batch_sampler=sampler,
                      collate_fn=default_data_collator, num_workers=workers)


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


# -- the acceptance test: batched raw read == per-row fetch ----------------------------------------------
def test_batched_raw_read_gives_bitwise_the_per_row_batches(train, monkeypatch):
    """40 rows, B=8, 3 members, epochs 0-2: every collated batch (pixels, labels, tags) is bitwise equal.

    Arrow reads: the per-row path queries the table once per row (5 steps x 24 keys = 120 per epoch),
    the batched path once per step (5 per epoch).
    """
    reads = _ArrowReads(monkeypatch)
    for epoch in range(3):
        reads.calls = 0
        per_row = list(_loader(train, epoch, batched=False))
        assert reads.calls == 120
        reads.calls = 0
        batched = list(_loader(train, epoch, batched=True))
        assert reads.calls == 5
        assert [len(b["labels"]) for b in batched] == [24] * 5
        _assert_batches_equal(batched, per_row)


def test_each_row_is_augmented_under_its_own_seed(train):
    """The batched path's example for (member, epoch, row) is TRAIN_TF of that image drawn under mix(seed, e, r)."""
    raw = train.with_format(None)
    stream = MemberStreamDataset(train, SEEDS)
    keys = [(2, 1, 3), (0, 1, 3), (1, 4, 17), (2, 1, 39)]
    got = stream.__getitems__(keys)
    for (m, e, r), ex in zip(keys, got, strict=True):
        torch.manual_seed(mix_seed(SEEDS[m], e, r, TAG_AUGMENT))
        assert torch.equal(ex["pixel_values"], TRAIN_TF(raw[r]["img"].convert("RGB")))
        assert (ex["labels"], ex["sample_index"], ex["member_index"]) == (raw[r]["label"], r, m)
    # the same row for two members in one step: two different draws (crop offsets 9 x 9 and a flip)
    assert not torch.equal(got[0]["pixel_values"], got[1]["pixel_values"])
    # one stream for the whole batch (the dataset's own batched transform) would not give these rows
    torch.manual_seed(mix_seed(SEEDS[2], 1, 3, TAG_AUGMENT))
    one_stream = train.__getitems__([3, 3, 17, 39])
    assert torch.equal(one_stream[0]["pixel_values"], got[0]["pixel_values"])
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(one_stream[1:], got[1:]))


def test_member_equals_single_member_stream_with_batched_reads(train):
    """m-vs-1: member i of a 3-member loader gets exactly the rows of a 1-member loader with seed_i."""
    for epoch in (0, 2):
        many = list(_loader(train, epoch, batched=True))
        for i, seed in enumerate(SEEDS):
            single = list(_loader(train, epoch, batched=True, seeds=[seed]))
            for big, small in zip(many, single, strict=True):
                mine = big["member_index"] == i
                assert torch.equal(big["sample_index"][mine], small["sample_index"])
                assert torch.equal(big["pixel_values"][mine], small["pixel_values"])
                assert torch.equal(big["labels"][mine], small["labels"])


def test_key_order_and_history_do_not_matter(train):
    """A key gives the same example alone, first or last in a batch, after any other fetch."""
    stream = MemberStreamDataset(train, SEEDS)
    keys = [(m, e, r) for m in range(3) for e in (0, 1) for r in (0, 9, 39)]
    alone = {k: stream[k]["pixel_values"] for k in keys}
    torch.manual_seed(3)
    for order in (keys, keys[::-1], random.Random(1).sample(keys, len(keys))):
        for k, ex in zip(order, stream.__getitems__(order), strict=True):
            assert torch.equal(ex["pixel_values"], alone[k])


def test_global_rng_states_are_restored(train):
    stream = MemberStreamDataset(train, SEEDS)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    stream.__getitems__([(0, 0, 1), (2, 3, 5)])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_transform_columns_and_output_all_columns_as_datasets_does():
    """``with_transform(columns=[img], output_all_columns=True)``: the transform sees only ``img``, the rest is added."""
    seen = []

    def only_img(batch: dict) -> dict:
        seen.append(sorted(batch))
        return {"pixel_values": [TRAIN_TF(im.convert("RGB")) for im in batch["img"]],
                "extra": [-1] * len(batch["img"])}  # overwritten by the raw column, as datasets does

    ds = _cifar_like(n=12).with_transform(only_img, columns=["img"], output_all_columns=True)
    keys = [(m, e, r) for m in range(2) for e in (0, 1) for r in range(12)]
    stream = MemberStreamDataset(ds, SEEDS)
    reference = MemberStreamDataset(ds, SEEDS, batched_reads=False)
    seen.clear()
    got = stream.__getitems__(keys)
    assert seen == [["img"]] * len(keys)  # the transform ran once per row, on that row alone
    want = reference.__getitems__(keys)
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b) == ["pixel_values", "extra", "label", "sample_index", "member_index"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert (a["extra"], a["label"]) == (b["extra"], b["label"])
        assert a["extra"] == 100 + a["sample_index"]


@pytest.mark.parametrize("fmt", [None, "python", "numpy", "torch"])
def test_plain_formats_are_read_in_one_call(fmt, monkeypatch):
    """Formats with no transform (pre-tokenised text, arrays): one Arrow read per step, batches bitwise equal."""
    ds = _cifar_like(n=20).remove_columns("img").map(lambda r: {"ids": [r["extra"] % 7] * 5})
    ds = ds.with_format(fmt, columns=["ids", "label"])
    reads = _ArrowReads(monkeypatch)
    batched = list(_loader(ds, 1, batched=True, batch=6))
    assert reads.calls == 4  # ceil(20 / 6) steps
    per_row = list(_loader(ds, 1, batched=False, batch=6))
    _assert_batches_equal(batched, per_row)
    assert batched[0]["ids"].shape == (18, 5)


def test_other_datasets_are_fetched_row_by_row():
    """A torch dataset's own ``__getitems__`` may draw one stream per batch: it is never called."""

    class OneStream(Dataset):
        def __init__(self) -> None:
            self.inner = image_data(n=10, augment=True)

        def __len__(self) -> int:
            return 10

        def __getitem__(self, row: int) -> dict:
            return self.inner[row]

        def __getitems__(self, rows: list[int]) -> list[dict]:
            raise AssertionError("the dataset's batched fetch must not be used")

    keys = [(m, 2, r) for m in range(3) for r in range(10)]
    got = MemberStreamDataset(OneStream(), SEEDS).__getitems__(keys)
    want = MemberStreamDataset(image_data(n=10, augment=True), SEEDS, batched_reads=False).__getitems__(keys)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_transform_must_return_a_dict_of_sequences():
    ds = _cifar_like(n=4).with_transform(lambda batch: None)
    with pytest.raises(TypeError, match="must return a dict of sequences to pick a row from; got NoneType"):
        MemberStreamDataset(ds, SEEDS).__getitems__([(0, 0, 1)])


# -- pickling (DataLoader workers) and the scoring view -----------------------------------------------------
def test_reader_is_rebuilt_after_pickling_and_workers_give_the_same_batches(train):
    stream = MemberStreamDataset(train, SEEDS)
    first = stream.__getitems__([(0, 0, 2), (1, 0, 2)])
    assert isinstance(stream.reader, sampling._HFTransformReader)
    clone = pickle.loads(pickle.dumps(stream))
    assert clone._reader is None  # the raw view is not pickled: each worker builds its own
    again = clone.__getitems__([(0, 0, 2), (1, 0, 2)])
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    _assert_batches_equal(list(_loader(train, 1, batched=True, workers=1)), list(_loader(train, 1, batched=False)))


def test_seeded_rows_batched_equals_per_row(train, monkeypatch):
    """Scoring's fixed view: a Subset DataLoader (batch 7) reads 2 tables per pass, equal to row by row."""
    seeded = SeededRowsDataset(train, seed=42)
    rows = [3, 1, 4, 1, 5, 9, 2, 6, 35, 38, 0, 7, 8, 10]
    reads = _ArrowReads(monkeypatch)
    batched = list(DataLoader(Subset(seeded, rows), batch_size=7, collate_fn=default_data_collator))
    assert reads.calls == 2
    per_row = [default_data_collator([seeded[r] for r in rows[:7]]), default_data_collator([seeded[r] for r in rows[7:]])]
    _assert_batches_equal(batched, per_row)
    for r in (3, 35):
        torch.manual_seed(mix_seed(42, r, TAG_AUGMENT))
        assert torch.equal(seeded.__getitems__([r])[0]["pixel_values"],
                           TRAIN_TF(train.with_format(None)[r]["img"].convert("RGB")))


# -- the trainer's loader -----------------------------------------------------------------------------------
def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 2, 3, stride=4), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))


def test_trainer_loader_reads_in_batches_and_equals_the_per_row_loader(train, tmp_path, monkeypatch):
    args = make_args(tmp_path, num_members=3, member_seeds=SEEDS, per_device_train_batch_size=8,
                     remove_unused_columns=False)
    trainer = make_trainer(args, _cnn, train)
    loader = trainer.get_train_dataloader()
    reads = _ArrowReads(monkeypatch)
    for epoch in (0, 1):
        trainer._member_sampler.set_epoch(epoch)
        reads.calls = 0
        got = [dict(b) for b in loader]
        assert reads.calls == 5  # 40 rows, B=8: 5 steps, one read each
        _assert_batches_equal(got, list(_loader(train, epoch, batched=False)))
