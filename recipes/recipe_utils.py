"""Pieces every recipe shares: argument parsing (YAML or flags), the paper's SGD, sharpness, reports, saving.

Not a recipe itself. The recipes import it as ``recipe_utils`` (the ``recipes/`` folder is on
``sys.path`` when a recipe runs as ``python recipes/x.py`` or ``accelerate launch recipes/x.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME")
"""Environment variables that set or shape the CPU thread pools (``accelerate launch`` sets some of them)."""


class RecipeError(ValueError):
    """A recipe option (or the data it names) that cannot work; the message names the option and what to do.

    ``run_script`` prints it as one line, ``<script>: error: <message>``, and exits with status 2 (as
    argparse does for a bad flag) instead of a traceback from deep inside a dependency.
    """


@dataclass
class CommonArgs:
    """Arguments every recipe takes (beside `SharpBalanceConfig`)."""

    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on N training rows drawn at random with --subset_seed (tiny runs); default: all rows."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on N evaluation rows drawn at random with --subset_seed; default: all rows."})
    subset_seed: int = field(default=0, metadata={"help": (
        "Seed of the recipe's data choices: the rows kept by --max_train_samples, --max_eval_samples and "
        "--corrupt_samples, the noise of --corrupt_offline and the sharpness batches. Separate from --seed "
        "and --member_seeds, so every method and every member seed sees the same rows.")})
    num_threads: int | None = field(default=None, metadata={"help": (
        "torch CPU threads per process (torch.set_num_threads). Default: as launched; accelerate launch sets "
        "OMP_NUM_THREADS (1 with 0 processes), python does not (torch then uses every core). Results are "
        "reproducible for a given process count and thread count, not across thread counts.")})
    sharpness_batches: int = field(
        default=100, metadata={"help": ("Adaptive worst-case sharpness: batches of 5 training rows (paper Sec. 4.1: "
                                        "100); 0 skips the measurement.")})
    sharpness_steps: int = field(default=20, metadata={"help": "Ascent steps per sharpness batch (>= 1)."})
    sharpness_rho0: float = field(default=0.5, metadata={"help": "Sharpness neighbourhood gamma (paper App. D.2: 0.5)."})
    sharpness_plain_rho: float | None = field(default=None, metadata={"help": (
        "Also measure the NON-adaptive worst-case sharpness at this l2 radius ('plain_sharpness', same batches): what "
        "plain SAM minimises at its rho (README, 'Is the sharpness measured right?'). Default: not measured.")})
    sharpness_average_rho0: float | None = field(default=None, metadata={"help": (
        "Also measure the adaptive average-case sharpness (paper App. E eq. 10: E over eps ~ N(0, rho0^2 diag(T^2)) of "
        "the loss increase; 'average_sharpness', same batches) at this rho0. Default: not measured.")})
    sharpness_average_samples: int = field(default=20, metadata={
        "help": "Noise draws per batch for --sharpness_average_rho0 (>= 1)."})
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
    try:
        main()
    except RecipeError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- arguments


def _yaml_token(value: Any) -> str:
    """One YAML value as the command-line text its field parses: booleans true/false, mappings as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return json.dumps(value)
    return str(value)


