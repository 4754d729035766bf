"""The sharpness-diversity trade-off (paper Sec. 4.1-4.2, Fig. 1c, 3-5), the ensemble-size sweep (Fig. 15) and
the curvature ranking (Fig. 14).

    python recipes/tradeoff.py recipes/configs/tradeoff_cifar10.yaml                     # Fig. 1c, 3, 4: rho sweep
    python recipes/tradeoff.py recipes/configs/tradeoff_width_cifar10.yaml               # Fig. 5a: widths
    python recipes/tradeoff.py recipes/configs/tradeoff_sparsity_cifar10.yaml            # Fig. 5b: sparsities
    python recipes/tradeoff.py recipes/configs/tradeoff_ensemble_size_cifar100.yaml      # Fig. 15: m = 2..6
    python recipes/tradeoff.py recipes/configs/tradeoff_curvature_cifar10.yaml           # Fig. 14

``--sweep`` chooses what is trained (every ensemble: CIFAR-stem ResNets, same data, schedule and seeds):

- ``rho`` (default): for every ρ in ``--rhos`` a SAM ensemble, for every ρ in ``--sharpbalance_rhos`` a
  SharpBalance ensemble. Each ensemble gives one point: the members' mean adaptive worst-case sharpness (eq. 3,
  on training batches, ρ0 = ``--sharpness_rho0`` = 0.5, App. D.2) against its diversity (DER eq. 2, variance
  eq. 1, KL eq. 11) and its ensemble improvement rate (EIR eq. 4), measured on the corrupted test sets as in
  Sec. 4.1 (on the clean test set when no corrupted set is asked for). Writes ``results.json``/``tradeoff.md``,
  ``tradeoff_{der,variance,kl}.png`` (colour: EIR; Fig. 3), ``tradeoff_der_member_ood.png`` (colour: the
  members' OOD accuracy; Fig. 4, second row) and each ensemble into ``output_dir/ensemble/<method>_rho<ρ>``.
- ``width`` (Fig. 5a): the SAM ρ sweep of ``--rhos`` at every ResNet width of ``--widths`` (stage widths
  w, 2w, 4w, 8w; 64 is ResNet18; ``--model_width`` is not used). Ensembles ``ensemble/width<w>_sam_rho<ρ>``.
- ``sparsity`` (Fig. 5b): the SAM ρ sweep at every sparsity of ``--sparsities``: global magnitude pruning
  (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``) over every Conv2d/Linear weight of a
  member (global within each member; BatchNorm and biases are not pruned), ONCE, at the start of epoch
  ``--prune_epoch`` (0: at initialisation; the paper does not say when it prunes: when is our choice, see the
  option), the masks then kept until the end of training by the pruning re-parametrisation
  (``weight = weight_orig * weight_mask``: a pruned weight stays 0 whatever SGD, weight decay or SAM do to
  ``weight_orig``). Sparsity 0 is the dense model (no re-parametrisation). The sharpness is measured and the
  ensemble saved with the pruning made permanent (``prune.remove``: the pruned weights are stored zeros, the
  saved members reload with `EnsembleModel.from_pretrained`; the adaptive sharpness, ε = T δ with
  T = diag(|θ|), does not move a zero weight). Per-sample sharpness scoring of a pruned member (SharpBalance's,
  and ``--curvature_samples``'s) is the squared gradient norm over the TRAINABLE parameters, i.e.
  ``||mask ⊙ ∇_W loss||^2`` for a pruned weight: the hooks method refuses pruned modules (a derived weight) and
  ``score_method="auto"`` falls back to the exact vmap/loop. Ensembles ``ensemble/sparsity<s>_sam_rho<ρ>``.
  Each point records the pruning: ``pruned_fraction`` (zeros over prunable weights, per member, at pruning and
  after training), ``min_layer_density`` and ``zero_pattern_sha256`` (the zero pattern when pruned and after
  training, equal when the masks were kept).

  For both Fig. 5 sweeps, β of each level (width or sparsity) is the least-squares slope of ln DER on
  ln sharpness over that level's SAM ensembles (the figure's axes: both logarithmic, so the fitted line is
  straight there; the same fit as ``sam_slope_log_der_vs_log_sharpness`` of the rho sweep). Writes
  ``results.json`` (points, ``slopes``), ``tradeoff_<sweep>.md`` and ``tradeoff_<sweep>.png`` (markers coloured
  by EIR, one fitted line per level, β in the legend).
- ``ensemble_size`` (Fig. 15, App. F.5): for every m in ``--ensemble_sizes`` and every method of
  ``--size_methods`` (deep_ensemble, sam, sharpbalance) one ensemble of m members, seeds the first m of
  ``--seed_pool`` (the paper's list), ρ = ``--rho`` and k = ``--sam_fraction`` for all m (one training run per m:
  SharpBalance's partition depends on m). The ensemble's ECE (15 bins) and NLL on the pooled corrupted sets (and
  in distribution). Writes ``results.json``, ``ensemble_size.md``, ``ensemble_size.png`` (two panels, ECE and NLL
  against m, one line per method) and the ensembles ``ensemble/m<m>_<method>``.
- ``curvature`` (Fig. 14): one ensemble of ``--ensemble_method`` at ``--rho`` (as the rho sweep's point), then the
  curvature ranking below on its member ``--curvature_member``.

``--curvature_samples N`` (> 0, any sweep; on the FIRST ensemble the sweep trains): on N training rows drawn at
random with ``--subset_seed`` (eval transform), the member's per-sample sharpness
(`sbtrainer.scoring.per_sample_sharpness`, the Fisher-trace score SharpBalance ranks by) and its input-space loss
curvature (`sbtrainer.curvature.input_curvature`, Garg & Roy's finite-difference estimate, ``--curvature_h``,
``--curvature_directions`` Rademacher directions), their Spearman rank correlation, ``curvature.json`` (both
vectors, the rows, ρ) and ``curvature.png`` (Fig. 14's scatter).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from cifar_data import cifar_transforms, corrupted_sets, evaluate_corrupted, load_cifar, ood_prefix, views
from cifar_resnet import CifarArgs, build_member
from recipe_utils import (
    RecipeError,
    member_sharpness,
    paper_sgd,
    parse_args,
    phase,
    run_script,
    save_ensemble,
    setup_logging,
    start_run,
)
from torch import nn
from torch.nn.utils import prune
from transformers import TrainerCallback, set_seed

from sbtrainer import EnsembleModel, SharpBalanceConfig, SharpBalanceTrainer
from sbtrainer.curvature import (
    axes_metadata,
    input_curvature_dataset,
    plot_curvature_vs_sharpness,
    rank_correlation,
)
from sbtrainer.report import markdown_comparison_table, plot_sharpness_diversity, write_results
from sbtrainer.scoring import per_sample_sharpness

logger = logging.getLogger("sbtrainer.recipes.tradeoff")

POINT_KEYS = ("sharpness", "der", "variance", "kl", "eir", "member_accuracy", "ensemble_accuracy")
SWEEPS = ("rho", "width", "sparsity", "ensemble_size", "curvature")
SIZE_METHODS = ("deep_ensemble", "sam", "sharpbalance")
PAPER_SEEDS = [13, 17, 27, 113, 117, 127, 43, 59, 223]
"""The paper's nine seeds (Table 1 caption), in its order."""
FIG5_RHOS = [0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4]
"""App. D.2: the SAM radii of Fig. 5."""
PRUNABLE = (nn.Conv2d, nn.Linear)
SLOPE_AXES = "least-squares slope of ln DER (y) on ln sharpness (x) over the level's SAM ensembles"


