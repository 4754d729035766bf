"""A short real run of the three methods on CIFAR-10 with the device-side image pipeline (GPU check, part d).

Real CIFAR-10 rows from ``$SBTRAINER_CIFAR10`` (the Hub-layout parquet files, read with pyarrow: the lent
GPU machines have no ``datasets``; random images with a note where absent). ``--rows`` training rows are
held as uint8 on the device (`sbtrainer.data.DeviceImagePipeline`: crop 32 pad 4 + flip per row, drawn from
each row's (member seed, epoch, row) seed), the first ``--test-rows`` test rows are the eval set. Each
method trains a 3-member CIFAR-stem ResNet18 (width ``--width``) for ``--epochs`` epochs with the paper's
SGD (lr 0.1, momentum 0.9, weight decay 5e-4; cosine here, the run is short), bf16 autocast and
channels_last on CUDA; SharpBalance scores at the start of epoch ``--td`` (k = 0.4). Per method: epoch
seconds (scoring apart), images/s of the whole trainer loop, test accuracy and NLL of the ensemble and the
members. The JSON is written after each method, so a timeout keeps what was measured.

    python benchmarks/gpu_real_run.py                     # on the GPU machine (bash benchmarks/gpu_check.sh)
    .venv/bin/python benchmarks/gpu_real_run.py --tiny    # the CPU path, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--test-rows", type=int, default=2_000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--td", type=int, default=1, help="SharpBalance's scoring epoch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", default="deep_ensemble,sam,sharpbalance")
    p.add_argument("--budget-s", type=float, default=60, help="start no method after this many seconds")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the CPU smoke test")
    p.add_argument("--hide-datasets", action="store_true", help="simulate a machine without datasets/evaluate")
    p.add_argument("--out-dir", default=None, help="JSON folder (default $OUT, else benchmarks/results)")
    args, _ = p.parse_known_args(argv)  # gpu_check.sh passes its own options to both scripts
    if args.tiny:
        args.rows, args.test_rows, args.width, args.epochs, args.batch = 64, 32, 4, 2, 16
        args.budget_s = float("inf")  # every method runs: the smoke test checks them all
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.hide_datasets:
        from gpu_check import hide_packages

        hide_packages()
    import _common as C
    import torch

    from sbtrainer.data import DeviceImagePipeline

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = args.out_dir or os.environ.get("OUT") or None
    x, y, source = C.cifar_uint8(args.rows, "train")
    xt, yt, _ = C.cifar_uint8(args.test_rows, "test", seed=1)
    pipe = DeviceImagePipeline(x, C.CIFAR_MEAN, C.CIFAR_STD, padding=4, channels_last=cuda, device=device)
    test = [{"pixel_values": xt[i], "labels": yt[i]} for i in range(len(yt))]  # uint8: normalised on the device
    payload: dict = {"config": vars(args), "data": source, "device": str(device), "bf16": cuda,
                     "channels_last": cuda, "methods": {}, "errors": {}}

    for method in args.methods.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            payload["errors"][method] = f"not started: budget {args.budget_s} s spent"
            continue
        try:
            payload["methods"][method] = run_method(method, pipe, y, test, args)
        except Exception as err:  # record and go on: a partial result beats none
            payload["errors"][method] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        C.write_result("gpu_real_run", payload, out_dir)
    rows = [{"method": k, "epoch_s_median": C.median(v["epoch_s"]), "images_per_s": v["images_per_s_steady"],
             "scoring_s": sum(v["scoring_s"]), "test_acc": v["test"].get("eval_ensemble_accuracy"),
             "member_acc": v["test"].get("eval_member_accuracy"), "nll": v["test"].get("eval_ensemble_nll")}
            for k, v in payload["methods"].items()]
    C.print_table(rows, ["method", "epoch_s_median", "images_per_s", "scoring_s", "test_acc", "member_acc", "nll"],
                  title=f"{device}: {args.rows} CIFAR-10 rows ({source}), {args.epochs} epochs, ResNet18 w{args.width}")
    payload["wall_s"] = time.perf_counter() - t_start
    C.write_result("gpu_real_run", payload, out_dir)
    return payload


def run_method(method: str, pipe, labels, test, args: argparse.Namespace) -> dict:
    """Train one 3-member ensemble with ``method``; epoch seconds (scoring apart), images/s, test metrics."""
    import _common as C
    import torch
    from transformers import TrainerCallback, default_data_collator

    cuda = torch.cuda.is_available()
    epochs: list[float] = []
    scoring: list[float] = []

    class Clock(TrainerCallback):
        def on_epoch_begin(self, *_a, **_k):
            if cuda:
                torch.cuda.synchronize()
            self.t, self.s = time.perf_counter(), sum(scoring)

        def on_epoch_end(self, *_a, **_k):
            if cuda:
                torch.cuda.synchronize()
            epochs.append(time.perf_counter() - self.t - (sum(scoring) - self.s))

    extra = dict(sam_fraction=0.4, scoring_start_epoch=args.td) if method == "sharpbalance" else {}
    trainer = C.make_trainer(method, C.model_factory("resnet18", args.width), pipe.index_dataset(labels),
                             batch_size=args.batch, max_steps=-1, num_train_epochs=args.epochs,
                             lr_scheduler_type="cosine", bf16=cuda, per_device_eval_batch_size=512,
                             dataloader_drop_last=False, callbacks=[Clock()], **extra)
    trainer.device_transform = pipe
    trainer.data_collator = default_data_collator
    if cuda:
        trainer.model.to(memory_format=torch.channels_last)
    score = trainer.score_and_install

    def timed_score(epoch: int) -> None:
        t = time.perf_counter()
        score(epoch)
        scoring.append(time.perf_counter() - t)

    trainer.score_and_install = timed_score
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    metrics = trainer.evaluate(test)
    steps = -(-args.rows // args.batch)
    return {"epoch_s": epochs, "scoring_s": scoring, "train_s": train_s,
            "images_per_s_steady": steps * args.batch * 3 / C.median(epochs[1:] or epochs),
            "test": {k: v for k, v in metrics.items() if isinstance(v, float)}}


if __name__ == "__main__":
    main()