def _yaml_argv(path: str) -> list[str]:
    """A YAML mapping as command-line tokens (lists expand, booleans as true/false, mappings as JSON, nulls skipped).

    A nested mapping (e.g. ``model_kwargs: {depth: 1}``) becomes its JSON text, which is what the JSON
    options (``--model_kwargs``) read; ``str()`` would give Python's repr, which JSON cannot parse.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the YAML config must be a mapping of argument names to values")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        values = value if isinstance(value, list) else [value]
        argv += [_yaml_token(v) for v in values]
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
    """sbtrainer's INFO logs (the phases of the run) on the main process, warnings elsewhere.

    ``--log_level`` / ``--log_level_replica`` set the level; with the default ``passive`` the main
    process still logs sbtrainer's INFO lines (one per phase of the run), while transformers and
    datasets keep their own verbosity (warnings). With ``disable_tqdm`` the progress bars of
    ``datasets`` (loading, ``map``) and ``transformers`` are turned off too, so that the recipe writes
    no bar at all.
    """
    level = config.get_process_log_level()
    ours = logging.INFO if config.log_level == "passive" and config.should_log else level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    logging.getLogger("sbtrainer").setLevel(ours)
    logger.setLevel(ours)
    transformers.utils.logging.set_verbosity(level)
    if config.disable_tqdm:
        transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
        if config.disable_tqdm:
            datasets.disable_progress_bars()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- checks and run facts


def check_output_dir(config: SharpBalanceConfig) -> None:
    """Refuse an ``output_dir`` that exists and is not a folder (a file), before any work is done.

    Raises:
        RecipeError: naming ``--output_dir``, the path, and what to do.
    """
    path = Path(config.output_dir)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"--output_dir {config.output_dir} is a file, not a folder: pass a folder path "
                          f"(it is created if missing) or move the file away")


def thread_info() -> dict[str, Any]:
    """The CPU thread settings a run's floating-point results depend on, for the log and ``results.json``.

    ``torch_num_threads`` is the intra-op pool size (``torch.get_num_threads``); ``env_<NAME>`` is each
    variable of `THREAD_ENV_VARS` as set in the environment (``None`` when unset). ``accelerate launch``
    exports ``OMP_NUM_THREADS`` (1 when it runs 0 processes, the physical cores per process otherwise);
    plain ``python`` leaves it unset and torch uses one thread per core. Summation order, hence the last
    bits of every result, depends on the thread count: the same process count and thread count give the
    same numbers however the recipe is launched.
    """
    info: dict[str, Any] = {"torch_num_threads": torch.get_num_threads(),
                            "torch_num_interop_threads": torch.get_num_interop_threads()}
    info.update({f"env_{name}": os.environ.get(name) for name in THREAD_ENV_VARS})
    return info


def start_run(args: CommonArgs, config: SharpBalanceConfig) -> dict[str, Any]:
    """Checks and settings every recipe makes before loading data; returns the facts for ``results.json``.

    Refuses a file as ``--output_dir``, a ``--num_threads`` < 1 and sharpness settings that cannot work
    (``--sharpness_batches`` < 0, ``--sharpness_steps`` < 1, ``--sharpness_rho0`` <= 0) with a
    `RecipeError` before any data is read or any step is taken, applies ``--num_threads``, and logs the
    process count and the thread settings (`thread_info`).
    """
    check_output_dir(config)
    for option, value, rule, ok in (
            ("--sharpness_batches", args.sharpness_batches, ">= 0 (0 skips the measurement)", args.sharpness_batches >= 0),
            ("--sharpness_steps", args.sharpness_steps, ">= 1", args.sharpness_steps >= 1),
            ("--sharpness_rho0", args.sharpness_rho0, "> 0", args.sharpness_rho0 > 0),
            ("--sharpness_plain_rho", args.sharpness_plain_rho, "> 0 (or unset)",
             args.sharpness_plain_rho is None or args.sharpness_plain_rho > 0),
            ("--sharpness_average_rho0", args.sharpness_average_rho0, "> 0 (or unset)",
             args.sharpness_average_rho0 is None or args.sharpness_average_rho0 > 0),
            ("--sharpness_average_samples", args.sharpness_average_samples, ">= 1", args.sharpness_average_samples >= 1)):
        if not ok:
            raise RecipeError(f"{option} must be {rule}; got {value}")
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise RecipeError(f"--num_threads must be >= 1 (or left unset to keep the launcher's); got {args.num_threads}")
        torch.set_num_threads(args.num_threads)
    facts = {"num_processes": config.world_size, **thread_info(), "subset_seed": args.subset_seed,
             "rows_per_member_per_step": rows_per_member_per_step(config)}
    logger.info("processes: %d, torch threads: %d (interop %d), %s", config.world_size, facts["torch_num_threads"],
                facts["torch_num_interop_threads"],
                ", ".join(f"{n}={os.environ.get(n, 'unset')}" for n in THREAD_ENV_VARS))
    logger.info("ensemble_parallelism=%r: each optimizer step uses %d rows per member (per_device_train_batch_size "
                "%d x gradient_accumulation_steps %d%s)", config.ensemble_parallelism, facts["rows_per_member_per_step"],
                config.per_device_train_batch_size, config.gradient_accumulation_steps,
                f" x {config.world_size} processes" if config.ensemble_parallelism == "data" and config.world_size > 1
                else "")
    return facts


def rows_per_member_per_step(config: SharpBalanceConfig) -> int:
    """The effective per-member batch: W * B * accumulation in data mode, B * accumulation in members mode."""
    world = config.world_size if config.ensemble_parallelism == "data" else 1
    return world * config.per_device_train_batch_size * config.gradient_accumulation_steps


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Log ``<name>...`` when a phase of the run starts and ``<name>: done in <s> s`` when it ends."""
    logger.info("%s...", name)
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", name, time.perf_counter() - start)