@dataclass
class TradeoffArgs(CifarArgs):
    sweep: str = field(default="rho", metadata={"help": (
        "What to train: 'rho' (SAM ensembles over --rhos, SharpBalance over --sharpbalance_rhos; Fig. 1c, 3, 4), "
        "'width' (the SAM rho sweep at every --widths; Fig. 5a), 'sparsity' (the SAM rho sweep at every "
        "--sparsities; Fig. 5b), 'ensemble_size' (every --ensemble_sizes x --size_methods; Fig. 15) or 'curvature' "
        "(one --ensemble_method ensemble at --rho, then --curvature_samples; Fig. 14).")})
    rhos: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3], metadata={
        "help": "SAM radii of the SAM ensembles (App. D.2: Fig. 1 0.01 ... 0.3; Fig. 5 0.01 0.015 ... 0.4)."})
    sharpbalance_rhos: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3], metadata={
        "help": "--sweep rho: SAM radii of the SharpBalance ensembles drawn beside them (empty: none)."})
    widths: list[int] = field(default_factory=lambda: [8, 16, 64, 128], metadata={
        "help": "--sweep width: ResNet widths w (stages w, 2w, 4w, 8w; Fig. 5a: 8 16 64 128)."})
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.8, 0.95, 0.99], metadata={
        "help": "--sweep sparsity: fractions of each member's Conv2d/Linear weights pruned, in [0, 1) (Fig. 5b: "
                "0 0.8 0.95 0.99)."})
    prune_epoch: int = field(default=10, metadata={"help": (
        "--sweep sparsity: global magnitude pruning happens once, at the start of this epoch (0: at "
        "initialisation), masks kept to the end. Ours (the paper does not say): 10, after a short dense phase; "
        "at initialisation, global magnitude pruning of a ResNet18 empties its last Linear layer from sparsity "
        "0.95 on (its init weights are the smallest).")})
    ensemble_sizes: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6], metadata={
        "help": "--sweep ensemble_size: numbers of members m (Fig. 15: 2 ... 6), one training run per m and method."})
    size_methods: list[str] = field(default_factory=lambda: list(SIZE_METHODS), metadata={
        "help": "--sweep ensemble_size: the methods (deep_ensemble sam sharpbalance, Fig. 15)."})
    seed_pool: list[int] = field(default_factory=lambda: list(PAPER_SEEDS), metadata={
        "help": "--sweep ensemble_size: an m-member ensemble takes the first m seeds (default: the paper's nine, "
                "Table 1 caption, in its order)."})
    curvature_samples: int = field(default=0, metadata={"help": (
        "Fig. 14 (0: off): rank N training rows by per-sample sharpness (Fisher trace) and by input-space loss "
        "curvature (Garg and Roy) on member --curvature_member of the first ensemble trained; the paper uses 1000.")})
    curvature_member: int = field(default=0, metadata={"help": "The member --curvature_samples ranks with."})
    curvature_h: float = field(default=1e-3, metadata={
        "help": "Finite-difference step of the input curvature (Garg and Roy's release: 1e-3)."})
    curvature_directions: int = field(default=10, metadata={
        "help": "Rademacher directions per sample of the input curvature (Garg and Roy's release: 10)."})


