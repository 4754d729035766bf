"""Can the data pipeline keep up? Images/s of loading + augmentation alone vs the training step's images/s.

CIFAR-10 train (the local Hub-layout copy; skipped with a message where absent) through the HF ``datasets``
``with_transform`` path: decode the PIL/JPEG image, random crop 32 with 4 padding, horizontal flip,
to tensor, normalise (the paper's augmentation). Measured, each over ``--images`` images:

- ``getitem``: ``dataset[i]`` one row at a time (decode + augment, no batching);
- ``loader wN``: a plain ``DataLoader`` (batch 128, default collator, N workers), what the stock Trainer does;
- ``sbtrainer wN``: ``SharpBalanceTrainer.get_train_dataloader()`` (m members' sub-batches per step, each row
  augmented under its (member, epoch, row) seed), N workers.

Per-row fetch vs batched raw read, side by side (``side_by_side``): the member loader with
``MemberStreamDataset(batched_reads=False)`` (before: ``dataset[row]`` per row, one Arrow read and decode
call each) and with ``batched_reads=True`` (after, the trainer's default: the step's raw rows read and
decoded in one call, the transform per row under its seed), alternating, ``--repeats`` rounds each, medians
and the ratio after/before per worker count. ``breakdown`` splits one image's cost into the Arrow read +
decode (per row and batched) and the transform (crop + flip + to tensor + normalise) alone. With 0 workers the
two loaders are stepped in turn and each step timed (wall and process CPU time), so a loaded machine slows
both alike.

CPU per-row pipeline vs the device pipeline (``device_pipeline``, `device_vs_cpu_images_per_s`, also imported by
gpu_check.py): the same member steps (m sub-batches of B rows, (member, epoch, row) seeds) through

- ``cpu_loader``: the member loader over decoded uint8 images, each row to PIL + crop/flip + to tensor +
  normalise under its seed (the recipes' CPU path without the JPEG/PNG decode), collated, moved to the device;
- ``device_loader``: the member loader over ``DeviceImagePipeline.index_dataset`` (row indices), collated, moved,
  the rows' seeds computed, then ``DeviceImagePipeline`` (gather + crop/flip + normalise on the device);
- ``device_augment``: the ``DeviceImagePipeline`` call alone (indices and seeds prepared beforehand).

Each variant is timed over ``--images`` images per round, rounds alternating (the order flips each round), medians;
on CPU here, and on CUDA too when available.

Step images/s come from step_cost.json in ``--out-dir`` or benchmarks/results (run step_cost.py first) or ``--step-images-per-s``.
With 2 cores, worker processes compete with the training step for the same cores; the column
``load_share_w0`` is the fraction of step time that loading would add in the main process.

    .venv/bin/python benchmarks/data_pipeline.py            # default sizes (~1 min)
    .venv/bin/python benchmarks/data_pipeline.py --smoke    # seconds; for the tests
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C
import torch
from torch.utils.data import DataLoader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6144, help="images per measurement")
    p.add_argument("--batch", type=int, default=128, help="per-member batch")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the side-by-side comparison")
    p.add_argument("--step-images-per-s", type=float, default=None, help="override step_cost.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.workers, args.repeats = 64, 16, "0", 1
    return args


def augment_fn(train: bool = True):
    """A batched ``with_transform`` function: PIL ``img`` -> normalised ``pixel_values``, ``label`` -> ``labels``."""
    from torchvision import transforms as T

    ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    tf = T.Compose([*ops, T.ToTensor(), T.Normalize(C.CIFAR_MEAN, C.CIFAR_STD)])

    def apply(batch: dict) -> dict:
        return {"pixel_values": [tf(img.convert("RGB")) for img in batch["img"]], "labels": batch["label"]}

    return apply


def images_per_s(loader, images: int, per_batch: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    n, t = 0, time.perf_counter()
    for batch in it:
        n += per_batch if isinstance(batch, dict) else len(batch)
        if n >= images:
            break
    return n / (time.perf_counter() - t)


def member_loader(ds, args, workers: int, batched: bool, epoch: int = 0) -> DataLoader:
    """The trainer's member loader (sampler, stream dataset, default collator) with or without batched reads."""
    from transformers import default_data_collator

    from sbtrainer.sampling import MemberBatchSampler, MemberStreamDataset

    seeds = list(range(args.members))
    sampler = MemberBatchSampler(len(ds), args.batch, seeds)
    sampler.set_epoch(epoch)
    return DataLoader(MemberStreamDataset(ds, seeds, batched_reads=batched), batch_sampler=sampler,
                      collate_fn=default_data_collator, num_workers=workers, persistent_workers=False)