def random_subset(data: Any, n: int | None, seed: int, option: str) -> Any:
    """``n`` rows of ``data`` drawn uniformly without replacement with ``seed``, kept in the dataset's order.

    Not the first ``n`` rows: a copy stored in class order would then give one class. The draw depends
    only on ``(len(data), n, seed)``, so every method and every member seed gets the same rows.

    Args:
        data: a ``datasets.Dataset`` (anything with ``__len__`` and ``select``).
        n: rows to keep; ``None`` or ``n >= len(data)`` keeps every row.
        seed: the ``--subset_seed``.
        option: the flag that asked for the subset, named in the error.

    Raises:
        RecipeError: ``n < 1``.
    """
    if n is None:
        return data
    if n < 1:
        raise RecipeError(f"{option} must be >= 1 (or left unset for every row); got {n}")
    if n >= len(data):
        return data
    rows = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return data.select(rows.tolist())


def class_counts(data: Any, label_col: str) -> dict[str, int]:
    """``{label: rows}`` of ``data``'s label column, labels in increasing order (string keys, for JSON)."""
    labels, counts = np.unique(np.asarray(data[label_col]), return_counts=True)
    return {str(int(lab)): int(c) for lab, c in zip(labels, counts)}


def log_subset(name: str, data: Any, label_col: str, total: int) -> dict[str, Any]:
    """Log and return ``{f"{name}_rows": n, f"{name}_class_counts": {...}}`` of a (sub)set of ``total`` rows."""
    counts = class_counts(data, label_col)
    logger.info("%s: %d of %d rows, class counts %s", name, len(data), total, counts)
    return {f"{name}_rows": len(data), f"{name}_class_counts": counts}


