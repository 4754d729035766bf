"""Trainer overhead: an epoch of `SharpBalanceTrainer` next to the plain PyTorch loop a user would write.

The setting (issue 11): real CIFAR-10 (the local Hub-layout copy; random CIFAR-shaped data with a message
where absent), ``--rows`` training rows, random crop 32 with padding 4 + horizontal flip through the HF
``with_transform`` path, the 3-block CNN with BatchNorm of ``_common.small_cnn``, ``--members`` members, batch
``--batch`` per member, SGD (lr 0.1, momentum 0.9, weight decay 5e-4), one process, the same
``dataloader_num_workers`` on both sides.

- ``bare``: each member owns a shuffled ``DataLoader`` over the same dataset (default collator), and the
  members are stepped in lockstep: per step, for each member, forward, mean cross-entropy, backward,
  optimizer step. No logging, no seeding per row, no scheduler.
- ``trainer``: `SharpBalanceTrainer` with ``ensemble_method="deep_ensemble"`` (no SAM at all) on the same data.

The two alternate epoch by epoch in one process: a callback runs one bare epoch at the end of each trainer
epoch (outside the trainer epoch's timer), so a loaded machine slows both alike. The first epoch of each is
a warm-up and not counted; the report gives medians of ``--epochs`` epochs each and the ratio trainer / bare.

``sharpbalance``: the same trainer with ``ensemble_method="sharpbalance"`` (k = ``--k``), scored once at the
start of epoch 1 (Td = 1) so the timed epochs are all after Td; its epoch time (scoring excluded, reported
apart) is compared with the bare deep-ensemble epoch and with the bound ``(1 + f)`` where ``f`` is the measured
in-batch SAM share (mean fraction of a member's sub-batch rows in its SAM set: one extra forward+backward
on those rows).

``--profile``: one more trainer epoch and one bare epoch under ``cProfile``, the time grouped by where it goes
(data read + decode, augmentation, per-row RNG seeding, collation, forward/backward/optimizer, the HF loop,
sbtrainer's own step code), side by side.

    .venv/bin/python benchmarks/overhead.py              # default sizes (~3 min on 2 cores)
    .venv/bin/python benchmarks/overhead.py --smoke      # seconds; for the tests
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import _common as C
import torch
from torch import nn
from torch.utils.data import DataLoader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="training rows")
    p.add_argument("--batch", type=int, default=128, help="rows per member per step")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--width", type=int, default=32, help="channels of the CNN's first block")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per side (after one warm-up epoch)")
    p.add_argument("--workers", type=int, default=0, help="dataloader_num_workers, both sides")
    p.add_argument("--k", type=float, default=0.2, help="SharpBalance's k")
    p.add_argument("--no-sharpbalance", action="store_true", help="skip the SharpBalance comparison")
    p.add_argument("--profile", action="store_true", help="profile one epoch of each side")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.batch, args.epochs, args.width = 64, 16, 1, 4
    return args


def augment_fn():
    """A batched ``with_transform``: PIL ``img`` -> crop 32 pad 4, flip, to tensor, normalise; ``label`` -> ``labels``."""
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(C.CIFAR_MEAN, C.CIFAR_STD)])

    def apply(batch: dict) -> dict:
        return {"pixel_values": [tf(img.convert("RGB")) for img in batch["img"]], "labels": batch["label"]}

    return apply


def dataset(rows: int):
    """``(dataset, source)``: the CIFAR-10 rows with the augmentation, or random tensors when the copy is absent."""
    ds = C.load_cifar_hf("train")
    if ds is None:
        x, y, src = C.cifar_tensors(rows, real=False)
        return C.TensorDictDataset(x, y), src
    return ds.select(range(min(rows, len(ds)))).with_transform(augment_fn()), "cifar10"


class BareLoop:
    """The plain loop: m members, each with its own shuffled loader and optimizer, stepped in lockstep."""

    def __init__(self, ds, args: argparse.Namespace) -> None:
        from transformers import default_data_collator

        torch.manual_seed(0)
        self.members = [C.small_cnn(width=args.width) for _ in range(args.members)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in self.members]
        self.loaders = [DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                                   collate_fn=default_data_collator, generator=torch.Generator().manual_seed(i))
                        for i in range(args.members)]
        self.loss = nn.CrossEntropyLoss()

    def epoch(self) -> float:
        """Seconds of one epoch."""
        t = time.perf_counter()
        for m in self.members:
            m.train()
        for batches in zip(*self.loaders, strict=True):
            for member, opt, batch in zip(self.members, self.opts, batches, strict=True):
                opt.zero_grad(set_to_none=True)
                self.loss(member(batch["pixel_values"]), batch["labels"]).backward()
                opt.step()
        return time.perf_counter() - t


def timed_trainer(method: str, ds, bare: BareLoop | None, args: argparse.Namespace, **overrides) -> dict:
    """Run ``1 + epochs`` trainer epochs; a bare epoch after each (if ``bare``). Per-epoch seconds, scoring apart."""
    from transformers import TrainerCallback

    record: dict[str, list[float]] = {"trainer": [], "bare": [], "scoring": []}

    class Alternate(TrainerCallback):
        def on_epoch_begin(self, *_a, **_k):
            self.t = time.perf_counter()
            self.scoring0 = sum(record["scoring"])

        def on_epoch_end(self, *_a, **_k):
            record["trainer"].append(time.perf_counter() - self.t - (sum(record["scoring"]) - self.scoring0))
            if bare is not None:
                record["bare"].append(bare.epoch())

    trainer = C.make_trainer(method, C.model_factory("cnn", args.width), ds, members=args.members,
                             batch_size=args.batch, max_steps=-1, num_train_epochs=1 + args.epochs,
                             dataloader_num_workers=args.workers, remove_unused_columns=False,
                             callbacks=[Alternate()], **overrides)
    score = trainer.score_and_install

    def timed_score(epoch: int) -> None:
        t = time.perf_counter()
        score(epoch)
        record["scoring"].append(time.perf_counter() - t)

    trainer.score_and_install = timed_score
    sam_share: list[float] = []
    if method == "sharpbalance":
        step = trainer._member_step

        def counting_step(i, batch, sam_mask, row_weight):
            sam_share.append(float(sam_mask.float().mean()))
            return step(i, batch, sam_mask, row_weight)

        trainer._member_step = counting_step
    trainer.train()
    out = {k: v[1:] if k != "scoring" else v for k, v in record.items()}  # epoch 0 is the warm-up
    out["steps_per_epoch"] = args.rows // args.batch
    if sam_share:
        out["sam_share_f"] = statistics.fmean(sam_share)
    return out


# -- profile ------------------------------------------------------------------------------------------
CATEGORIES = (  # (category, substrings of "file:function"); the first match wins, in this order
    ("per-row RNG seeding", ("sampling.py:_seed_globals", "sampling.py:__enter__", "sampling.py:__exit__")),
    ("augmentation (torchvision, PIL)", ("torchvision/", "PIL/")),
    ("data read + decode (datasets, arrow)", ("datasets/", "pyarrow/")),
    ("collation", ("data_collator.py",)),
    ("optimizer step", ("torch/optim/",)),
    ("backward", ("torch/autograd/", "torch/_tensor.py:backward")),
    ("forward (modules)", ("torch/nn/",)),
    ("sbtrainer step and streams", ("sbtrainer/",)),
    ("HF loop and accelerate", ("transformers/", "accelerate/")),
)


def _category(key: tuple) -> str:
    name = f"{key[0]}:{key[2]}"
    for cat, needles in CATEGORIES:
        if any(n in name for n in needles):
            return cat
    return "other (torch ops, python)"


def grouped(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of own time (``tottime``) summed per category.

    A built-in (a C function such as ``conv2d`` or ``run_backward``) has no file: its time goes to the
    category of the caller that spent the most time in it (e.g. ``torch/nn/modules/conv.py`` -> forward).
    """
    table = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for key, (_cc, _nc, tottime, _ct, callers) in table.items():
        owner = key
        for _ in range(4):  # climb through chains of built-ins
            if owner[0] != "~" or not callers:
                break
            owner = max(callers, key=lambda c: callers[c][3])
            callers = table.get(owner, (0, 0, 0, 0, {}))[4]
        cat = _category(owner)
        out[cat] = out.get(cat, 0.0) + tottime
    return out


