"""Study: deep ensemble vs SAM ensemble vs SharpBalance on real CIFAR-10 at CPU scale (issue 14, items 2 and 4).

    .venv/bin/python recipes/studies/cifar10_cpu.py                       # the main table (~1 CPU hour per seed)
    .venv/bin/python recipes/studies/cifar10_cpu.py --phase select        # rho for SAM, then k, on a held-out 10%
    .venv/bin/python recipes/studies/cifar10_cpu.py --tiny --out /tmp/s   # the smoke-test size (about a minute)

Each run is `recipes/cifar_resnet.py` with the paper's CIFAR-10 config of its method
(``recipes/configs/cifar10_<method>.yaml``: SGD 0.1 momentum 0.9 wd 5e-4, crop 32 pad 4 + flip, step decay
x0.1 at 1/2 and 3/4 of training, SAM to Td then the subset phase) scaled down: ``--rows`` real training rows
(``../shared/data/cifar10``, rows drawn at random with ``--subset_seed``), a CIFAR-stem ResNet18 of width
``--width``, ``--epochs`` epochs with Td = epochs / 2, m = 3 members with seeds ``(s, s+1, s+2)`` for study
seed ``s``. Evaluated: member and ensemble accuracy, EIR, DER, variance, KL, NLL, ECE on ``--eval-rows`` random
test rows and on the 15 generated corruptions x 5 severities of ``--corrupt-rows`` of them; accuracy on the
training rows without augmentation (eval mode); the members' adaptive worst-case sharpness.

Resumable: one JSON per run in ``--out`` (``<phase>/<method>_rho<rho>_k<k>_seed<s>.json``); a rerun skips every
run whose JSON exists. Each JSON holds the recipe's results and the run's wall and CPU seconds. ``summary.json``
and ``summary.md`` (mean ± half-range over seeds per method) are rewritten after every run. The selection phase
(App. D.3): SAM ensembles over ``--rhos`` evaluated on a held-out 10% of the training rows, then SharpBalance
over ``--ks`` with the best ρ; the main phase takes ``--rho``/``--k`` (pass the selected ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs
from _runs import ROOT, run_recorded

DATA = Path(os.environ.get("SBTRAINER_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))
METHODS = ("deep_ensemble", "sam", "sharpbalance")
KEYS = ("eval_ensemble_accuracy", "eval_member_accuracy", "eval_eir", "eval_der", "eval_variance", "eval_kl",
        "eval_ensemble_nll", "eval_ensemble_ece", "cifar10c_all_ensemble_accuracy", "cifar10c_all_member_accuracy",
        "cifar10c_all_eir", "cifar10c_all_der", "cifar10c_all_ensemble_nll", "cifar10c_all_ensemble_ece",
        "train_ensemble_accuracy", "train_member_accuracy", "train_ensemble_nll", "sharpness")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("main", "select"), default="main")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "studies" / "cifar10_cpu"))
    p.add_argument("--work", default=str(ROOT / "outputs" / "studies" / "cifar10_cpu"), help="run folders (ignored)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--eval-rows", type=int, default=1000)
    p.add_argument("--corrupt-rows", type=int, default=300)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--k", type=float, default=0.4)
    p.add_argument("--rhos", default="0.02,0.05,0.1,0.2")
    p.add_argument("--ks", default="0.2,0.4,0.6")
    p.add_argument("--sharpness-batches", type=int, default=20)
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch threads per run (1: reproducible, and no OpenMP spin-waiting beside other jobs)")
    p.add_argument("--max-hours", type=float, default=None, help="start no run after this many hours")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    p.add_argument("--corruptions", default=None, help="comma-separated subset of the 15 (default: all)")
    p.add_argument("--severities", default="1,2,3,4,5")
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.eval_rows, args.corrupt_rows, args.width, args.epochs, args.batch = 48, 24, 8, 4, 2, 16
        args.seeds, args.sharpness_batches, args.rhos, args.ks = "0", 2, "0.05,0.1", "0.4"
        args.corruptions, args.severities = args.corruptions or "gaussian_noise", "5"
    return args


def run_name(method: str, rho: float, k: float, seed: int | None = None) -> str:
    """``deep_ensemble``, ``sam_rho<ρ>``, ``sharpbalance_rho<ρ>_k<k>``, with ``_seed<s>`` when a seed is given."""
    name = {"deep_ensemble": method, "sam": f"sam_rho{rho:g}"}.get(method, f"{method}_rho{rho:g}_k{k:g}")
    return name if seed is None else f"{name}_seed{seed}"


def recipe_argv(args: argparse.Namespace, method: str, rho: float, k: float, seed: int, out_dir: Path,
                heldout: bool) -> list[str]:
    td = max(1, args.epochs // 2)
    argv = [str(ROOT / "recipes" / "configs" / f"cifar10_{method}.yaml"), "--dataset_name", str(DATA),
            "--output_dir", str(out_dir), "--max_train_samples", str(args.rows), "--model_width", str(args.width),
            "--num_train_epochs", str(args.epochs), "--lr_milestones", str(args.epochs // 2), str(3 * args.epochs // 4),
            "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", "500",
            "--seed", str(seed), "--member_seeds", str(seed), str(seed + 1), str(seed + 2),
            "--subset_seed", str(args.subset_seed), "--sharpness_batches", str(args.sharpness_batches),
            "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "20", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--report_to", "none", "--num_threads", str(args.num_threads)]
    if method != "deep_ensemble":
        argv += ["--rho", str(rho)]
    if method == "sharpbalance":
        argv += ["--sam_fraction", str(k), "--scoring_start_epoch", str(td)]
    if heldout:  # App. D.3: select on 10% of the training rows; no corrupted sets
        argv += ["--validation_fraction", "0.1", "--corrupt_offline", "false", "--max_eval_samples", str(args.eval_rows)]
    else:
        argv += ["--max_eval_samples", str(args.eval_rows), "--corrupt_offline", "true",
                 "--corrupt_samples", str(args.corrupt_rows), "--severities", *args.severities.split(",")]
        if args.corruptions:
            argv += ["--corruptions", *args.corruptions.split(",")]
    return argv


def run_one(args: argparse.Namespace, phase: str, method: str, rho: float, k: float, seed: int) -> dict:
    """Run one (method, rho, k, seed) unless its JSON exists; returns its record."""
    name = run_name(method, rho, k, seed)
    out_dir = Path(args.work) / phase / name
    meta = {"phase": phase, "method": method, "rho": rho if method != "deep_ensemble" else None,
            "k": k if method == "sharpbalance" else None, "seed": seed,
            "setting": {"rows": args.rows, "width": args.width, "epochs": args.epochs, "batch": args.batch,
                        "td": max(1, args.epochs // 2), "eval_rows": args.eval_rows,
                        "corrupt_rows": args.corrupt_rows, "subset_seed": args.subset_seed}}
    return run_recorded("cifar_resnet.py", recipe_argv(args, method, rho, k, seed, out_dir, heldout=phase == "select"),
                        out_dir, Path(args.out) / phase / f"{name}.json", meta)


def write_summary(args: argparse.Namespace, phase: str, records: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(run_name(r["method"], r["rho"] or 0, r["k"] or 0), []).append(r)
    return _runs.write_summary(Path(args.out) / phase, phase, groups, KEYS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not (DATA / "plain_text").is_dir():
        raise SystemExit(f"CIFAR-10 not found at {DATA} (set SBTRAINER_CIFAR10): this study needs the real images")
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    plan: list[tuple[str, float, float, int]] = []
    if args.phase == "main":
        plan = [(m, args.rho, args.k, s) for s in seeds for m in methods]
    records = []

    def due() -> bool:
        return args.max_hours is None or (time.perf_counter() - start) / 3600 < args.max_hours

    if args.phase == "select":  # rho for SAM first, then k for SharpBalance with that rho
        rhos = [float(r) for r in args.rhos.split(",")]
        for rho in rhos:
            if due():
                records.append(run_one(args, "select", "sam", rho, args.k, seeds[0]))
        done = [r for r in records if r["method"] == "sam"]
        if len(done) == len(rhos):
            best = max(done, key=lambda r: r["results"]["eval_ensemble_accuracy"])["rho"]
            for k in (float(x) for x in args.ks.split(",")):
                if due():
                    records.append(run_one(args, "select", "sharpbalance", best, k, seeds[0]))
    for method, rho, k, seed in plan:
        if due():
            records.append(run_one(args, args.phase, method, rho, k, seed))
            write_summary(args, args.phase, records)
    payload = write_summary(args, args.phase, records)
    print(Path(args.out, args.phase, "summary.md").read_text())
    return payload


if __name__ == "__main__":
    main()
