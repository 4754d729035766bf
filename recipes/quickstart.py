"""Quickstart: deep ensemble vs SAM ensemble vs SharpBalance on scikit-learn's digits, offline, on a CPU.

    .venv/bin/python recipes/quickstart.py            # what `make quickstart` runs; about a minute on 2 cores

Three 3-member ensembles of a small CNN are trained on the 8x8 grayscale digits that ship with
scikit-learn (1,347 train / 450 test images), one per method, with the same seeds. Each is evaluated
in distribution and on the test set corrupted by the 13 CIFAR-10-C corruptions that apply to 8x8
grayscale images, at 5 severities (`sbtrainer.data`), and the adaptive worst-case sharpness of every
member is measured (`sbtrainer.sharpness`). SharpBalance runs SAM on all data for the first half
(Td = epochs / 2), scores every training sample at Td and then runs SAM on each member's sharpness-aware
subset (k = 0.5) only. One comparison table is printed; tables (Markdown + JSON), figures and the
three saved ensembles go to ``--output_dir`` (default ``outputs/quickstart``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from recipe_utils import thread_info
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback

from sbtrainer import EnsembleModel, SharpBalanceConfig, SharpBalanceTrainer
from sbtrainer.data import SEVERITIES, corruptions_for, evaluate_corruptions, iter_corrupted_datasets
from sbtrainer.metrics import ensemble_metrics
from sbtrainer.models import small_cnn
from sbtrainer.report import (
    markdown_comparison_table,
    markdown_severity_table,
    plot_member_vs_ensemble,
    plot_sharpness_diversity,
    write_results,
)
from sbtrainer.sharpness import ensemble_sharpness

METHODS = ("deep_ensemble", "sam", "sharpbalance")
OOD = "digits_c"  # prefix of the corrupted-set metrics
COLUMNS = [  # (header, results key, format): the printed table
    ("member acc", "eval_member_accuracy", ".2%"),
    ("ensemble acc", "eval_ensemble_accuracy", ".2%"),
    ("EIR", f"{OOD}_all_eir", ".3f"),
    ("DER", f"{OOD}_all_der", ".3f"),
    ("sharpness", "sharpness", ".3f"),
    ("plain sharpness", "plain_sharpness", ".4f"),
    ("OOD acc", f"{OOD}_all_ensemble_accuracy", ".2%"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/quickstart")
    p.add_argument("--epochs", type=int, default=20, help="epochs per ensemble; SharpBalance scores at epochs // 2")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius of SAM and SharpBalance")
    p.add_argument("--sam_fraction", type=float, default=0.5, help="SharpBalance's k")
    p.add_argument("--ood_samples", type=int, default=450, help="test images corrupted per (corruption, severity)")
    p.add_argument("--sharpness_batches", type=int, default=50, help="batches of 5 training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the members (their init, data order, dropout)")
    p.add_argument("--subset_seed", type=int, default=0,
                   help="seed of the data choices: the --ood_samples test rows (drawn at random), their corruption "
                        "noise and the sharpness batches; --seed does not change them")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest for this tiny CNN and immune to oversubscribed CPUs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


class DigitsDataset(Dataset):
    """Rows ``{"pixel_values": (1, 8, 8) float32, "labels": int64}`` from uint8 images ``(N, 8, 8)``."""

    MEAN, STD = 0.3, 0.4  # of the digits' pixels scaled to [0, 1]

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.x = self.to_inputs(images)
        self.y = torch.as_tensor(labels, dtype=torch.long)

    @classmethod
    def to_inputs(cls, images: np.ndarray) -> torch.Tensor:
        """uint8 ``(N, 8, 8)`` -> normalised float ``(N, 1, 8, 8)``."""
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).unsqueeze(1) / 255.0
        return (x - cls.MEAN) / cls.STD

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def load_data(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as uint8 images ``(N, 8, 8)`` (0..16 scaled to 0..255) and labels, split 75/25 stratified."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return train_test_split(images, digits.target, test_size=0.25, stratify=digits.target, random_state=split_seed)


def ood_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` of ``n`` test rows drawn at random with ``seed`` (all ``n`` if ``k >= n``), in increasing order."""
    if k < 1:
        raise SystemExit(f"quickstart.py: error: --ood_samples must be >= 1; got {k}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:k]) if k < n else np.arange(n)


def corrupted_sets(images: np.ndarray, labels: np.ndarray, seed: int) -> list[tuple[str, int, DigitsDataset]]:
    """Every (corruption, severity) of the corruptions that apply to 8x8 grayscale, as datasets."""
    rows = [{"image": im, "label": int(y)} for im, y in zip(images, labels)]
    sets = []
    for name, severity, ds in iter_corrupted_datasets(rows, "image", corruptions_for(images.shape[1:]), SEVERITIES,
                                                      seed=seed, label_column="label", progress=False):
        corrupted = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
        sets.append((name, severity, DigitsDataset(corrupted, np.asarray(ds["label"]))))
    return sets


# ----------------------------------------------------------------------------- train and measure


def make_config(args: argparse.Namespace, method: str) -> SharpBalanceConfig:
    return SharpBalanceConfig(
        output_dir=os.path.join(args.output_dir, method), ensemble_method=method, num_members=args.members,
        num_train_epochs=args.epochs, scoring_start_epoch=args.epochs // 2, rho=args.rho, sam_fraction=args.sam_fraction,
        per_device_train_batch_size=32, learning_rate=0.05, optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4,
        lr_scheduler_type="cosine", max_grad_norm=0.0, seed=args.seed, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


@torch.no_grad()
def evaluate(ensemble: EnsembleModel, data: DigitsDataset, prefix: str) -> dict[str, float]:
    """``sbtrainer.metrics.ensemble_metrics`` of the ensemble on ``data``, keys ``f"{prefix}_{metric}"``."""
    ensemble.eval()
    member_logits = ensemble(pixel_values=data.x).member_logits  # (N, m, C)
    metrics = ensemble_metrics(member_logits, data.y, reduction=ensemble.reduction)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def run_method(args, method, train, test, sets, bar) -> tuple[dict, EnsembleModel]:
    """Train one ensemble, then evaluate it in distribution, on the corrupted sets, and its sharpness."""
    config = make_config(args, method)
    bar.set_postfix_str(f"{method}: training")
    ensemble = EnsembleModel.from_factory(lambda _seed: small_cnn(in_chans=1, num_classes=10, width=16, image_size=8),
                                          config.num_members, config.member_seeds)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train)
    trainer.remove_callback(PrinterCallback)  # the table is the output; no per-log prints
    start = time.perf_counter()
    trainer.train()
    results = {"method": method, "train_seconds": time.perf_counter() - start, **thread_info()}
    bar.update()
    bar.set_postfix_str(f"{method}: evaluating")
    results.update(evaluate(ensemble, test, "eval"))
    pooled = evaluate_corruptions(lambda ds, prefix: evaluate(ensemble, ds, prefix), sets, prefix=OOD, disable_tqdm=True)
    results.update({k: v for k, v in pooled.items() if "_severity_" in k or "_all_" in k or k.endswith("_accuracy")})
    bar.update()
    bar.set_postfix_str(f"{method}: sharpness")
    results.update(ensemble_sharpness(ensemble.members, train, rho0=0.5, steps=10, batch_size=5,
                                      num_batches=args.sharpness_batches, seed=args.subset_seed, disable_tqdm=True))
    # what plain SAM lowers: the non-adaptive worst case at its own radius (recipes/studies/sharpness_digits.py)
    results["plain_sharpness"] = ensemble_sharpness(
        ensemble.members, train, rho0=args.rho, steps=10, adaptive=False, batch_size=5,
        num_batches=args.sharpness_batches, seed=args.subset_seed, disable_tqdm=True)["sharpness"]
    if trainer.scoring_history:
        results["scoring_epochs"] = [h["epoch"] for h in trainer.scoring_history]
        results["sam_set_fraction"] = trainer.sam_masks.float().mean().item()
    bar.update()
    return results, ensemble


# ----------------------------------------------------------------------------- report


def write_outputs(args, by_method: dict, ensembles: dict, seconds: float) -> str:
    """Tables (Markdown + JSON), figures and the saved ensembles under ``args.output_dir``; returns the table."""
    out = Path(args.output_dir)
    table = markdown_comparison_table(by_method, COLUMNS)
    severity = markdown_severity_table(by_method, OOD, delta_vs="deep_ensemble")
    notes = (f"Digits (sklearn), {args.members}-member ensembles of a small CNN, {args.epochs} epochs, rho={args.rho}, "
             f"k={args.sam_fraction}, Td={args.epochs // 2}. Accuracies on the clean test set except 'OOD acc'; EIR, DER "
             f"and OOD acc on the corrupted test sets ({len(corruptions_for((8, 8)))} corruptions x 5 severities, "
             "pooled), where the paper measures diversity (Sec. 4.1). Sharpness: adaptive worst-case (eq. 3, rho0 = 0.5), "
             f"the members' mean; plain sharpness: the non-adaptive worst case at rho = {args.rho}. Plain SAM lowers the "
             "non-adaptive sharpness at its radius, partly by growing BatchNorm-normalised weights, which the adaptive "
             "measure ignores by design; on this small BN network it does not lower the adaptive one (ASAM does: "
             "recipes/studies/sharpness_digits.py).")
    (out / "comparison.md").write_text(f"# Quickstart\n\n{table}\n{notes}\n\n## OOD ensemble accuracy per severity\n\n"
                                       f"{severity}\nWall time: {seconds:.0f} s.\n")
    rows = {m: {h: r.get(k) for h, k, _ in COLUMNS} for m, r in by_method.items()}
    (out / "comparison.json").write_text(json.dumps({"columns": [h for h, _, _ in COLUMNS], "rows": rows,
                                                     "wall_seconds": seconds, "settings": vars(args)}, indent=2) + "\n")
    for method, results in by_method.items():
        write_results(results, out / method, name="results")
        ensembles[method].save_pretrained(out / method / "ensemble", config=make_config(args, method),
                                          metrics={k: results[k] for _, k, _ in COLUMNS if k in results})
    plot_member_vs_ensemble(by_method, out / "member_vs_ensemble_ood.png", prefix=f"{OOD}_all", title="corrupted digits")
    plot_member_vs_ensemble(by_method, out / "member_vs_ensemble.png", prefix="eval", title="clean digits")
    points = [{"sharpness": r["sharpness"], "der": r[f"{OOD}_all_der"], "eir": r[f"{OOD}_all_eir"], "label": m}
              for m, r in by_method.items()]
    plot_sharpness_diversity(points, out / "sharpness_diversity.png", title="diversity on corrupted digits")
    return table


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("sbtrainer").setLevel(logging.WARNING)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_data()  # one fixed split; --seed changes the members only
    train, test = DigitsDataset(x_train, y_train), DigitsDataset(x_test, y_test)
    with tqdm(total=1 + 3 * len(METHODS), desc="quickstart", file=sys.stderr) as bar:
        bar.set_postfix_str("corrupting the test set")
        rows = ood_rows(len(x_test), args.ood_samples, args.subset_seed)
        sets = corrupted_sets(x_test[rows], y_test[rows], args.subset_seed)
        bar.update()
        by_method, ensembles = {}, {}
        for method in METHODS:
            by_method[method], ensembles[method] = run_method(args, method, train, test, sets, bar)
    table = write_outputs(args, by_method, ensembles, time.perf_counter() - start)
    print(table)
    print(f"EIR, DER and OOD acc on the corrupted test sets. Wall time {time.perf_counter() - start:.0f} s on "
          f"{torch.get_num_threads()} torch thread(s). Tables, figures and ensembles in {args.output_dir}/")
    return by_method


if __name__ == "__main__":
    main()