def profile(ds, args: argparse.Namespace) -> list[dict]:
    bare = BareLoop(ds, args)
    bare.epoch()  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    bare.epoch()
    prof.disable()
    bare_cats = grouped(pstats.Stats(prof))
    from transformers import TrainerCallback

    prof = cProfile.Profile()

    class ProfileSecondEpoch(TrainerCallback):  # epoch 0 warms up; epoch 1 is profiled (no start-up costs)
        def on_epoch_begin(self, _args, state, *_a, **_k):
            if state.epoch >= 1:
                prof.enable()

        def on_epoch_end(self, _args, state, *_a, **_k):
            prof.disable()

    trainer = C.make_trainer("deep_ensemble", C.model_factory("cnn", args.width), ds, members=args.members,
                             batch_size=args.batch, max_steps=-1, num_train_epochs=2,
                             dataloader_num_workers=args.workers, remove_unused_columns=False,
                             callbacks=[ProfileSecondEpoch()])
    trainer.train()
    trainer_cats = grouped(pstats.Stats(prof))
    cats = sorted(set(bare_cats) | set(trainer_cats), key=lambda c: -trainer_cats.get(c, 0.0))
    return [{"where": c, "trainer_s": trainer_cats.get(c, 0.0), "bare_s": bare_cats.get(c, 0.0),
             "extra_s": trainer_cats.get(c, 0.0) - bare_cats.get(c, 0.0)} for c in cats]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    ds, source = dataset(args.rows)
    bare = BareLoop(ds, args)
    de = timed_trainer("deep_ensemble", ds, bare, args)
    rows = [{"side": "bare loop (deep ensemble)", "epoch_s": statistics.median(de["bare"])},
            {"side": "SharpBalanceTrainer deep_ensemble", "epoch_s": statistics.median(de["trainer"])}]
    ratio = rows[1]["epoch_s"] / rows[0]["epoch_s"]
    rows[1]["over_bare"] = ratio
    payload = {"config": vars(args), "data": source, "deep_ensemble": de, "ratio_deep_ensemble": ratio,
               "target_deep_ensemble": {"bound": 1.10, "met": ratio <= 1.10}}
    if not args.no_sharpbalance:
        sb = timed_trainer("sharpbalance", ds, bare, args, sam_fraction=args.k, scoring_start_epoch=1,
                           score_method="hooks")
        f = sb.get("sam_share_f", 0.0)
        sb_ratio = statistics.median(sb["trainer"]) / statistics.median(sb["bare"])
        rows += [{"side": "bare loop (deep ensemble), beside SB", "epoch_s": statistics.median(sb["bare"])},
                 {"side": f"SharpBalanceTrainer sharpbalance k={args.k} (after Td)",
                  "epoch_s": statistics.median(sb["trainer"]), "over_bare": sb_ratio, "bound_1_plus_f": 1 + f}]
        payload.update(sharpbalance=sb, ratio_sharpbalance=sb_ratio, sam_share_f=f,
                       target_sharpbalance={"bound": 1 + f, "met": sb_ratio <= 1 + f})
    C.print_table(rows, ["side", "epoch_s", "over_bare", "bound_1_plus_f"],
                  title=f"{args.members} members, {args.rows} rows ({source}), batch {args.batch} per member, "
                        f"workers {args.workers}, medians of {args.epochs} alternating epochs")
    if args.profile:
        prof = profile(ds, args)
        C.print_table(prof, ["where", "trainer_s", "bare_s", "extra_s"],
                      title="one epoch under cProfile, own time per category (profiler overhead included)")
        payload["profile"] = prof
    C.write_result("overhead", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
