"""DeviceImagePipeline: draws a pure function of the seed, exact crop/flip, the CPU pipeline's statistics and eval view.

CPU only, tiny made images. The CPU reference is the recipes' path: torchvision ``RandomCrop(32, padding=4)``
+ ``RandomHorizontalFlip`` (+ ``ToTensor`` + ``Normalize``) on a PIL image, run under
``sbtrainer.sampling._seed_globals(seed)`` as `MemberStreamDataset` runs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from transformers import default_data_collator

from sbtrainer.data import DeviceImagePipeline, ImageIndexDataset, crop_flip
from sbtrainer.sampling import (
    TAG_AUGMENT,
    MemberBatchSampler,
    MemberStreamDataset,
    _GlobalRngGuard,
    _seed_globals,
    mix_seed,
)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MASK = (1 << 64) - 1


def random_images(n: int, h: int = 32, w: int = 32, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def seeds_for(member_seed: int, epoch: int, rows) -> torch.Tensor:
    return torch.tensor([mix_seed(member_seed, epoch, int(r), TAG_AUGMENT) for r in rows], dtype=torch.int64)


def python_draws(seed: int, padding: int) -> tuple[int, int, int]:
    """The documented formula of `DeviceImagePipeline.draws` in python integers (no numpy, no torch)."""
    z = (((seed & MASK) ^ 0xC0F1) + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    n = 2 * padding + 1
    return z % n, (z // n) % n, (z // (n * n)) % 2


def hand_crop_flip(img: np.ndarray, dy: int, dx: int, flip: int, padding: int) -> np.ndarray:
    """Zero-pad by loops, slice ``[dy:dy+H, dx:dx+W]``, mirror if ``flip``: ``(C, H, W)`` -> ``(C, H, W)``."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), dtype=img.dtype)
    for r in range(h):
        for col in range(w):
            padded[:, r + padding, col + padding] = img[:, r, col]
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1].copy() if flip else out.copy()


# -- (1) the draws are a pure function of the seed -------------------------------------------------------------
def test_draws_follow_the_documented_formula():
    pipe = DeviceImagePipeline(random_images(1), MEAN, STD, padding=4)
    seeds = [0, 1, 2**63 - 1, *seeds_for(5, 3, range(61)).tolist()]
    dy, dx, flip = pipe.draws(torch.tensor(seeds))
    assert [tuple(t) for t in zip(dy.tolist(), dx.tolist(), flip.tolist())] == [python_draws(s, 4) for s in seeds]
    # any container of the same integers gives the same draws; a negative int64 is its two's-complement word
    for same in (seeds, np.array(seeds, dtype=np.int64)):
        assert all(torch.equal(a, b) for a, b in zip(pipe.draws(same), (dy, dx, flip)))
    assert [t.item() for t in pipe.draws(torch.tensor([-1]))] == list(python_draws(2**64 - 1, 4))
    # padding 2: five offsets; flip=False: never flipped, same offsets
    assert [tuple(t) for t in zip(*(x.tolist() for x in DeviceImagePipeline(
        random_images(1), MEAN, STD, padding=2).draws(seeds)))] == [python_draws(s, 2) for s in seeds]
    no_flip = DeviceImagePipeline(random_images(1), MEAN, STD, flip=False).draws(seeds)
    assert torch.equal(no_flip[0], dy) and torch.equal(no_flip[1], dx) and not no_flip[2].any()


def test_same_seed_same_row_whatever_the_batch():
    images = random_images(64)
    pipe = DeviceImagePipeline(images, MEAN, STD)
    rows = torch.arange(64)
    seeds = seeds_for(3, 2, rows)
    full = pipe({"image_index": rows}, seeds)["pixel_values"]
    # another batch: a shuffled subset of the rows, next to rows repeated under other seeds
    pick = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:20]
    others = torch.arange(10)
    index = torch.cat([others, pick])
    mixed = pipe({"image_index": index}, torch.cat([seeds_for(4, 0, others), seeds[pick]]))["pixel_values"]
    assert torch.equal(mixed[10:], full[pick])
    # and a fresh pipeline over a copy of the images, rows one at a time
    fresh = DeviceImagePipeline(images.clone(), MEAN, STD)
    for r in (0, 17, 63):
        one = fresh({"image_index": torch.tensor([r])}, seeds[r:r + 1])["pixel_values"]
        assert torch.equal(one[0], full[r])


