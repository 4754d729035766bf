"""CIFAR-10 / CIFAR-100 with a CIFAR-stem ResNet18: deep ensemble, SAM ensemble or SharpBalance (paper Sec. 4.4).

    python recipes/cifar_resnet.py recipes/configs/cifar10_sharpbalance.yaml
    accelerate launch recipes/cifar_resnet.py recipes/configs/cifar100_sharpbalance.yaml --cifar_c_dir data/CIFAR-100-C
    python recipes/cifar_resnet.py recipes/configs/cifar10_sam.yaml --dataset_name ../shared/data/cifar10

Paper setup (App. D.3, Table 1): 3 members, 200 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay
5e-4 on every parameter, ×0.1 at epochs 100 and 150, crop 32 pad 4 + horizontal flip, no gradient
clipping; SAM/SharpBalance ρ = 0.2; SharpBalance k = 0.4 (CIFAR-10) / 0.5 (CIFAR-100), Td = 100.
Evaluation: the clean test set (``trainer.evaluate``); CIFAR-10-C / CIFAR-100-C from ``--cifar_c_dir``
(the published ``.npy`` folder) or, with ``--corrupt_offline``, a CIFAR-C-like set that `sbtrainer.data`
generates from ``--corrupt_samples`` test images drawn at random with ``--subset_seed``; the adaptive worst-case sharpness of every
member on the training set. Writes results.json/.md, summary.md and figures into ``output_dir`` and the
ensemble into ``output_dir/ensemble``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cifar_data import (
    CifarDataArgs,
    cifar_transforms,
    corrupted_sets,
    evaluate_corrupted,
    load_cifar,
    ood_prefix,
    views,
)
from recipe_utils import (
    CommonArgs,
    check_resume,
    headline,
    member_sharpness,
    paper_sgd,
    parse_args,
    phase,
    run_script,
    save_ensemble,
    scoring_summary,
    setup_logging,
    start_run,
    write_report,
)
from transformers import set_seed

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.models import cifar_resnet


@dataclass
class CifarArgs(CommonArgs, CifarDataArgs):
    arch: str = field(default="resnet18", metadata={"help": "timm ResNet architecture (the CIFAR stem is applied)."})
    model_width: int = field(default=64, metadata={"help": "Stage widths (w, 2w, 4w, 8w); 64 is ResNet18."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)."})
    lr_milestones: list[int] = field(default_factory=lambda: [100, 150], metadata={
        "help": "Epochs at which the learning rate is multiplied by lr_gamma (paper: 100 150)."})
    lr_gamma: float = field(default=0.1, metadata={"help": "Learning-rate decay factor (paper: 0.1)."})


def build_member(args: CifarArgs, num_classes: int):
    """A member factory ``seed -> CIFAR-stem ResNet`` (the seed is set by EnsembleModel.from_factory)."""
    return lambda _seed: cifar_resnet(args.arch, num_classes=num_classes, width=args.model_width)


def main() -> dict[str, Any]:
    args, config = parse_args(CifarArgs)
    config.remove_unused_columns = False  # the transforms read the raw image column
    setup_logging(config)
    facts = start_run(args, config)
    set_seed(config.seed)

    data = load_cifar(args, args.max_train_samples, args.max_eval_samples, seed=args.subset_seed)
    train_tf, eval_tf = cifar_transforms(data["num_classes"])
    train, score, test = views(data, train_tf, eval_tf)

    ensemble = EnsembleModel.from_factory(build_member(args, data["num_classes"]), config.num_members,
                                          config.member_seeds, reduction=config.ensemble_reduction)
    check_resume(ensemble, config)
    optimizers = paper_sgd(ensemble, config, len(train), args.momentum, args.lr_milestones, args.lr_gamma)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train, eval_dataset=test,
                                  score_dataset=score, optimizers=optimizers)
    results: dict[str, Any] = {"method": config.ensemble_method, "dataset": args.dataset_name,
                               "num_train_rows": len(train), "num_test_rows": len(test), **facts, **data["subsets"]}
    with phase(f"training {config.num_members} members ({config.ensemble_method})"):
        results.update(trainer.train(resume_from_checkpoint=config.resume_from_checkpoint).metrics)
    results.update(scoring_summary(trainer))

    with phase("evaluating on the test set"):
        results.update(trainer.evaluate())
    prefix = ood_prefix(data["num_classes"])
    sets, corrupt_facts = corrupted_sets(args, data, args.subset_seed, progress=not config.disable_tqdm)
    results.update(corrupt_facts)
    if sets is not None:
        results.update(evaluate_corrupted(trainer, eval_tf, data, sets, prefix))

    if trainer.is_world_process_zero():
        results.update(member_sharpness(trainer.ensemble, score, args, disable_tqdm=config.disable_tqdm))
        with phase(f"writing the report and the ensemble to {config.output_dir}"):
            write_report(results, config.output_dir, config.ensemble_method, ood_prefix=prefix)
            save_ensemble(trainer.ensemble, args, config, headline(results, ["eval", f"{prefix}_all"]))
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_script(main)