def check_args(args: TradeoffArgs, config: SharpBalanceConfig) -> None:
    """Refuse sweep options that cannot work, before any data is loaded.

    Raises:
        RecipeError: naming the option, the rule and the value.
    """
    if args.sweep not in SWEEPS:
        raise RecipeError(f"--sweep must be one of {list(SWEEPS)}; got {args.sweep!r}")
    if args.sharpness_batches < 1:
        raise RecipeError(f"--sharpness_batches must be >= 1 here (each point's x is the members' sharpness); "
                          f"got {args.sharpness_batches}")
    if args.sweep in ("width", "sparsity") and not args.rhos:
        raise RecipeError(f"--sweep {args.sweep} trains a SAM rho sweep per level: --rhos must not be empty")
    if args.sweep == "width":
        if not args.widths or any(w < 1 for w in args.widths):
            raise RecipeError(f"--widths must be one or more ResNet widths >= 1; got {args.widths}")
        if args.arch.startswith("wrn-"):
            raise RecipeError(f"--sweep width varies the ResNet --model_width; --arch {args.arch} is a WideResNet "
                              f"(its width is its widen factor): use a ResNet --arch")
    if args.sweep == "sparsity":
        if not args.sparsities or any(not 0 <= s < 1 for s in args.sparsities):
            raise RecipeError(f"--sparsities must be one or more fractions in [0, 1); got {args.sparsities}")
        if any(s > 0 for s in args.sparsities) and not 0 <= args.prune_epoch < config.num_train_epochs:
            raise RecipeError(f"--prune_epoch must be in [0, num_train_epochs={config.num_train_epochs:g}) for the "
                              f"pruning to happen; got {args.prune_epoch}")
    if args.sweep == "ensemble_size":
        bad = [m for m in args.ensemble_sizes if not 2 <= m <= len(args.seed_pool)]
        if not args.ensemble_sizes or bad:
            raise RecipeError(f"--ensemble_sizes must be one or more sizes in [2, len(--seed_pool)={len(args.seed_pool)}]"
                              f"; got {args.ensemble_sizes}")
        if len(set(args.seed_pool)) != len(args.seed_pool):
            raise RecipeError(f"--seed_pool must not repeat a seed (two members would be the same); got {args.seed_pool}")
        if not args.size_methods or any(m not in SIZE_METHODS for m in args.size_methods):
            raise RecipeError(f"--size_methods must be one or more of {list(SIZE_METHODS)}; got {args.size_methods}")
    if args.curvature_samples < 0:
        raise RecipeError(f"--curvature_samples must be >= 0 (0: off); got {args.curvature_samples}")
    if args.sweep == "curvature" and args.curvature_samples == 0:
        raise RecipeError("--sweep curvature needs --curvature_samples > 0 (the paper ranks 1000 rows)")
    if args.curvature_samples:
        members = args.ensemble_sizes[0] if args.sweep == "ensemble_size" else config.num_members
        if not 0 <= args.curvature_member < members:
            raise RecipeError(f"--curvature_member must be in [0, {members}) (the first ensemble's members); "
                              f"got {args.curvature_member}")
        if not (math.isfinite(args.curvature_h) and args.curvature_h > 0):
            raise RecipeError(f"--curvature_h must be a finite number > 0; got {args.curvature_h}")
        if args.curvature_directions < 1:
            raise RecipeError(f"--curvature_directions must be >= 1; got {args.curvature_directions}")


