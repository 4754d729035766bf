"""CIFAR-10 / CIFAR-100 data for the recipes: loading, transforms, and the corrupted (CIFAR-C) test sets.

Not a recipe itself; `cifar_resnet.py`, `vit_cifar100.py` and `tradeoff.py` import it. Any dataset
``datasets.load_dataset`` reads works when it has an image column and an integer label column: the
Hub's ``uoft-cs/cifar10`` (``img``, ``label``), ``uoft-cs/cifar100`` (``img``, ``fine_label``), or a local
folder laid out like them (e.g. ``../shared/data/cifar10``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torchvision.transforms as T

from sbtrainer.data import SEVERITIES, corruptions_for, iter_cifar_c, iter_corrupted_datasets

logger = logging.getLogger("sbtrainer.recipes.cifar_data")

CIFAR_STATS = {  # per-channel mean and std of the training images, by number of classes
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class CifarDataArgs:
    """Where the data comes from and which corrupted sets to evaluate on."""

    dataset_name: str = field(default="uoft-cs/cifar10", metadata={
        "help": "Hub id (uoft-cs/cifar10, uoft-cs/cifar100) or a local folder that datasets.load_dataset reads."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the Image feature)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Label column (default: 'label', else 'fine_label' as in uoft-cs/cifar100)."})
    cifar_c_dir: str | None = field(default=None, metadata={
        "help": "Folder of the published CIFAR-10-C / CIFAR-100-C files (<corruption>.npy, labels.npy)."})
    corrupt_offline: bool = field(default=False, metadata={
        "help": "Without --cifar_c_dir: generate a CIFAR-C-like set from the test set with sbtrainer.data."})
    corrupt_samples: int = field(default=1000, metadata={"help": "Test images corrupted per set (--corrupt_offline)."})
    corruptions: list[str] = field(default_factory=list, metadata={
        "help": "Corruptions to evaluate (default: the 15 of CIFAR-10-C)."})
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES), metadata={"help": "Severities (1..5)."})


def load_cifar(args: CifarDataArgs, max_train: int | None = None, max_eval: int | None = None) -> dict[str, Any]:
    """Raw train/test splits (no transform), their image and label columns and the number of classes."""
    raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    train, test = raw["train"], raw["test"] if "test" in raw else raw["validation"]
    image_col = args.image_column or next(k for k, f in train.features.items() if isinstance(f, datasets.Image))
    label_col = args.label_column or next(c for c in ("label", "fine_label", "labels") if c in train.column_names)
    feature = train.features[label_col]
    num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(max(train[label_col])) + 1
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if max_eval is not None:
        test = test.select(range(min(max_eval, len(test))))
    return {"train": train, "test": test, "image_col": image_col, "label_col": label_col, "num_classes": num_classes}


def cifar_transforms(
    num_classes: int, image_size: int = 32, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of a PIL image to a normalised ``(3, image_size, image_size)`` tensor.

    Train: resize (if ``image_size != 32``), random crop with ``image_size // 8`` padding (4 at 32 px, the
    paper's) and horizontal flip. Eval: resize only. ``mean``/``std`` default to the CIFAR statistics.
    """
    default_mean, default_std = CIFAR_STATS.get(num_classes, CIFAR_STATS[10])
    normalize = T.Normalize(mean or default_mean, std or default_std)
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train = T.Compose([*resize, T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
                       T.ToTensor(), normalize])
    return train, T.Compose([*resize, T.ToTensor(), normalize])


def batch_transform(transform: Callable, image_col: str, label_col: str) -> Callable[[dict], dict]:
    """A ``with_transform`` function: a batch of PIL images -> ``pixel_values`` ``(3, H, W)`` each, and ``labels``."""

    def apply(batch: dict) -> dict:
        return {"pixel_values": [transform(im.convert("RGB")) for im in batch[image_col]], "labels": batch[label_col]}

    return apply


def views(data: dict[str, Any], train_tf: Callable, eval_tf: Callable) -> tuple[Any, Any, Any]:
    """(train with augmentation, the same rows with the eval transform for scoring/sharpness, test with eval)."""
    cols = data["image_col"], data["label_col"]
    train = data["train"].with_transform(batch_transform(train_tf, *cols))
    score = data["train"].with_transform(batch_transform(eval_tf, *cols))
    test = data["test"].with_transform(batch_transform(eval_tf, *cols))
    return train, score, test


def ood_prefix(num_classes: int) -> str:
    """The metric prefix of the corrupted sets: ``cifar10c``, ``cifar100c`` or ``ood``."""
    return {10: "cifar10c", 100: "cifar100c"}.get(num_classes, "ood")


def corrupted_sets(args: CifarDataArgs, data: dict[str, Any], seed: int) -> Iterable[tuple[str, int, Any]] | None:
    """``(corruption, severity, raw dataset)`` sets: published CIFAR-C, generated offline, or None (neither asked)."""
    image_col, label_col = data["image_col"], data["label_col"]
    if args.cifar_c_dir:
        return iter_cifar_c(args.cifar_c_dir, args.corruptions or None, args.severities, image_column=image_col,
                            label_column=label_col)
    if not args.corrupt_offline:
        logger.warning("No --cifar_c_dir and no --corrupt_offline: skipping the corrupted-data evaluation.")
        return None
    first = data["test"].select(range(min(args.corrupt_samples, len(data["test"]))))
    names = args.corruptions or list(corruptions_for((32, 32, 3)))
    return iter_corrupted_datasets(first, image_col, names, args.severities, seed=seed, label_column=label_col,
                                   output_image_column=image_col, progress=False)


def evaluate_on(trainer: Any, eval_tf: Callable, data: dict[str, Any]) -> Callable[[Any, str], dict]:
    """``evaluate_fn(raw_dataset, prefix)`` for `evaluate_corruptions`: ``trainer.evaluate`` with the eval transform."""
    to_eval = batch_transform(eval_tf, data["image_col"], data["label_col"])
    return lambda ds, prefix: trainer.evaluate(ds.with_transform(to_eval), metric_key_prefix=prefix)