# -- (3) exact crop / flip -----------------------------------------------------------------------------------------
def test_crop_flip_equals_hand_reference_for_every_offset():
    padding, (c, h, w) = 2, (2, 5, 6)
    img = torch.arange(1, c * h * w + 1, dtype=torch.uint8).view(1, c, h, w)
    combos = [(dy, dx, f) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for f in (0, 1)]
    dy, dx, flip = (torch.tensor(v) for v in zip(*combos))
    out = crop_flip(img.expand(len(combos), c, h, w), dy, dx, flip, padding)
    assert out.shape == (50, c, h, w)
    for b, (y, x, f) in enumerate(combos):
        assert np.array_equal(out[b].numpy(), hand_crop_flip(img[0].numpy(), y, x, f, padding)), (y, x, f)
    # spot values (channel 0 holds 1..30 row-major): offset (0, 0) puts two rows and columns of zero padding
    # top-left; offset (4, 4) flipped ends with image row 4's last four values, mirrored, then two padding rows
    assert out[combos.index((0, 0, 0)), 0, :3].tolist() == [[0] * 6, [0] * 6, [0, 0, 1, 2, 3, 4]]
    assert out[combos.index((4, 4, 1)), 0, 2:].tolist() == [[0, 0, 30, 29, 28, 27], [0] * 6, [0] * 6]


def test_augmented_rows_equal_torchvision_at_the_drawn_offsets():
    """Pad + crop + flip of torchvision's functional API on the PIL image, at the pipeline's own draws, then
    ToTensor + Normalize: the pipeline's augmented rows, exactly; and the hand reference, exactly."""
    images = random_images(6, seed=3)
    pipe = DeviceImagePipeline(images, MEAN, STD, padding=4)
    seeds = seeds_for(9, 1, range(6))
    got = pipe({"image_index": torch.arange(6)}, seeds)["pixel_values"]
    dy, dx, flip = pipe.draws(seeds)
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    assert {(int(a), int(b), int(f)) for a, b, f in zip(dy, dx, flip)} != {(4, 4, 0)}  # not all identity draws
    for r in range(6):
        pil = Image.fromarray(images[r].permute(1, 2, 0).numpy())
        ref = TF.crop(TF.pad(pil, 4, fill=0), int(dy[r]), int(dx[r]), 32, 32)
        ref = to_tensor(TF.hflip(ref) if flip[r] else ref)
        assert torch.equal(got[r], ref)
        hand = torch.from_numpy(hand_crop_flip(images[r].numpy(), int(dy[r]), int(dx[r]), int(flip[r]), 4))
        assert torch.equal(crop_flip(images[r:r + 1], dy[r:r + 1], dx[r:r + 1], flip[r:r + 1], 4)[0], hand)


# -- (2) the CPU pipeline's statistics -----------------------------------------------------------------------------
def coded_image() -> np.ndarray:
    """32 x 32 RGB: red = row + 1, green = column + 1, so a crop's offsets can be read back (0 = padding)."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :, 0] = np.arange(1, 33)[:, None]
    img[:, :, 1] = np.arange(1, 33)[None, :]
    return img


def decode(out: torch.Tensor, padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, left, flip)`` of crops ``(N, 3, 32, 32)`` uint8 of `coded_image`.

    Columns 15 and 16 always come from inside the image (original column 15 + left - 4 in [11, 20]), so their
    green values tell the flip; after unflipping, the first non-padding row/column and its value give the offset.
    """
    out = out.long()
    flipped = out[:, 1, 16, 15] > out[:, 1, 16, 16]
    out = torch.where(flipped[:, None, None, None], out.flip(-1), out)

    def offset(line: torch.Tensor) -> torch.Tensor:
        first = (line > 0).long().argmax(1)
        return line.gather(1, first[:, None])[:, 0] - 1 - first + padding

    return offset(out[:, 0, :, 16]), offset(out[:, 1, 16, :]), flipped.long()


@pytest.fixture(scope="module")
def both_sides():
    """20,000 rows (5 member seeds x 2 epochs x 2,000 rows) through torchvision under `_seed_globals` and the pipeline."""
    keys = [(s, e, r) for s in (0, 1, 2, 42, 1234) for e in (0, 7) for r in range(2000)]
    seeds = [mix_seed(s, e, r, TAG_AUGMENT) for s, e, r in keys]
    pil = Image.fromarray(coded_image())
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    cpu = []
    with _GlobalRngGuard():
        for seed in seeds:
            _seed_globals(seed)
            cpu.append(np.asarray(tf(pil)))
    cpu_out = torch.from_numpy(np.stack(cpu)).permute(0, 3, 1, 2)
    store = torch.from_numpy(coded_image()).permute(2, 0, 1)[None]
    # mean 0, std 1/255: pixel_values = x / 255 * 255, the uint8 crop as floats (rounding undoes the ulps)
    pipe = DeviceImagePipeline(store, (0.0,) * 3, (1 / 255,) * 3, padding=4)
    dev = pipe({"image_index": torch.zeros(len(seeds), dtype=torch.int64)}, torch.tensor(seeds))["pixel_values"]
    dev_out = dev.round().to(torch.uint8)
    assert torch.equal(dev_out.float(), dev.round()) and (dev - dev.round()).abs().max() < 1e-3
    return decode(cpu_out), decode(dev_out), pipe.draws(torch.tensor(seeds))


