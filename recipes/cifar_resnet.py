"""CIFAR-10 / CIFAR-100 / TinyImageNet with a CIFAR-stem ResNet18 or a WideResNet: deep ensemble, SAM ensemble or
SharpBalance (paper Sec. 4.4, App. F.2).

    python recipes/cifar_resnet.py recipes/configs/cifar10_sharpbalance.yaml
    accelerate launch recipes/cifar_resnet.py recipes/configs/cifar100_sharpbalance.yaml --cifar_c_dir data/CIFAR-100-C
    python recipes/cifar_resnet.py recipes/configs/cifar10_sam.yaml --dataset_name ../shared/data/cifar10
    python recipes/cifar_resnet.py recipes/configs/wrn40_2_cifar100_sharpbalance.yaml          # WRN-40-2, Fig. 13
    python recipes/cifar_resnet.py recipes/configs/tinyimagenet_sharpbalance.yaml --tinyimagenet_c_dir data/Tiny-ImageNet-C

Architecture (``--arch``): a timm ResNet with the CIFAR stem (``resnet18``, widths ``--model_width``), or
``wrn-D-K``, the CIFAR WideResNet of depth D and widen factor K (`sbtrainer.models.cifar_wide_resnet`;
``wrn-40-2``: 2,243,546 parameters with 10 classes, the paper's Fig. 13). TinyImageNet (64x64, 200
classes, ``zh-plus/tiny-imagenet`` with splits ``train``/``valid``, or a local folder): the same ResNet18
with the CIFAR stem (as the authors' release), crop 64 pad 4 + flip (App. D.3), the release's TinyImageNet
mean/std; OOD on Tiny-ImageNet-C from ``--tinyimagenet_c_dir`` (metric prefix ``tinyimagenetc``).

Paper setup (App. D.3, Table 1): 3 members, 200 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay
5e-4 on every parameter, ×0.1 at epochs 100 and 150, crop 32 pad 4 + horizontal flip, no gradient
clipping; SAM/SharpBalance ρ = 0.2; SharpBalance k = 0.4 (CIFAR-10) / 0.5 (CIFAR-100) / 0.3 (TinyImageNet,
crop 64 pad 4), Td = 100. WRN-40-2 (App. F.2): the same setup; its ρ and k are not reported (the YAMLs say ours).
Evaluation: the clean test set (``trainer.evaluate``); CIFAR-10-C / CIFAR-100-C from ``--cifar_c_dir``
(the published ``.npy`` folder) or, with ``--corrupt_offline``, a CIFAR-C-like set that `sbtrainer.data`
generates from ``--corrupt_samples`` test images drawn at random with ``--subset_seed``; the adaptive worst-case sharpness of every
member on the training set. Writes results.json/.md, summary.md and figures into ``output_dir`` and the
ensemble into ``output_dir/ensemble``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
    RecipeError,
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
from sbtrainer.models import cifar_resnet, cifar_wide_resnet

WRN_ARCH = re.compile(r"wrn-(\d+)-(\d+)")
"""``--arch wrn-D-K``: a CIFAR WideResNet of depth D (6n + 4) and widen factor K."""


@dataclass
class CifarArgs(CommonArgs, CifarDataArgs):
    arch: str = field(default="resnet18", metadata={"help": (
        "timm ResNet architecture (the CIFAR stem is applied), or wrn-D-K for a CIFAR WideResNet of depth D and "
        "widen factor K (wrn-40-2: the paper's Fig. 13).")})
    model_width: int = field(default=64, metadata={"help": "ResNet stage widths (w, 2w, 4w, 8w); 64 is ResNet18. "
                                                           "Not used by wrn-D-K (its width is K)."})
    wrn_dropout: float = field(default=0.0, metadata={
        "help": "wrn-D-K only: dropout between the two convolutions of each block (0: none, the authors' release)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Side of the model's input; images of another size are resized. Default: the dataset's own (32, 64)."})
    crop_padding: int | None = field(default=None, metadata={
        "help": "Random-crop padding in pixels (default image_size // 8: 4 at 32 px; paper: 4 for CIFAR and TinyImageNet)."})
    device_augment: str = field(default="auto", metadata={"help": (
        "auto | on | off. on: the training images are decoded once into a uint8 tensor on the training device and "
        "cropped + flipped there in batch (sbtrainer.data.DeviceImagePipeline; each row's draws from its (member "
        "seed, epoch, row) seed, so resume and m-vs-1 equality stay exact); off: the CPU transform per row. "
        "auto: on when a GPU is used and no resize is needed.")})
    mixed_precision: str = field(default="auto", metadata={"help": (
        "auto | bf16 | no. auto: bf16 autocast and channels_last members on a GPU that supports bf16 (what GPU users "
        "expect for CNNs), fp32 otherwise; --bf16/--fp16 given explicitly win.")})
    channels_last: str = field(default="auto", metadata={"help": (
        "auto | on | off. Members (and the device pipeline's batches) in channels_last memory format. auto: on "
        "with bf16 on a GPU; on a CPU it is opt-in (measured here: a width-8 ResNet18 training step, batch 128, one "
        "core: 0.39 s NCHW, 0.29 s channels_last).")})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)."})
    lr_milestones: list[int] = field(default_factory=lambda: [100, 150], metadata={
        "help": "Epochs at which the learning rate is multiplied by lr_gamma (paper: 100 150)."})
    lr_gamma: float = field(default=0.1, metadata={"help": "Learning-rate decay factor (paper: 0.1)."})


def build_member(args: CifarArgs, num_classes: int) -> Callable[[int], Any]:
    """A member factory ``seed -> module`` (the seed is set by EnsembleModel.from_factory).

    ``--arch wrn-D-K``: `cifar_wide_resnet` (depth D, widen factor K, ``--wrn_dropout``); else a CIFAR-stem
    timm ResNet `cifar_resnet` of ``--model_width``.

    Raises:
        RecipeError: a WideResNet with a ``--model_width`` other than 64, or a depth / widen factor / dropout
            that `cifar_wide_resnet` refuses (its message).
    """
    match = WRN_ARCH.fullmatch(args.arch)
    if match is None:
        return lambda _seed: cifar_resnet(args.arch, num_classes=num_classes, width=args.model_width)
    if args.model_width != 64:
        raise RecipeError(f"--model_width {args.model_width} sets ResNet widths; --arch {args.arch} is a WideResNet "
                          f"whose width is its widen factor (wrn-D-K): leave --model_width unset")
    depth, widen = int(match.group(1)), int(match.group(2))
    try:
        cifar_wide_resnet(depth, widen, num_classes, args.wrn_dropout)  # checked once here, built per member below
    except ValueError as err:
        raise RecipeError(f"--arch {args.arch} / --wrn_dropout {args.wrn_dropout}: {err}") from err
    return lambda _seed: cifar_wide_resnet(depth, widen, num_classes, args.wrn_dropout)


def transforms_for(args: CifarArgs, data: dict[str, Any]) -> tuple[Callable, Callable, int]:
    """(train, eval) transforms and the input side: ``--image_size`` (default: the dataset's), ``--crop_padding``.

    Images are resized only when their ``(H, W)`` differs from ``(image_size, image_size)``; the mean/std
    are those of `cifar_data.CIFAR_STATS` for the number of classes (CIFAR-10, CIFAR-100, TinyImageNet).

    Raises:
        RecipeError: ``--image_size`` below 8, or ``--crop_padding`` below 0.
    """
    height, width = data["image_shape"]
    size = args.image_size if args.image_size is not None else max(height, width)
    if size < 8:
        raise RecipeError(f"--image_size must be >= 8; got {size}")
    if args.crop_padding is not None and args.crop_padding < 0:
        raise RecipeError(f"--crop_padding must be >= 0; got {args.crop_padding}")
    train_tf, eval_tf = cifar_transforms(data["num_classes"], size, padding=args.crop_padding,
                                         resize=(height, width) != (size, size))
    return train_tf, eval_tf, size


def gpu_defaults(args: CifarArgs, config: Any, resize: bool) -> dict[str, Any]:
    """Apply ``--mixed_precision`` and decide ``--device_augment``; returns the facts to report.

    Raises:
        RecipeError: an unknown value, or ``--device_augment on`` where the images need a resize.
    """
    import torch

    for name, value in (("device_augment", args.device_augment), ("mixed_precision", args.mixed_precision),
                        ("channels_last", args.channels_last)):
        allowed = ("auto", "bf16", "no") if name == "mixed_precision" else ("auto", "on", "off")
        if value not in allowed:
            raise RecipeError(f"--{name} must be one of {allowed}; got {value!r}")
    gpu = config.device.type == "cuda"
    if args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and gpu and torch.cuda.is_bf16_supported()
                                          and not config.fp16):
        config.bf16 = True
    if args.device_augment == "on" and resize:
        raise RecipeError("--device_augment on crops the stored images at their own size; --image_size asks for a "
                          "resize: drop --image_size or use --device_augment off")
    device_augment = args.device_augment == "on" or (args.device_augment == "auto" and gpu and not resize)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and bool(config.bf16) and gpu)
    if channels_last and not gpu and not WRN_ARCH.fullmatch(args.arch) and args.model_width < 8:
        # measured with torch 2.14.1 on CPU: the backward of a channels_last ResNet of width 2 or 4 at batch > 1
        # crashes the process (segmentation fault); width >= 8 runs (batches 1 to 64 tried)
        raise RecipeError(f"--channels_last on with --model_width {args.model_width} on a CPU: a channels_last "
                          "conv backward at fewer than 8 channels crashes torch's CPU kernels here; use "
                          "--channels_last off or --model_width >= 8")
    return {"device_augment": device_augment, "bf16": bool(config.bf16), "channels_last": channels_last}


def device_views(data: dict[str, Any], config: Any, padding: int, channels_last: bool) -> tuple[Any, Any]:
    """(train, score) index datasets and the `DeviceImagePipeline` that serves them from ``config.device``."""
    from cifar_data import CIFAR_STATS

    from sbtrainer.data import DeviceImagePipeline

    mean, std = CIFAR_STATS.get(data["num_classes"], CIFAR_STATS[10])
    with phase(f"decoding {len(data['train'])} training images onto {config.device}"):
        pipe = DeviceImagePipeline.from_dataset(data["train"], data["image_col"], mean=mean, std=std, padding=padding,
                                                channels_last=channels_last, device=config.device)
    rows = pipe.index_dataset(data["train"][data["label_col"]])
    return rows, pipe


def main() -> dict[str, Any]:
    args, config = parse_args(CifarArgs)
    config.remove_unused_columns = False  # the transforms read the raw image column
    setup_logging(config)
    facts = start_run(args, config)
    set_seed(config.seed)

    data = load_cifar(args, args.max_train_samples, args.max_eval_samples, seed=args.subset_seed)
    train_tf, eval_tf, image_size = transforms_for(args, data)
    train, score, test = views(data, train_tf, eval_tf)
    height, width = data["image_shape"]
    gpu_facts = gpu_defaults(args, config, resize=(height, width) != (image_size, image_size))
    train_rows, score_rows, pipe = train, score, None
    if gpu_facts["device_augment"]:
        padding = args.crop_padding if args.crop_padding is not None else image_size // 8
        train_rows, pipe = device_views(data, config, padding, gpu_facts["channels_last"])
        score_rows = train_rows  # the pipeline's clean view (no crop, no flip) for per-sample scoring
    # the corrupted sets before training: a missing published folder fails now, not after training
    prefix = ood_prefix(data["num_classes"])
    sets, corrupt_facts = corrupted_sets(args, data, args.subset_seed, progress=not config.disable_tqdm)

    ensemble = EnsembleModel.from_factory(build_member(args, data["num_classes"]), config.num_members,
                                          config.member_seeds, reduction=config.ensemble_reduction)
    check_resume(ensemble, config)
    optimizers = paper_sgd(ensemble, config, len(train), args.momentum, args.lr_milestones, args.lr_gamma)
    if gpu_facts["channels_last"]:
        import torch

        ensemble.to(memory_format=torch.channels_last)
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train_rows, eval_dataset=test,
                                  score_dataset=score_rows, optimizers=optimizers, device_transform=pipe)
    results: dict[str, Any] = {"method": config.ensemble_method, "dataset": args.dataset_name,
                               "eval_split": data["eval_split"], "arch": args.arch, "image_size": image_size,
                               "num_classes": data["num_classes"],
                               "member_parameters": sum(p.numel() for p in ensemble.members[0].parameters()),
                               "num_train_rows": len(train), "num_test_rows": len(test), **gpu_facts, **facts,
                               **data["subsets"]}
    with phase(f"training {config.num_members} members ({config.ensemble_method})"):
        results.update(trainer.train(resume_from_checkpoint=config.resume_from_checkpoint).metrics)
    results.update(scoring_summary(trainer))

    with phase(f"evaluating on the {data['eval_split']} split and on the training rows (no augmentation)"):
        results.update(trainer.evaluate())
        results.update(trainer.evaluate(score, metric_key_prefix="train"))  # does the ensemble fit its data?
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