def _interleaved_main_process(ds, args) -> dict:
    """0 workers: both loaders stepped in turn (the order flips each step), each ``next`` timed on its own.

    Wall and process-CPU seconds are summed per variant, so both see the same load of a shared machine.
    """
    its = {b: iter(member_loader(ds, args, 0, b)) for b in (False, True)}
    for it in its.values():
        next(it)  # the first batch is not throughput
    wall, cpu, n = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}, {False: 0, True: 0}
    step = 0
    while min(n.values()) < args.images:
        for b in ((False, True) if step % 2 == 0 else (True, False)):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                next(its[b])
            except StopIteration:  # a new epoch: a fresh loader, its first batch timed like any other
                its[b] = iter(member_loader(ds, args, 0, b, epoch=step + 1))
                next(its[b])
            wall[b] += time.perf_counter() - w0
            cpu[b] += time.process_time() - c0
            n[b] += args.batch * args.members
        step += 1
    row = {"workers": 0, "per_row_images_per_s": n[False] / wall[False], "batched_images_per_s": n[True] / wall[True],
           "per_row_images_per_cpu_s": n[False] / cpu[False], "batched_images_per_cpu_s": n[True] / cpu[True]}
    row["batched_over_per_row"] = row["batched_images_per_s"] / row["per_row_images_per_s"]
    row["batched_over_per_row_cpu"] = row["batched_images_per_cpu_s"] / row["per_row_images_per_cpu_s"]
    return row


def side_by_side(ds, args) -> list[dict]:
    """Per-row fetch vs batched raw read, before and after, in one run.

    0 workers: interleaved step by step (`_interleaved_main_process`). N > 0 workers: whole measurements
    alternating (the order flips each round), ``--repeats`` rounds, medians.
    """
    import statistics

    rows = []
    for w in map(int, args.workers.split(",")):
        if w == 0:
            rows.append(_interleaved_main_process(ds, args))
            continue
        rates: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats):
            for batched in ((False, True) if r % 2 == 0 else (True, False)):
                loader = member_loader(ds, args, w, batched, epoch=r)
                rates[batched].append(images_per_s(loader, args.images, args.batch * args.members))
        before, after = statistics.median(rates[False]), statistics.median(rates[True])
        rows.append({"workers": w, "per_row_images_per_s": before, "batched_images_per_s": after,
                     "batched_over_per_row": after / before, "per_row_runs": rates[False],
                     "batched_runs": rates[True]})
    return rows