def test_decoder_reads_the_pipeline_draws_back(both_sides):
    _, dev, drawn = both_sides
    assert all(torch.equal(a, b) for a, b in zip(dev, drawn))


def test_crop_offsets_and_flip_rate_match_torchvision(both_sides):
    """Goodness of fit to the uniform law, each side, and homogeneity of the two sides.

    The seeds are fixed, so each statistic is one deterministic number; thresholds are the 0.999 quantiles
    of the null laws (chi-square df 8: 26.12, df 161: 222.2; |flip rate - 1/2| <= 4 sd = 0.0141 at n = 20,000),
    i.e. a correct uniform sampler fails one check with probability ~1e-3.
    """
    n = 20_000
    (cpu_top, cpu_left, cpu_flip), (dev_top, dev_left, dev_flip), _ = both_sides
    for side in ((cpu_top, cpu_left, cpu_flip), (dev_top, dev_left, dev_flip)):
        top, left, flip = side
        assert len(top) == n and top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
        for axis in (top, left):
            counts = torch.bincount(axis, minlength=9).numpy()
            assert stats.chisquare(counts).statistic < 26.12, counts  # df 8, each offset 1/9
        assert abs(flip.double().mean().item() - 0.5) <= 4 * (0.25 / n) ** 0.5
        joint = torch.bincount(top * 18 + left * 2 + flip, minlength=162).numpy()  # independence too
        assert stats.chisquare(joint).statistic < 222.2  # df 161
    for cpu, dev in ((cpu_top, dev_top), (cpu_left, dev_left)):  # the two sides' offset laws agree
        table = np.stack([torch.bincount(cpu, minlength=9).numpy(), torch.bincount(dev, minlength=9).numpy()])
        assert stats.chi2_contingency(table).statistic < 26.12
    table = np.array([[cpu_flip.sum().item(), n - cpu_flip.sum().item()],
                      [dev_flip.sum().item(), n - dev_flip.sum().item()]])
    assert stats.chi2_contingency(table, correction=False).statistic < 10.83  # df 1
    # the streams differ (torchvision's Mersenne Twister is not replayed), the laws do not
    assert not torch.equal(cpu_top, dev_top)


