"""The sharpness-diversity trade-off (paper Sec. 4.1-4.2, Fig. 1c, 3-5): a ρ sweep of SAM ensembles, SharpBalance beside.

    python recipes/tradeoff.py recipes/configs/tradeoff_cifar10.yaml
    accelerate launch recipes/tradeoff.py recipes/configs/tradeoff_cifar10.yaml --model_width 16   # Fig. 5 widths

For every ρ in ``--rhos`` a SAM ensemble of CIFAR-stem ResNets is trained, and for every ρ in
``--sharpbalance_rhos`` a SharpBalance ensemble (same seeds, data and schedule). Each ensemble gives one
point: the members' mean adaptive worst-case sharpness (eq. 3, on training batches, ρ0 = 0.5, App. D.2)
against its diversity (DER eq. 2, variance eq. 1, KL eq. 11) and its ensemble improvement rate (EIR eq. 4),
measured on the corrupted test sets as in Sec. 4.1 (on the clean test set when no corrupted set is
asked for). The fitted slope β of log DER on log sharpness over the SAM points is Fig. 5's. Writes
``results.json``/``tradeoff.md``, ``tradeoff_{der,variance,kl}.png`` (colour: EIR; Fig. 3) and
``tradeoff_der_member_ood.png`` (colour: the members' OOD accuracy; Fig. 4, second row), and each
ensemble into ``output_dir/ensemble/<method>_rho<ρ>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from cifar_data import cifar_transforms, corrupted_sets, evaluate_corrupted, load_cifar, ood_prefix, views
from cifar_resnet import CifarArgs, build_member
from recipe_utils import (
    member_sharpness,
    paper_sgd,
    parse_args,
    phase,
    run_script,
    save_ensemble,
    setup_logging,
    start_run,
)
from transformers import set_seed

from sbtrainer import EnsembleModel, SharpBalanceConfig, SharpBalanceTrainer
from sbtrainer.report import markdown_comparison_table, plot_sharpness_diversity, write_results

logger = logging.getLogger("sbtrainer.recipes.tradeoff")

POINT_KEYS = ("sharpness", "der", "variance", "kl", "eir", "member_accuracy", "ensemble_accuracy")


@dataclass
class TradeoffArgs(CifarArgs):
    rhos: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3], metadata={
        "help": "SAM radii of the SAM ensembles (App. D.2, Fig. 1: 0.01 ... 0.3)."})
    sharpbalance_rhos: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3], metadata={
        "help": "SAM radii of the SharpBalance ensembles drawn beside them (empty: none)."})


def run_config(config: SharpBalanceConfig, method: str, rho: float) -> SharpBalanceConfig:
    """``config`` for one ensemble of the sweep, with its own output folder."""
    label = f"{method}_rho{rho:g}"
    return dataclasses.replace(config, ensemble_method=method, rho=rho, output_dir=os.path.join(config.output_dir,
                                                                                               "runs", label))


def train_point(args: TradeoffArgs, config: SharpBalanceConfig, data: dict, sets: list | None,
                root: str) -> dict[str, Any]:
    """Train one ensemble and measure it: sharpness, diversity, EIR, accuracies (one point of the scatter)."""
    set_seed(config.seed)
    train_tf, eval_tf = cifar_transforms(data["num_classes"])
    train, score, test = views(data, train_tf, eval_tf)
    ensemble = EnsembleModel.from_factory(build_member(args, data["num_classes"]), config.num_members,
                                          config.member_seeds, reduction=config.ensemble_reduction)
    optimizers = paper_sgd(ensemble, config, len(train), args.momentum, args.lr_milestones, args.lr_gamma)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train, eval_dataset=test,
                                  score_dataset=score, optimizers=optimizers)
    with phase(f"training {config.num_members} members ({config.ensemble_method}, rho {config.rho:g})"):
        trainer.train()
    with phase("evaluating on the test set"):
        results = dict(trainer.evaluate())
    where = "eval"
    if sets is not None:
        prefix = ood_prefix(data["num_classes"])
        results.update(evaluate_corrupted(trainer, eval_tf, data, sets, prefix))
        where = f"{prefix}_all"
    point = {"label": config.ensemble_method, "method": config.ensemble_method, "rho": config.rho,
             "measured_on": where, "id_ensemble_accuracy": results["eval_ensemble_accuracy"]}
    if trainer.is_world_process_zero():
        point.update(member_sharpness(trainer.ensemble, score, args, disable_tqdm=config.disable_tqdm))
        point.update({k: results[f"{where}_{k}"] for k in POINT_KEYS[1:]})
        name = f"{config.ensemble_method}_rho{config.rho:g}"
        save_ensemble(trainer.ensemble, args, config, {k: point[k] for k in POINT_KEYS},
                      folder=os.path.join(root, "ensemble", name))
    trainer.accelerator.wait_for_everyone()
    return point


def tradeoff_slope(points: list[dict], method: str = "sam") -> float | None:
    """β: slope of log DER on log sharpness over ``method``'s points (Fig. 5), or None with < 2 usable points."""
    xy = [(p["sharpness"], p["der"]) for p in points if p["method"] == method
          and p.get("sharpness", 0) > 0 and p.get("der") is not None and p["der"] > 0 and math.isfinite(p["der"])]
    if len(xy) < 2 or len({x for x, _ in xy}) < 2:
        return None
    x, y = np.log([a for a, _ in xy]), np.log([b for _, b in xy])
    return float(np.polyfit(x, y, 1)[0])