def run_config(config: SharpBalanceConfig, method: str, rho: float, label: str | None = None,
               **changes: Any) -> SharpBalanceConfig:
    """``config`` for one ensemble of the sweep, with its own output folder ``runs/<label>`` (default ``<method>_rho<ρ>``)."""
    label = label or f"{method}_rho{rho:g}"
    return dataclasses.replace(config, ensemble_method=method, rho=rho,
                               output_dir=os.path.join(config.output_dir, "runs", label), **changes)


# ----------------------------------------------------------------------------- pruning (Fig. 5b)


def prunable_weights(member: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every Conv2d and Linear of ``member``, in module order."""
    return [(m, "weight") for m in member.modules() if isinstance(m, PRUNABLE)]


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward uses: ``weight_orig * weight_mask`` for a pruned module, else ``weight``."""
    if hasattr(module, "weight_orig"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def pruning_facts(member: nn.Module) -> dict[str, Any]:
    """``pruned_fraction`` (zero weights over all prunable weights), ``min_layer_density`` and ``zero_pattern_sha256``.

    The digest is SHA-256 of the ``weight == 0`` pattern of every Conv2d/Linear weight (module order, row-major,
    one byte per weight): the same before and after training exactly when the masks were kept.
    """
    digest = hashlib.sha256()
    zeros = total = 0
    densities = []
    for module, _ in prunable_weights(member):
        zero = _effective_weight(module) == 0
        digest.update(zero.cpu().numpy().astype(np.uint8).tobytes())
        zeros, total = zeros + int(zero.sum()), total + zero.numel()
        densities.append(1.0 - float(zero.float().mean()))
    return {"pruned_fraction": zeros / max(total, 1), "prunable_weights": total, "min_layer_density": min(densities),
            "zero_pattern_sha256": digest.hexdigest()}


def prune_member(member: nn.Module, sparsity: float) -> dict[str, Any]:
    """Global magnitude pruning of ``member``: the ``sparsity`` fraction of its Conv2d/Linear weights with the
    smallest ``|w|`` (ranked together across layers) are masked, ``round(sparsity * total)`` weights.

    ``torch.nn.utils.prune.global_unstructured(..., pruning_method=prune.L1Unstructured)``: each weight becomes
    ``weight_orig * weight_mask`` (a parameter and a buffer), and stays so until ``prune.remove``.
    Returns `pruning_facts` after pruning; warns when a layer is emptied (density 0: the signal is cut there).
    """
    prune.global_unstructured(prunable_weights(member), pruning_method=prune.L1Unstructured, amount=sparsity)
    facts = pruning_facts(member)
    if facts["min_layer_density"] == 0:
        logger.warning("pruning %.4g of the weights emptied at least one layer (density 0): the member's output no "
                       "longer depends on its input past that layer; prune later (--prune_epoch) or less", sparsity)
    return facts


def prune_ensemble(ensemble: EnsembleModel, sparsity: float, epoch: int) -> dict[str, Any]:
    """`prune_member` on every member (each member's weights ranked on their own); the per-member facts."""
    facts = [prune_member(member, sparsity) for member in ensemble.members]
    logger.info("pruned %.4g of every member's Conv2d/Linear weights at the start of epoch %d (min layer density "
                "%.4g)", sparsity, epoch, min(f["min_layer_density"] for f in facts))
    return {"pruned_at_epoch": epoch, "at_pruning": facts}


def permanent(ensemble: EnsembleModel) -> EnsembleModel:
    """A copy of ``ensemble`` with every pruning made permanent (``prune.remove``: the masked weights are zeros)."""
    for module in ensemble.modules():
        if hasattr(module, "weight_orig"):
            module.weight = _effective_weight(module)  # a leaf for deepcopy; the pre-hook recomputes it anyway
    out = copy.deepcopy(ensemble)
    for module in out.modules():
        if hasattr(module, "weight_orig"):
            prune.remove(module, "weight")
    return out


class PruneAtEpoch(TrainerCallback):
    """Prune the ensemble once, at the start of epoch ``epoch`` (> 0), and write the facts into ``record``."""

    def __init__(self, ensemble: EnsembleModel, sparsity: float, epoch: int, record: dict[str, Any]) -> None:
        self.ensemble, self.sparsity, self.epoch, self.record = ensemble, sparsity, epoch, record

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.epoch is exactly e at the start of epoch e (it reaches e + 1.0 on the epoch's last step)
        if "pruned_at_epoch" not in self.record and round(state.epoch or 0) >= self.epoch:
            self.record.update(prune_ensemble(self.ensemble, self.sparsity, round(state.epoch or 0)))


# ----------------------------------------------------------------------------- training one ensemble


def train_ensemble(args: TradeoffArgs, config: SharpBalanceConfig, data: dict, sets: list | None,
                   sparsity: float = 0.0) -> tuple[SharpBalanceTrainer, dict[str, Any], str, Any, dict[str, Any]]:
    """Train one ensemble and evaluate it; ``(trainer, results, where, score_view, pruning_record)``.

    ``where`` is the metric prefix diversity and calibration are read under (the pooled corrupted sets, else
    ``eval``); with ``sparsity > 0`` the members are pruned at ``--prune_epoch`` (`prune_ensemble`).
    """
    set_seed(config.seed)
    train_tf, eval_tf = cifar_transforms(data["num_classes"])
    train, score, test = views(data, train_tf, eval_tf)
    ensemble = EnsembleModel.from_factory(build_member(args, data["num_classes"]), config.num_members,
                                          config.member_seeds, reduction=config.ensemble_reduction)
    record: dict[str, Any] = {}
    if sparsity > 0 and args.prune_epoch == 0:
        record.update(prune_ensemble(ensemble, sparsity, 0))
    optimizers = paper_sgd(ensemble, config, len(train), args.momentum, args.lr_milestones, args.lr_gamma)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train, eval_dataset=test,
                                  score_dataset=score, optimizers=optimizers)
    if sparsity > 0 and args.prune_epoch > 0:
        trainer.add_callback(PruneAtEpoch(ensemble, sparsity, args.prune_epoch, record))
    with phase(f"training {config.num_members} members ({config.ensemble_method}, rho {config.rho:g}"
               f"{f', sparsity {sparsity:g}' if sparsity else ''})"):
        trainer.train()
    if sparsity > 0 and not record:
        logger.warning("sparsity %g: training ended before epoch %d (--prune_epoch), so the members were never "
                       "pruned; this point is a dense ensemble", sparsity, args.prune_epoch)
    with phase("evaluating on the test set"):
        results = dict(trainer.evaluate())
    where = "eval"
    if sets is not None:
        prefix = ood_prefix(data["num_classes"])
        results.update(evaluate_corrupted(trainer, eval_tf, data, sets, prefix))
        where = f"{prefix}_all"
    return trainer, results, where, score, record


def train_point(args: TradeoffArgs, config: SharpBalanceConfig, data: dict, sets: list | None, root: str,
                name: str | None = None, level: dict[str, Any] | None = None, sparsity: float = 0.0,
                curvature: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one ensemble and measure it: sharpness, diversity, EIR, accuracies (one point of the scatter).

    ``name``: the ensemble's folder under ``root/ensemble`` (default ``<method>_rho<ρ>``); ``level``: keys added
    to the point (``sweep``, ``level`` and the width or sparsity); ``curvature``: when given (a dict), the
    `curvature_ranking` of this ensemble is computed and its summary stored there.
    """
    trainer, results, where, score, record = train_ensemble(args, config, data, sets, sparsity)
    point = {"label": config.ensemble_method, "method": config.ensemble_method, "rho": config.rho, **(level or {}),
             "measured_on": where, "id_ensemble_accuracy": results["eval_ensemble_accuracy"]}
    if trainer.is_world_process_zero():
        final = permanent(trainer.ensemble) if record else trainer.ensemble
        if record:
            point["pruning"] = {**record, "after_training": [pruning_facts(m) for m in final.members]}
        point.update(member_sharpness(final, score, args, disable_tqdm=config.disable_tqdm))
        point.update({k: results[f"{where}_{k}"] for k in POINT_KEYS[1:]})
        name = name or f"{config.ensemble_method}_rho{config.rho:g}"
        save_ensemble(final, args, config, {k: point[k] for k in POINT_KEYS}, folder=os.path.join(root, "ensemble", name))
        if curvature is not None:
            curvature.update(curvature_ranking(args, config, trainer.ensemble, score, root, name))
    trainer.accelerator.wait_for_everyone()
    return point


def curvature_ranking(args: TradeoffArgs, config: SharpBalanceConfig, ensemble: EnsembleModel, score: Any,
                      root: str, name: str) -> dict[str, Any]:
    """Fig. 14 on member ``--curvature_member``: per-sample sharpness vs input curvature, Spearman's rho, plot.

    Rows: ``--curvature_samples`` training rows (eval view) drawn at random with ``--subset_seed``, in row order.
    The sharpness is `per_sample_sharpness` with the config's ``score_method`` (for a pruned member, over its
    trainable parameters); the curvature is `input_curvature_dataset` (``--curvature_h``,
    ``--curvature_directions``, directions seeded with ``--subset_seed``). Writes ``curvature.json`` and
    ``curvature.png`` into ``root``; returns the summary (no per-sample vectors).
    """
    member = ensemble.members[args.curvature_member]
    n = min(args.curvature_samples, len(score))
    rows = np.sort(np.random.default_rng(args.subset_seed).permutation(len(score))[:n]).tolist()
    kwargs = {"rows": rows, "batch_size": config.score_batch_size, "input_name": ensemble.input_name}
    with phase(f"Fig. 14: per-sample sharpness and input curvature of member {args.curvature_member} on {n} rows"):
        sharp = per_sample_sharpness(member, score, method=config.score_method, progress=not config.disable_tqdm,
                                     **kwargs)
        curv = input_curvature_dataset(member, score, h=args.curvature_h, num_directions=args.curvature_directions,
                                       seed=args.subset_seed, **kwargs)
    rho = rank_correlation(curv, sharp)
    summary = {"ensemble": name, "member": args.curvature_member, "samples": n, "spearman": rho,
               "h": args.curvature_h, "directions": args.curvature_directions, "direction": "rademacher",
               "sharpness": "Fisher trace ||grad_theta loss||^2 (sbtrainer.scoring)",
               "curvature": "mean_k ||grad_x loss(x + h v_k) - grad_x loss(x)|| / h, v_k Rademacher (Garg and Roy)"}
    out = Path(root)
    write_results({**summary, "rows": rows, "sharpness_values": sharp.tolist(), "curvature_values": curv.tolist()},
                  out, name="curvature")
    plot_curvature_vs_sharpness(curv, sharp, out / "curvature.png", title=f"{name}, member {args.curvature_member}")
    logger.info("Fig. 14: Spearman rank correlation %.3f over %d rows", rho, n)
    return summary


# ----------------------------------------------------------------------------- fits and reports


def loglog_fit(points: list[dict]) -> tuple[float, float] | None:
    """``(β, c)`` of ``ln DER = c + β ln sharpness`` (least squares) over ``points``; None with < 2 usable points.

    A point is usable with sharpness > 0 and a finite DER > 0; at least two distinct sharpness values are needed.
    """
    xy = [(p["sharpness"], p["der"]) for p in points if (p.get("sharpness") or 0) > 0 and p.get("der") is not None
          and math.isfinite(p["der"]) and p["der"] > 0]
    if len(xy) < 2 or len({x for x, _ in xy}) < 2:
        return None
    slope, intercept = np.polyfit(np.log([a for a, _ in xy]), np.log([b for _, b in xy]), 1)
    return float(slope), float(intercept)


def tradeoff_slope(points: list[dict], method: str = "sam") -> float | None:
    """β: slope of log DER on log sharpness over ``method``'s points (Fig. 5), or None with < 2 usable points."""
    fit = loglog_fit([p for p in points if p["method"] == method])
    return None if fit is None else fit[0]


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


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """PNG at 100 dpi; the axes' labels, titles and legends also go into its ``Axes`` text chunk (for checks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Axes": axes_metadata(fig)})
    logger.info("wrote %s", path)
    return path


def level_fits(points: list[dict]) -> dict[str, tuple[float, float] | None]:
    """`loglog_fit` of each level's points (``level`` key), levels in order of first appearance."""
    levels = list(dict.fromkeys(p["level"] for p in points))
    return {lv: loglog_fit([p for p in points if p["level"] == lv]) for lv in levels}


def plot_levels(points: list[dict], path: Path, sweep: str, where: str) -> Path:
    """Paper Fig. 5: sharpness (x, log) against DER (y, log), markers coloured by EIR, one fitted line per level.

    The legend gives each level's β (`loglog_fit`); points without a positive sharpness and DER cannot sit on the
    logarithmic axes and are left out of the figure (they stay in results.json).
    """
    import matplotlib
    from matplotlib.lines import Line2D

    fits = level_fits(points)
    shown = [p for p in points if (p.get("sharpness") or 0) > 0 and p.get("der") is not None and p["der"] > 0]
    if len(shown) < len(points):
        logger.warning("Fig. 5: %d of %d points have no positive sharpness and DER; not drawn", len(points) - len(shown),
                       len(points))
    fig = _figure((6.0, 4.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="lightgray")
    eirs = [p["eir"] for p in shown if p.get("eir") is not None and math.isfinite(p["eir"])]
    vmin, vmax = (min(eirs), max(eirs)) if eirs else (0.0, 1.0)
    markers, handles, scatter = "osD^v<>ph*", [], None
    for j, (level, fit) in enumerate(fits.items()):
        group = [p for p in shown if p["level"] == level]
        marker, color = markers[j % len(markers)], f"C{j}"
        if group:
            colors = [p["eir"] if p.get("eir") is not None else float("nan") for p in group]
            scatter = ax.scatter([p["sharpness"] for p in group], [p["der"] for p in group], c=colors, cmap=cmap,
                                 vmin=vmin, vmax=vmax, marker=marker, s=50, edgecolors="black", zorder=3)
        if fit is not None and group:
            xs = np.geomspace(min(p["sharpness"] for p in group), max(p["sharpness"] for p in group), 50)
            ax.plot(xs, np.exp(fit[1]) * xs ** fit[0], color=color, linewidth=1.5)
        beta = "n/a" if fit is None else f"{fit[0]:.2f}"
        handles.append(Line2D([], [], color=color, marker=marker, markerfacecolor="lightgray",
                              markeredgecolor="black", label=f"{level} (β = {beta})"))
    if scatter is not None:
        fig.colorbar(scatter, ax=ax).set_label("Ensemble Improvement Rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Sharpness (adaptive worst-case, γ = 0.5; log scale)")
    ax.set_ylabel("Diversity (DER; log scale)")
    ax.set_title(f"Fig. 5{'a' if sweep == 'width' else 'b'}: varying {sweep} (diversity on {where})")
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _save(fig, path)


def report_levels(points: list[dict], sweep: str, output_dir: str, facts: dict[str, Any]) -> None:
    """results.json (points, ``slopes``: β per level, ``slope_axes``), ``tradeoff_<sweep>.md`` and the Fig. 5 panel."""
    out = Path(output_dir)
    slopes = {lv: (None if fit is None else fit[0]) for lv, fit in level_fits(points).items()}
    where = points[0]["measured_on"]
    write_results({"sweep": sweep, "points": points, "slopes": slopes, "slope_axes": SLOPE_AXES, **facts}, out,
                  name="results")
    rows = {f"{p['level']} ρ={p['rho']:g}": p for p in points}
    columns = [("sharpness", "sharpness", ".4f"), ("DER", "der", ".4f"), ("EIR", "eir", ".4f"),
               ("member acc", "member_accuracy", ".2%"), ("ensemble acc", "ensemble_accuracy", ".2%")]
    betas = "\n".join(f"- {lv}: β = {'n/a' if b is None else f'{b:.3f}'}" for lv, b in slopes.items())
    (out / f"tradeoff_{sweep}.md").write_text(
        f"# Sharpness-diversity trade-off by {sweep} (Fig. 5)\n\nSAM ensembles; diversity, EIR and accuracies on "
        f"`{where}`, sharpness on training batches.\n\n{markdown_comparison_table(rows, columns, 'ensemble')}\n"
        f"β ({SLOPE_AXES}):\n\n{betas}\n")
    plot_levels(points, out / f"tradeoff_{sweep}.png", sweep, where)


def plot_sizes(points: list[dict], path: Path, where: str) -> Path:
    """Paper Fig. 15: ensemble ECE (left) and NLL (right) against the number of members, one line per method."""
    fig = _figure((9.0, 3.8))
    panels = [("ece", "ECE (15 bins, fraction)", "Expected calibration error"),
              ("nll", "NLL (nats per sample)", "Negative log-likelihood")]
    for k, (key, ylabel, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, method in enumerate(dict.fromkeys(p["method"] for p in points)):
            group = sorted((p for p in points if p["method"] == method), key=lambda p: p["num_members"])
            ax.plot([p["num_members"] for p in group], [p[key] for p in group], marker="osD^v"[j % 5], label=method)
        ax.set_xticks(sorted({p["num_members"] for p in points}))
        ax.set_xlabel("Number of models in the ensemble")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} on {where}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def report_sizes(points: list[dict], output_dir: str, facts: dict[str, Any]) -> None:
    """results.json (the points), ``ensemble_size.md`` and ``ensemble_size.png`` (Fig. 15)."""
    out = Path(output_dir)
    where = points[0]["measured_on"]
    write_results({"sweep": "ensemble_size", "points": points, **facts}, out, name="results")
    rows = {f"{p['method']} m={p['num_members']}": p for p in points}
    columns = [("ECE", "ece", ".4f"), ("NLL", "nll", ".4f"), ("ensemble acc", "ensemble_accuracy", ".2%"),
               ("EIR", "eir", ".4f"), ("ID ECE", "id_ensemble_ece", ".4f"), ("ID NLL", "id_ensemble_nll", ".4f")]
    (out / "ensemble_size.md").write_text(f"# Calibration by ensemble size (Fig. 15)\n\nECE, NLL, accuracy and EIR on "
                                          f"`{where}`.\n\n{markdown_comparison_table(rows, columns, 'ensemble')}")
    plot_sizes(points, out / "ensemble_size.png", where)


# ----------------------------------------------------------------------------- sweeps


def level_sweep(args: TradeoffArgs, config: SharpBalanceConfig, data: dict, sets: list | None,
                curvature: dict[str, Any] | None) -> list[dict]:
    """Fig. 5: the SAM rho sweep of ``--rhos`` at every width (``--sweep width``) or sparsity (``--sweep sparsity``)."""
    values = args.widths if args.sweep == "width" else args.sparsities
    runs = [(v, rho) for v in values for rho in args.rhos]
    points = []
    for k, (value, rho) in enumerate(runs):
        tag = f"{args.sweep}{value:g}"
        logger.info("ensemble %d of %d: %s %g, sam, rho %g", k + 1, len(runs), args.sweep, value, rho)
        level = {"sweep": args.sweep, "level": f"{args.sweep}={value:g}", args.sweep: value}
        run_args = dataclasses.replace(args, model_width=int(value)) if args.sweep == "width" else args
        sparsity = float(value) if args.sweep == "sparsity" else 0.0
        name = f"{tag}_sam_rho{rho:g}"
        points.append(train_point(run_args, run_config(config, "sam", rho, label=name), data, sets, config.output_dir,
                                  name=name, level=level, sparsity=sparsity, curvature=curvature if k == 0 else None))
    return points


def size_sweep(args: TradeoffArgs, config: SharpBalanceConfig, data: dict, sets: list | None,
               curvature: dict[str, Any] | None) -> list[dict]:
    """Fig. 15: one ensemble per (m, method): seeds ``--seed_pool[:m]``, ``--rho``, ``--sam_fraction``; ECE and NLL."""
    runs = [(m, method) for m in args.ensemble_sizes for method in args.size_methods]
    points = []
    for k, (m, method) in enumerate(runs):
        name = f"m{m}_{method}"
        logger.info("ensemble %d of %d: %d members, %s", k + 1, len(runs), m, method)
        cfg = run_config(config, method, config.rho, label=name, num_members=m, member_seeds=list(args.seed_pool[:m]))
        trainer, results, where, score, _ = train_ensemble(args, cfg, data, sets)
        point = {"method": method, "num_members": m, "member_seeds": cfg.member_seeds, "rho": cfg.rho,
                 "measured_on": where, "ece": results[f"{where}_ensemble_ece"], "nll": results[f"{where}_ensemble_nll"],
                 "ensemble_accuracy": results[f"{where}_ensemble_accuracy"],
                 "member_accuracy": results[f"{where}_member_accuracy"], "eir": results[f"{where}_eir"],
                 **{f"id_{key}": results[f"eval_{key}"] for key in ("ensemble_accuracy", "ensemble_ece", "ensemble_nll")}}
        if trainer.is_world_process_zero():
            save_ensemble(trainer.ensemble, args, cfg, {k: point[k] for k in ("ece", "nll", "ensemble_accuracy")},
                          folder=os.path.join(config.output_dir, "ensemble", name))
            if curvature is not None and k == 0:
                curvature.update(curvature_ranking(args, cfg, trainer.ensemble, score, config.output_dir, name))
        trainer.accelerator.wait_for_everyone()
        points.append(point)
    return points


def main() -> list[dict]:
    args, config = parse_args(TradeoffArgs)
    config.remove_unused_columns = False  # the transforms read the raw image column
    setup_logging(config)
    check_args(args, config)
    facts = start_run(args, config)
    data = load_cifar(args, args.max_train_samples, args.max_eval_samples, seed=args.subset_seed)
    sets, corrupt_facts = corrupted_sets(args, data, args.subset_seed, progress=not config.disable_tqdm)
    if sets is not None:
        with phase("generating the corrupted sets (once, shared by every ensemble)"):
            sets = list(sets)
    facts = {"sweep": args.sweep, **facts, **data["subsets"], **corrupt_facts}
    curvature: dict[str, Any] | None = {} if args.curvature_samples else None
    if args.sweep == "ensemble_size":
        points = size_sweep(args, config, data, sets, curvature)
    elif args.sweep in ("width", "sparsity"):
        if args.sweep == "sparsity":
            facts["prune_epoch"] = args.prune_epoch
        points = level_sweep(args, config, data, sets, curvature)
    else:
        runs = ([("sam", r) for r in args.rhos] + [("sharpbalance", r) for r in args.sharpbalance_rhos]
                if args.sweep == "rho" else [(config.ensemble_method, config.rho)])
        points = []
        for k, (method, rho) in enumerate(runs):
            logger.info("ensemble %d of %d: %s, rho %g", k + 1, len(runs), method, rho)
            points.append(train_point(args, run_config(config, method, rho), data, sets, config.output_dir,
                                      curvature=curvature if k == 0 else None))
    if curvature:
        facts["curvature"] = curvature
    if points and PartialState().is_main_process:
        if args.sweep == "ensemble_size":
            report_sizes(points, config.output_dir, facts)
        elif args.sweep in ("width", "sparsity"):
            report_levels(points, args.sweep, config.output_dir, facts)
        else:
            report(points, config.output_dir, facts)
    return points


if __name__ == "__main__":
    run_script(main)
