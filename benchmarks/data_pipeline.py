"""Can the data pipeline keep up? Images/s of loading + augmentation alone vs the training step's images/s.

CIFAR-10 train (the local Hub-layout copy; skipped with a message where absent) through the HF ``datasets``
``with_transform`` path: decode the PIL/JPEG image, random crop 32 with 4 padding, horizontal flip,
to tensor, normalise (the paper's augmentation). Measured, each over ``--images`` images:

- ``getitem``: ``dataset[i]`` one row at a time (decode + augment, no batching);
- ``loader wN``: a plain ``DataLoader`` (batch 128, default collator, N workers), what the stock Trainer does;
- ``sbtrainer wN``: ``SharpBalanceTrainer.get_train_dataloader()`` (m members' sub-batches per step, each row
  fetched under its (member, epoch, row) seed), N workers.

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
    p.add_argument("--step-images-per-s", type=float, default=None, help="override step_cost.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.workers = 64, 16, "0"
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

    ds = ds.select(range(min(len(ds), 2 * args.images + 4 * args.batch * args.members))).with_transform(augment_fn())
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
    payload = {"config": vars(args), "pipelines": rows, "steps": steps,
               "targets": [{"target": "loader (w0) images/s >= step images/s", "model": s["source"],
                            "value": s["loader_over_step"], "met": s["loader_over_step"] >= 1} for s in steps]}
    C.write_result("data_pipeline", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