def report(points: list[dict], output_dir: str, facts: dict[str, Any] | None = None) -> None:
    """results.json/.md (the points, the slope and the run ``facts``), tradeoff.md and the four scatter plots."""
    out = Path(output_dir)
    slope = tradeoff_slope(points)
    write_results({"points": points, "sam_slope_log_der_vs_log_sharpness": slope, **(facts or {})}, out,
                  name="results")
    rows = {f"{p['method']} ρ={p['rho']:g}": p for p in points}
    columns = [("sharpness", "sharpness", ".4f"), ("DER", "der", ".4f"), ("variance", "variance", ".4f"),
               ("KL", "kl", ".4f"), ("EIR", "eir", ".4f"), ("member acc", "member_accuracy", ".2%"),
               ("ensemble acc", "ensemble_accuracy", ".2%"), ("ID ensemble acc", "id_ensemble_accuracy", ".2%")]
    where = points[0]["measured_on"]
    (out / "tradeoff.md").write_text(f"# Sharpness-diversity trade-off\n\nDiversity, EIR and accuracies on `{where}`; "
                                     f"sharpness on training batches.\n\n{markdown_comparison_table(rows, columns, 'ensemble')}"
                                     f"\nβ (SAM, log DER vs log sharpness): {slope if slope is None else f'{slope:.3f}'}\n")
    for key in ("der", "variance", "kl"):
        plot_sharpness_diversity(points, out / f"tradeoff_{key}.png", diversity_key=key, title=f"diversity on {where}")
    plot_sharpness_diversity(points, out / "tradeoff_der_member_ood.png", color_key="member_accuracy",
                             title=f"colour: member accuracy on {where}")


def main() -> list[dict]:
    args, config = parse_args(TradeoffArgs)
    config.remove_unused_columns = False  # the transforms read the raw image column
    setup_logging(config)
    facts = start_run(args, config)
    data = load_cifar(args, args.max_train_samples, args.max_eval_samples, seed=args.subset_seed)
    sets, corrupt_facts = corrupted_sets(args, data, args.subset_seed, progress=not config.disable_tqdm)
    if sets is not None:
        with phase("generating the corrupted sets (once, shared by every ensemble)"):
            sets = list(sets)
    runs = [("sam", r) for r in args.rhos] + [("sharpbalance", r) for r in args.sharpbalance_rhos]
    points = []
    for k, (method, rho) in enumerate(runs):
        logger.info("ensemble %d of %d: %s, rho %g", k + 1, len(runs), method, rho)
        points.append(train_point(args, run_config(config, method, rho), data, sets, config.output_dir))
    if points and PartialState().is_main_process:
        report(points, config.output_dir, {**facts, **data["subsets"], **corrupt_facts})
    return points


if __name__ == "__main__":
    run_script(main)