def check_resume(ensemble: EnsembleModel, config: SharpBalanceConfig) -> None:
    """Refuse a ``--resume_from_checkpoint`` that does not exist or holds a different model, in one line.

    The Trainer would fail later with a ``size mismatch`` message of hundreds of lines. Compares the
    shape of every tensor in the checkpoint's ``model.safetensors`` (or ``pytorch_model.bin``) with the
    ensemble built from the current options; a missing or extra name counts as a mismatch.

    Raises:
        RecipeError: naming ``--resume_from_checkpoint``, the first differing tensor and what to do.
    """
    ckpt = config.resume_from_checkpoint
    if ckpt is None or ckpt is False or str(ckpt).lower() == "false":
        return
    if isinstance(ckpt, bool) or str(ckpt).lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        ckpt = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if ckpt is None:
            raise RecipeError(f"--resume_from_checkpoint true: no checkpoint-<step> folder in --output_dir "
                              f"{config.output_dir}; pass the checkpoint folder itself or drop the option")
    if not os.path.isdir(ckpt):
        raise RecipeError(f"--resume_from_checkpoint {ckpt} is not a folder: pass a checkpoint-<step> folder "
                          f"written by an earlier run (or drop the option to start anew)")
    shapes = _checkpoint_shapes(ckpt)
    if shapes is None:
        return  # no single-file weights (sharded or another format): leave the check to the Trainer
    own = {k: tuple(v.shape) for k, v in ensemble.state_dict().items()}
    differ = [k for k in own if k in shapes and shapes[k] != own[k]]
    missing, extra = [k for k in own if k not in shapes], [k for k in shapes if k not in own]
    if differ or missing or extra:
        if differ:
            k = differ[0]
            first = f"{k} is {list(shapes[k])} there and {list(own[k])} here"
        else:
            k = (missing or extra)[0]
            first = f"{k} is {'missing there' if missing else 'not in this model'}"
        raise RecipeError(
            f"--resume_from_checkpoint {ckpt} holds a different model ({len(differ)} shapes differ, {len(missing)} "
            f"tensors missing, {len(extra)} extra; {first}): pass the model options of the run that wrote it "
            f"(e.g. --model_width, --arch, --num_members) or start a new run without --resume_from_checkpoint")


def _checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of a checkpoint's single-file weights, read without loading them; None if absent."""
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors import safe_open

        with safe_open(st, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pt):
        return {k: tuple(v.shape) for k, v in torch.load(pt, map_location="meta", weights_only=True).items()}
    return None


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


def member_sharpness(ensemble: EnsembleModel, data: Any, args: CommonArgs, disable_tqdm: bool = False,
                     collate_fn: Any = None) -> dict[str, float]:
    """Adaptive worst-case (ℓ2) sharpness of every member on ``data`` (eval view of the training set).

    The batches are drawn with ``--subset_seed`` (the same batches for every method and member seed) and
    batched by ``collate_fn`` (default ``transformers.default_data_collator``; e.g. the trainer's
    ``DataCollatorWithPadding`` for unpadded token ids);
    a progress bar per member unless ``disable_tqdm`` (pass the config's).
    Returns ``{"sharpness": mean, "sharpness_member_<i>": value}`` (paper eq. 3, batches of 5, ρ0 = 0.5);
    with ``--sharpness_plain_rho`` also ``plain_sharpness[_member_<i>]`` (non-adaptive worst case, same
    ascent steps), with ``--sharpness_average_rho0`` also ``average_sharpness[_member_<i>[_stderr]]``
    (adaptive average case, eq. 10); all on the same batches. ``{}`` with ``--sharpness_batches 0``.
    """
    if args.sharpness_batches == 0:
        logger.info("--sharpness_batches 0: the members' sharpness is not measured")
        return {}
    common = {"input_name": ensemble.input_name, "batch_size": 5, "num_batches": args.sharpness_batches,
              "seed": args.subset_seed, "collate_fn": collate_fn, "disable_tqdm": disable_tqdm}
    with phase(f"measuring the sharpness of {ensemble.num_members} members ({args.sharpness_batches} batches of 5, "
               f"{args.sharpness_steps} ascent steps)"):
        out = ensemble_sharpness(ensemble.members, data, kind="worst_case", rho0=args.sharpness_rho0, norm="l2",
                                 steps=args.sharpness_steps, adaptive=True, **common)
        if args.sharpness_plain_rho is not None:
            plain = ensemble_sharpness(ensemble.members, data, kind="worst_case", rho0=args.sharpness_plain_rho,
                                       norm="l2", steps=args.sharpness_steps, adaptive=False, **common)
            out.update({f"plain_{key}": value for key, value in plain.items()})
        if args.sharpness_average_rho0 is not None:
            average = ensemble_sharpness(ensemble.members, data, kind="average_case", rho0=args.sharpness_average_rho0,
                                         num_samples=args.sharpness_average_samples, adaptive=True, **common)
            out.update({f"average_{key}": value for key, value in average.items()})
    return out


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
