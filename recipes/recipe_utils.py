"""Pieces every recipe shares: argument parsing (YAML or flags), the paper's SGD, sharpness, reports, saving.

Not a recipe itself. The recipes import it as ``recipe_utils`` (the ``recipes/`` folder is on
``sys.path`` when a recipe runs as ``python recipes/x.py`` or ``accelerate launch recipes/x.py``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
import yaml
from transformers import HfArgumentParser

from sbtrainer import EnsembleModel, SharpBalanceConfig
from sbtrainer.report import (
    markdown_member_vs_ensemble,
    markdown_severity_table,
    plot_member_vs_ensemble,
    plot_sharpness_diversity,
    write_results,
)
from sbtrainer.sharpness import ensemble_sharpness

logger = logging.getLogger("sbtrainer.recipes")


@dataclass
class CommonArgs:
    """Arguments every recipe takes (beside `SharpBalanceConfig`)."""

    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows (tiny runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    sharpness_batches: int = field(
        default=100, metadata={"help": "Adaptive worst-case sharpness: batches of 5 training rows (paper Sec. 4.1: 100)."})
    sharpness_steps: int = field(default=20, metadata={"help": "Ascent steps per sharpness batch (>= 1)."})
    sharpness_rho0: float = field(default=0.5, metadata={"help": "Sharpness neighbourhood gamma (paper App. D.2: 0.5)."})
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "Push the saved ensemble to this Hub repo at the end (needs a write token)."})


# ----------------------------------------------------------------------------- entry point


def run_script(main: Any) -> None:
    """Run a recipe's ``main()`` as a script, then shut the process group down.

    Under ``torchrun``/``accelerate launch`` with several processes, exiting with the process group
    alive lets Gloo's worker threads be torn down with the interpreter: the process dies with
    SIGABRT ("terminate called without an active exception") after a successful run. The group is
    destroyed only after ``main()`` returned on this process; after an exception it is left alone
    (destroying it while other processes are still inside a collective would hang them).
    """
    main()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- arguments


def _yaml_argv(path: str) -> list[str]:
    """A YAML mapping as command-line tokens (lists expand, booleans as true/false, nulls skipped)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the YAML config must be a mapping of argument names to values")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        values = value if isinstance(value, list) else [value]
        argv += [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return argv


def parse_args(recipe_cls: type, argv: Sequence[str] | None = None) -> tuple[Any, SharpBalanceConfig]:
    """``(recipe_args, config)`` from ``argv`` (default ``sys.argv[1:]``).

    ``recipe.py config.yaml`` reads the YAML with ``HfArgumentParser.parse_yaml_file``;
    ``recipe.py config.yaml --flag value ...`` reads the YAML and lets the flags override it;
    ``recipe.py --flag value ...`` reads flags only.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((recipe_cls, SharpBalanceConfig))
    if argv and argv[0].endswith((".yaml", ".yml")):
        if len(argv) == 1:
            return tuple(parser.parse_yaml_file(os.path.abspath(argv[0])))
        argv = _yaml_argv(argv[0]) + argv[1:]
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def setup_logging(config: SharpBalanceConfig) -> None:
    """INFO logs on the main process, warnings elsewhere; transformers and datasets follow."""
    level = config.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    try:
        import datasets

        datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    except ImportError:
        pass


# ----------------------------------------------------------------------------- optimisation


def steps_per_epoch(num_rows: int, config: SharpBalanceConfig) -> int:
    """Optimizer steps per epoch: per-member batches over ``num_rows``, split over processes and accumulation."""
    batches = num_rows // config.per_device_train_batch_size if config.dataloader_drop_last else \
        math.ceil(num_rows / config.per_device_train_batch_size)
    per_process = math.ceil(batches / max(config.world_size, 1))
    return max(math.ceil(per_process / config.gradient_accumulation_steps), 1)


def paper_sgd(
    ensemble: EnsembleModel, config: SharpBalanceConfig, num_rows: int, momentum: float = 0.9,
    milestones: Iterable[int] = (100, 150), gamma: float = 0.1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The paper's optimiser: SGD(lr, momentum, weight decay on EVERY parameter) and ×gamma at epoch milestones.

    The Trainer's own ``optim="sgd"`` exempts biases and norm weights from weight decay; the authors'
    release (plain ``torch.optim.SGD``) does not, so the CIFAR recipes build it here. The scheduler is
    stepped once per optimizer step, so epoch milestones become step milestones.
    """
    opt = torch.optim.SGD(ensemble.parameters(), lr=config.learning_rate, momentum=momentum,
                          weight_decay=config.weight_decay)
    spe = steps_per_epoch(num_rows, config)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(e) * spe for e in milestones], gamma=gamma)
    return opt, sched