def breakdown(ds, transform, args) -> dict:
    """CPU microseconds per image (medians over chunks): Arrow read + decode per row, batched, and the transform.

    Chunks of one step's rows (m * B), disjoint: in each pair of chunks one is read row by row and the
    other in one call (which comes first flips each pair); the transform then runs on the batched chunk's
    rows one at a time.
    """
    import statistics

    raw = ds.with_format(None)
    step = args.batch * args.members
    pairs = max(1, min(args.images, len(ds)) // (2 * step))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    per_row, batched, tf = [], [], []
    for k in range(pairs):
        first, second = idx[2 * k * step:(2 * k + 1) * step], idx[(2 * k + 1) * step:(2 * k + 2) * step]
        one_by_one, in_one_call = (first, second) if k % 2 == 0 else (second, first)
        for batched_read in ((False, True) if k % 2 == 0 else (True, False)):
            c = time.process_time()
            if batched_read:
                decoded = raw.__getitems__(in_one_call)
                batched.append((time.process_time() - c) / len(in_one_call))
            else:
                for i in one_by_one:
                    raw[i]
                per_row.append((time.process_time() - c) / len(one_by_one))
        c = time.process_time()
        for ex in decoded:
            transform({"img": [ex["img"]], "label": [ex["label"]]})
        tf.append((time.process_time() - c) / len(decoded))
    return {"read_decode_per_row_us": 1e6 * statistics.median(per_row),
            "read_decode_batched_us": 1e6 * statistics.median(batched),
            "transform_per_row_us": 1e6 * statistics.median(tf), "chunks": pairs, "rows_per_read": step}


class _UInt8AugmentDataset(torch.utils.data.Dataset):
    """Rows ``{"pixel_values": transform(PIL image), "labels": y}`` of decoded uint8 images: the CPU per-row path."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as PIL wants it
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        return {"pixel_values": self.transform(Image.fromarray(self.hwc[i])), "labels": self.labels[i]}


def device_vs_cpu_images_per_s(images: torch.Tensor, labels: torch.Tensor, batch: int, members: int,
                               device: str | torch.device, rounds: int = 3, images_per_round: int | None = None,
                               padding: int = 4) -> dict:
    """Images/s of the CPU per-row augmentation vs `sbtrainer.data.DeviceImagePipeline`, the same member steps.

    Args:
        images: ``(N, C, H, W)`` uint8 decoded images (CPU); labels: ``(N,)`` int.
        batch: rows per member per step (B); members: m (a step has m * B rows, drop_last per member).
        device: where the batches go (``"cpu"`` or ``"cuda"``); CUDA work is synchronised before a clock is read.
        rounds: alternating rounds (order flipped each round) after one warm-up step per variant; medians.
        images_per_round: images each variant processes per round (default N, at least one step).
        padding: the crop's zero padding (4: ``RandomCrop(32, padding=4)``).

    Returns:
        ``{"device", "images", "rows_per_step", "steps_per_round", "rounds", "store_mb",
        "cpu_loader_images_per_s", "device_loader_images_per_s", "device_augment_images_per_s",
        "device_loader_over_cpu", "device_augment_over_cpu", "<variant>_runs", "<variant>_images_per_cpu_s"}``:
        images per wall second (medians, and every round's), and per second of this process's CPU time (the
        steadier figure on a shared CPU machine; on CUDA it leaves out the GPU's own time).
    """
    import statistics

    from torchvision import transforms as T
    from transformers import default_data_collator

    from sbtrainer.data import DeviceImagePipeline
    from sbtrainer.sampling import TAG_AUGMENT, MemberBatchSampler, MemberStreamDataset, mix_seed

    device = torch.device(device)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W) uint8; got {images.dtype} {tuple(images.shape)}")
    n, channels, height, width = images.shape
    mean, std = (C.CIFAR_MEAN, C.CIFAR_STD) if channels == 3 else ((0.5,) * channels, (0.25,) * channels)
    member_seeds = list(range(members))
    rows_per_step = batch * members
    steps = max(1, (images_per_round or n) // rows_per_step)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def key_stream():
        sampler = MemberBatchSampler(n, batch, member_seeds, drop_last=True)
        if len(sampler) == 0:
            raise ValueError(f"{n} images give no full sub-batch of {batch} rows")
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from sampler
            epoch += 1

    def seeds_of(keys) -> torch.Tensor:
        return torch.tensor([mix_seed(member_seeds[m], e, r, TAG_AUGMENT) for m, e, r in keys], dtype=torch.int64)

    sync()
    t = time.perf_counter()
    pipe = DeviceImagePipeline(images, mean, std, padding=padding, device=device)
    sync()
    store_s = time.perf_counter() - t
    train_tf = T.Compose([T.RandomCrop((height, width), padding=padding), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    cpu_ds = MemberStreamDataset(_UInt8AugmentDataset(images, labels, train_tf), member_seeds)
    index_ds = MemberStreamDataset(pipe.index_dataset(labels), member_seeds)
    streams = {name: key_stream() for name in ("cpu_loader", "device_loader", "device_augment")}
    prepared: list[tuple[torch.Tensor, torch.Tensor]] = []  # device_augment: (index on device, seeds) per step

    def cpu_loader() -> None:
        b = default_data_collator(cpu_ds.__getitems__(next(streams["cpu_loader"])))
        b["pixel_values"].to(device), b["labels"].to(device)

    def device_loader() -> None:
        keys = next(streams["device_loader"])
        b = {k: v.to(device) for k, v in default_data_collator(index_ds.__getitems__(keys)).items()}
        pipe(b, seeds_of(keys))

    def device_augment(step: int) -> None:
        index, seeds = prepared[step % len(prepared)]
        pipe({"image_index": index}, seeds)

    for _ in range(steps + 1):
        keys = next(streams["device_augment"])
        prepared.append((torch.tensor([r for _, _, r in keys], device=device), seeds_of(keys)))
    runs: dict[str, list[float]] = {"cpu_loader": [], "device_loader": [], "device_augment": []}
    cpu_runs: dict[str, list[float]] = {k: [] for k in runs}
    fns = {"cpu_loader": lambda s: cpu_loader(), "device_loader": lambda s: device_loader(),
           "device_augment": device_augment}
    for fn in fns.values():  # warm-up: first allocations, CUDA kernels
        fn(steps)
    sync()
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t, c = time.perf_counter(), time.process_time()
            for s in range(steps):
                fns[name](s)
            sync()
            runs[name].append(steps * rows_per_step / (time.perf_counter() - t))
            cpu_runs[name].append(steps * rows_per_step / max(time.process_time() - c, 1e-9))
    res = {"device": str(device), "images": n, "rows_per_step": rows_per_step, "steps_per_round": steps,
           "rounds": rounds, "store_mb": images.numel() / 2**20, "store_build_s": store_s}
    for name, xs in runs.items():
        res[f"{name}_images_per_s"] = statistics.median(xs)
        res[f"{name}_runs"] = xs
        res[f"{name}_images_per_cpu_s"] = statistics.median(cpu_runs[name])
    res["device_loader_over_cpu"] = res["device_loader_images_per_s"] / res["cpu_loader_images_per_s"]
    res["device_augment_over_cpu"] = res["device_augment_images_per_s"] / res["cpu_loader_images_per_s"]
    return res


def device_section(raw_ds, args) -> list[dict]:
    """`device_vs_cpu_images_per_s` on CPU and, when available, CUDA, for the first ``--images`` decoded rows."""
    from sbtrainer.data import DeviceImagePipeline

    rows = raw_ds.select(range(min(len(raw_ds), args.images)))
    images = DeviceImagePipeline.from_dataset(rows, "img", mean=C.CIFAR_MEAN, std=C.CIFAR_STD).images
    labels = torch.tensor(rows["label"])
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    return [device_vs_cpu_images_per_s(images, labels, args.batch, args.members, d, rounds=args.repeats)
            for d in devices]


def step_rates(args) -> list[dict]:
    if args.step_images_per_s:
        return [{"source": "--step-images-per-s", "images_per_s": args.step_images_per_s}]
    folders = [Path(args.out_dir)] if args.out_dir else []
    path = next((f / "step_cost.json" for f in [*folders, C.RESULTS] if (f / "step_cost.json").is_file()),
                C.RESULTS / "step_cost.json")
    if not path.is_file():
        print(f"{path} not found: run step_cost.py first for the step side of the comparison")
        return []
    res = json.loads(path.read_text())
    return [{"source": f"step_cost {r['model']} {row['config']}", "images_per_s": row["images_per_s"]}
            for r in res["results"] for row in r["rows"] if row["config"] in ("sgd", "sam", "sb_k0.3")]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ds = C.load_cifar_hf("train")
    if ds is None:
        payload = {"config": vars(args), "skipped": f"CIFAR-10 not found at {C.CIFAR_DIR}"}
        C.write_result("data_pipeline", payload, args.out_dir)
        return payload
    from transformers import default_data_collator

    raw_ds = ds.select(range(min(len(ds), 2 * args.images + 4 * args.batch * args.members)))
    ds = raw_ds.with_transform(augment_fn())
    cost = breakdown(raw_ds, augment_fn(), args)
    pairs = side_by_side(ds, args)
    C.print_table([cost], list(cost), title="CPU microseconds per image")
    C.print_table(pairs, ["workers", "per_row_images_per_s", "batched_images_per_s", "batched_over_per_row",
                          "per_row_images_per_cpu_s", "batched_images_per_cpu_s", "batched_over_per_row_cpu"],
                  title=f"member loader (m={args.members}, B={args.batch}): per-row fetch vs batched raw read "
                        f"(w0: interleaved per step; wN: medians of {args.repeats} alternating rounds)")
    device_rows = device_section(raw_ds, args)
    C.print_table(device_rows, ["device", "cpu_loader_images_per_s", "device_loader_images_per_s",
                                "device_augment_images_per_s", "device_loader_over_cpu", "device_augment_over_cpu",
                                "cpu_loader_images_per_cpu_s", "device_loader_images_per_cpu_s",
                                "device_augment_images_per_cpu_s"],
                  title=f"CPU per-row crop/flip vs DeviceImagePipeline (m={args.members}, B={args.batch}, decoded "
                        f"uint8 rows; medians of {args.repeats} alternating rounds)")
    rows = []
    t = time.perf_counter()
    n = min(args.images, 2048)
    for i in range(n):
        ds[i]
    rows.append({"pipeline": "getitem (1 core)", "images_per_s": n / (time.perf_counter() - t)})
    for w in map(int, args.workers.split(",")):
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=w, collate_fn=default_data_collator,
                            persistent_workers=False)
        rows.append({"pipeline": f"loader w{w}", "images_per_s": images_per_s(loader, args.images, args.batch)})
        trainer = C.make_trainer("sharpbalance", C.model_factory("cnn", 4), ds, members=args.members,
                                 batch_size=args.batch, dataloader_num_workers=w,
                                 remove_unused_columns=False)  # with_transform needs the raw img column
        loader = trainer.get_train_dataloader()
        rows.append({"pipeline": f"sbtrainer w{w} (m={args.members})",
                     "images_per_s": images_per_s(loader, args.images, args.batch * args.members)})
    C.print_table(rows, ["pipeline", "images_per_s"],
                  title=f"CIFAR-10 decode + crop/flip + normalise, {torch.get_num_threads()} torch threads, "
                        f"{C.machine_info()['nproc']} cores")
    steps = step_rates(args)
    main_proc = next(r["images_per_s"] for r in rows if r["pipeline"].startswith("sbtrainer w0"))
    for s in steps:
        s["loader_over_step"] = main_proc / s["images_per_s"]
        s["load_share_w0"] = s["images_per_s"] / (s["images_per_s"] + main_proc)
    if steps:
        C.print_table(steps, ["source", "images_per_s", "loader_over_step", "load_share_w0"],
                      title="training step vs the sbtrainer loader in the main process (w0)")
    payload = {"config": vars(args), "pipelines": rows, "side_by_side": pairs, "breakdown": cost, "steps": steps,
               "device_pipeline": device_rows,
               "targets": [{"target": "loader (w0) images/s >= step images/s", "model": s["source"],
                            "value": s["loader_over_step"], "met": s["loader_over_step"] >= 1} for s in steps]}
    C.write_result("data_pipeline", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