# -- (4) the clean eval view ---------------------------------------------------------------------------------------
def test_clean_view_equals_cpu_eval_transform():
    images = random_images(16, seed=5)
    eval_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    ref = torch.stack([eval_tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    for channels_last in (False, True):
        pipe = DeviceImagePipeline(images, MEAN, STD, channels_last=channels_last)
        by_index = pipe({"image_index": torch.arange(16), "labels": torch.arange(16)}, None)
        assert set(by_index) == {"pixel_values", "labels"} and torch.equal(by_index["labels"], torch.arange(16))
        raw = pipe({"pixel_values": images.clone()}, None)["pixel_values"]  # an eval set given as raw uint8
        for got in (by_index["pixel_values"], raw):
            assert got.dtype == torch.float32 and got.shape == (16, 3, 32, 32)
            assert (got - ref).abs().max().item() <= 1e-6
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # already-transformed float batches pass through the clean view untouched, and cannot be augmented
    floats = {"pixel_values": ref}
    assert pipe(floats, None)["pixel_values"] is ref
    with pytest.raises(ValueError, match="only uint8"):
        pipe(floats, seeds_for(0, 0, range(16)))


def test_channels_last_changes_memory_not_values():
    images, seeds = random_images(8, seed=2), seeds_for(1, 0, range(8))
    a = DeviceImagePipeline(images, MEAN, STD)({"image_index": torch.arange(8)}, seeds)["pixel_values"]
    b = DeviceImagePipeline(images, MEAN, STD, channels_last=True)({"image_index": torch.arange(8)}, seeds)
    assert torch.equal(a, b["pixel_values"]) and b["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert a.is_contiguous()


# -- (5) resume and member streams ----------------------------------------------------------------------------------
def trainer_batch(pipe: DeviceImagePipeline, keys, member_seeds) -> torch.Tensor:
    """What the trainer does: member loader rows -> default collator -> seeds from the keys -> the pipeline."""
    ds = MemberStreamDataset(pipe.index_dataset(torch.arange(len(pipe)) % 10), member_seeds)
    inputs = default_data_collator(ds.__getitems__(keys))
    seeds = torch.tensor([mix_seed(member_seeds[m], e, r, TAG_AUGMENT) for m, e, r in keys], dtype=torch.int64)
    assert torch.equal(inputs["sample_index"], torch.tensor([r for _, _, r in keys]))
    out = pipe(inputs, seeds)
    assert "image_index" not in out and torch.equal(out["labels"], inputs["sample_index"] % 10)
    return out["pixel_values"]


def test_resume_and_one_member_runs_replay_the_batches():
    images, member_seeds, batch, epoch, step = random_images(40, seed=4), [11, 22, 33], 8, 1, 3
    sampler = MemberBatchSampler(40, batch, member_seeds)
    sampler.set_epoch(epoch)
    keys = list(sampler)[step]  # the run from the start of the epoch
    first = trainer_batch(DeviceImagePipeline(images, MEAN, STD), keys, member_seeds)
    # resumed: fresh sampler and pipeline, the step's rows recomputed from (member seed, epoch, step)
    fresh = MemberBatchSampler(40, batch, member_seeds)
    resumed_keys = [(m, epoch, int(r)) for m in range(3) for r in fresh.member_rows(m, epoch, step)]
    assert resumed_keys == keys
    assert torch.equal(trainer_batch(DeviceImagePipeline(images.clone(), MEAN, STD), resumed_keys, member_seeds),
                       first)
    # member 1 of the 3-member run is the 1-member run with seed 22
    solo = MemberBatchSampler(40, batch, [22])
    solo.set_epoch(epoch)
    solo_keys = list(solo)[step]
    assert [r for _, _, r in solo_keys] == [r for m, _, r in keys if m == 1]
    assert torch.equal(trainer_batch(DeviceImagePipeline(images, MEAN, STD), solo_keys, [22]),
                       first[batch:2 * batch])
    # another epoch draws other augmentations of the same rows
    other = [(m, epoch + 1, r) for m, _, r in keys]
    assert not torch.equal(trainer_batch(DeviceImagePipeline(images, MEAN, STD), other, member_seeds), first)


# -- construction ----------------------------------------------------------------------------------------------------
def test_from_dataset_decodes_in_chunks_and_ignores_transforms():
    datasets = pytest.importorskip("datasets")
    images = random_images(7, h=4, w=5, seed=6)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    ds = datasets.Dataset.from_dict({"img": pil, "label": list(range(7))},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds = ds.with_transform(lambda b: {"pixel_values": [0] * len(b["img"])})  # bypassed
    pipe = DeviceImagePipeline.from_dataset(ds, mean=MEAN, std=STD, chunk_size=3, padding=1)
    assert torch.equal(pipe.images, images) and pipe.padding == 1 and len(pipe) == 7
    gray = DeviceImagePipeline.from_dataset(ds, "img", mean=(0.5,), std=(0.5,), mode="L")
    assert gray.images.shape == (7, 1, 4, 5)
    assert torch.equal(gray.images[:, 0], torch.from_numpy(np.stack([np.asarray(p.convert("L")) for p in pil])))
    index = pipe.index_dataset(ds.with_format(None)["label"])
    assert isinstance(index, ImageIndexDataset) and index[5] == {"image_index": 5, "labels": 5}
    with pytest.raises(ValueError, match="image_column 'nope'"):
        DeviceImagePipeline.from_dataset(ds, "nope", mean=MEAN, std=STD)


def test_nhwc_input_to_and_errors():
    images = random_images(4)
    nhwc = DeviceImagePipeline(images.permute(0, 2, 3, 1).numpy(), MEAN, STD, layout="NHWC")
    assert torch.equal(nhwc.images, images) and nhwc.images.is_contiguous()
    assert nhwc.to("cpu") is nhwc and nhwc.columns == ("image_index",)
    with pytest.raises(ValueError, match="uint8"):
        DeviceImagePipeline(images.float(), MEAN, STD)
    with pytest.raises(ValueError, match="one value per channel"):
        DeviceImagePipeline(images, MEAN[:2], STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        DeviceImagePipeline(images, MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="padding"):
        DeviceImagePipeline(images, MEAN, STD, padding=-1)
    with pytest.raises(ValueError, match="one value per stored image"):
        nhwc.index_dataset([0, 1])
    with pytest.raises(ValueError, match="one value per row"):
        nhwc({"image_index": torch.arange(4)}, seeds_for(0, 0, range(3)))
    with pytest.raises(ValueError, match="image_index or pixel_values"):
        nhwc({"labels": torch.arange(4)}, None)