# ----------------------------------------------------------------------------- measurements


def member_sharpness(ensemble: EnsembleModel, data: Any, args: CommonArgs, seed: int = 0) -> dict[str, float]:
    """Adaptive worst-case (ℓ2) sharpness of every member on ``data`` (eval view of the training set).

    Returns ``{"sharpness": mean, "sharpness_member_<i>": value}`` (paper eq. 3, batches of 5, ρ0 = 0.5).
    """
    return ensemble_sharpness(
        ensemble.members, data, kind="worst_case", rho0=args.sharpness_rho0, norm="l2", steps=args.sharpness_steps,
        adaptive=True, input_name=ensemble.input_name, batch_size=5, num_batches=args.sharpness_batches, seed=seed,
        disable_tqdm=not sys.stderr.isatty(),
    )


def scoring_summary(trainer: Any) -> dict[str, Any]:
    """SharpBalance bookkeeping for the results: the epochs it scored at and each member's SAM-set fraction."""
    if not trainer.scoring_history:
        return {}
    out: dict[str, Any] = {"scoring_epochs": [h["epoch"] for h in trainer.scoring_history]}
    out.update({f"member_{i}_sam_set_fraction": float(m.float().mean()) for i, m in enumerate(trainer.sam_masks)})
    return out


HEADLINE = ("ensemble_accuracy", "member_accuracy", "eir", "der", "variance", "kl", "ensemble_nll", "ensemble_ece")


def headline(results: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """The results worth a model card: the headline metrics under each prefix, and the sharpness."""
    out = {f"{p}_{k}": results[f"{p}_{k}"] for p in prefixes for k in HEADLINE if f"{p}_{k}" in results}
    if "sharpness" in results:
        out["sharpness"] = results["sharpness"]
    return out


# ----------------------------------------------------------------------------- report and save


def write_report(results: Mapping[str, Any], output_dir: str, method: str, ood_prefix: str | None = None) -> list[Path]:
    """``results.json``/``results.md``, ``summary.md`` and the figures; returns the files written.

    Figures: ``member_vs_ensemble.png`` (ID; paper Fig. 7 second row), ``member_vs_ensemble_ood.png``
    (pooled OOD; Fig. 7 first row) and ``sharpness_diversity.png`` (Fig. 3) when the inputs exist.
    """
    out = Path(output_dir)
    files = list(write_results(results, out, name="results"))
    by_method = {method: results}
    summary = ["# Summary", "", "## In distribution", "", markdown_member_vs_ensemble(by_method, prefix="eval")]
    files.append(plot_member_vs_ensemble(by_method, out / "member_vs_ensemble.png", prefix="eval", title="test set"))
    if ood_prefix is not None and f"{ood_prefix}_all_ensemble_accuracy" in results:
        summary += ["## Corrupted inputs (pooled)", "", markdown_member_vs_ensemble(by_method, prefix=f"{ood_prefix}_all"),
                    "## Per severity (ensemble accuracy)", "", markdown_severity_table(by_method, ood_prefix)]
        files.append(plot_member_vs_ensemble(by_method, out / "member_vs_ensemble_ood.png", prefix=f"{ood_prefix}_all",
                                             title=f"{ood_prefix} (all corruptions and severities)"))
    div = f"{ood_prefix}_all" if ood_prefix is not None and f"{ood_prefix}_all_der" in results else "eval"
    if "sharpness" in results and results.get(f"{div}_der") is not None and results.get(f"{div}_eir") is not None:
        point = {"sharpness": results["sharpness"], "der": results[f"{div}_der"], "eir": results[f"{div}_eir"],
                 "label": method}
        files.append(plot_sharpness_diversity([point], out / "sharpness_diversity.png", title=f"diversity on {div}"))
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    files.append(out / "summary.md")
    return files


def save_ensemble(ensemble: EnsembleModel, args: CommonArgs, config: SharpBalanceConfig, metrics: Mapping[str, Any],
                  base_model: str | None = None, folder: str | None = None, processor: Any = None) -> str:
    """``ensemble.save_pretrained(output_dir/ensemble)`` and, with ``--hub_repo_id``, ``push_to_hub``."""
    kw = {"config": config, "metrics": metrics, "base_model": base_model, "processor": processor}
    path = ensemble.save_pretrained(folder or os.path.join(config.output_dir, "ensemble"), **kw)
    if args.hub_repo_id:
        url = ensemble.push_to_hub(args.hub_repo_id, **kw)
        logger.info("pushed to %s", url)
    return path


def prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{f"{prefix}_{k}": v}`` for every item of ``metrics``."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
