"""Wall time of a 3-member run on 1 process vs W processes in members mode (`ensemble_parallelism="members"`).

Both sides run the same training (3 members, SAM, batch 128 per member, small CNN on CIFAR-10 rows), one
thread per process, launched with `torchrun` (gloo on CPU) back to back; the figure is the ratio of the
`train()` wall times (W = 3 ideally 1/3 on 3 free cores; a 2-core machine bounds it).

    .venv/bin/python benchmarks/members_parallel.py [--steps 20] [--world 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    x, y, source = C.cifar_tensors(args.rows, real=not args.smoke)
    train = C.TensorDictDataset(x, y)
    trainer = C.make_trainer("sam", lambda: C.small_cnn(width=args.width), train, members=3,
                             batch_size=args.batch, max_steps=args.steps, ensemble_parallelism=args.mode)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        Path(args.result).write_text(json.dumps({"wall_s": wall, "world": trainer.accelerator.num_processes,
                                                 "owned": trainer.owned_members, "data": source}))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(world: int, mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    result = tmp / f"w{world}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(29500 + world + os.getpid() % 1000), __file__, "--worker", "--mode", mode, "--result", str(result),
           "--steps", str(args.steps), "--rows", str(args.rows), "--batch", str(args.batch), "--width", str(args.width)]
    if args.smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"W={world} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=2560)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--world", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, synthetic data (for the test)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="data", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.rows, args.batch, args.width = 2, 48, 8, 4
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, "data", args, Path(tmp))
        many = launch(args.world, "members", args, Path(tmp))
    row = {"steps": args.steps, "batch_per_member": args.batch, "w1_wall_s": one["wall_s"],
           f"w{args.world}_wall_s": many["wall_s"], "ratio": many["wall_s"] / one["wall_s"],
           "ideal_ratio": 1 / args.world, "data": one["data"], "load_avg_1min": os.getloadavg()[0]}
    C.print_table([row], list(row), title=f"3 members, SAM: 1 process vs {args.world} processes in members mode")
    C.write_result("members_parallel", {"results": [row]}, args.out_dir)


if __name__ == "__main__":
    main()
